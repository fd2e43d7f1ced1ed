"""srcid: one discrete vocabulary for audio, video and text (SRCID, arXiv 2412.19128)."""

__version__ = "0.1.0"
