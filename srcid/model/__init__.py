"""Networks, quantisers, losses and front-ends of SRCID."""
