"""Networks, quantisers, losses and front-ends of SRCID."""

from .config import MODALITIES, ModalitySpec, SRCIDConfig, paper_modalities
from .srcid import SRCID, LayerOutput, SRCIDOutput

__all__ = ["MODALITIES", "ModalitySpec", "SRCID", "SRCIDConfig", "LayerOutput", "SRCIDOutput", "paper_modalities"]
