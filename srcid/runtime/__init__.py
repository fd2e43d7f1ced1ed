"""Inference runtime: load a model bundle (DESIGN §2) and encode features on onnxruntime (CPU/CUDA) or torch."""

from .backends import BACKENDS, BackendUnavailable
from .bundle import Bundle, load_bundle
from .manifest import BUNDLE_VERSION, FORMAT, BundleError, Manifest, read_manifest

__all__ = [
    "BACKENDS",
    "BUNDLE_VERSION",
    "FORMAT",
    "BackendUnavailable",
    "Bundle",
    "BundleError",
    "Manifest",
    "load_bundle",
    "read_manifest",
]
