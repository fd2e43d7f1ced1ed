"""Load a model bundle and encode features with it: `load_bundle(path).encode("audio", x)`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .backends import Backend, create_backend
from .manifest import Manifest, read_manifest

log = logging.getLogger(__name__)


class Bundle:
    """A verified bundle with a running backend. `backend` names it ("onnx-cpu", "onnx-cuda", "torch-cuda", ...)."""

    def __init__(self, root: Path, manifest: Manifest, backend: Backend, reason: str):
        self.root = root
        self.manifest = manifest
        self._backend = backend
        self.backend = backend.name
        self.backend_reason = reason

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest.modalities)

    def check_input(
        self, modality: str, features: np.ndarray, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Validate against the manifest; return features as contiguous float32 [B, T, *shape] and mask as
        bool [B, T] (all true when a masked modality gets none; None for unmasked modalities)."""
        entry = self.manifest.modalities.get(modality)
        if entry is None:
            raise ValueError(f"unknown modality {modality!r}; this bundle encodes {self.modalities}")
        x = np.asarray(features)
        if x.dtype.kind not in "fiu":
            raise ValueError(f"{modality} features must be numbers, got dtype {x.dtype}")
        expected = (self.manifest.T, *entry.shape)
        if x.ndim != len(expected) + 1 or x.shape[1:] != expected:
            raise ValueError(
                f"{modality} features have shape {list(x.shape)}, this bundle expects "
                f"[B, {', '.join(map(str, expected))}]"
            )
        if x.shape[0] == 0:
            raise ValueError(f"{modality} features: empty batch (B = 0)")
        x = np.ascontiguousarray(x, dtype=np.float32)
        finite = np.isfinite(x)
        if not finite.all():
            bad = np.argwhere(~finite)[0]
            raise ValueError(
                f"{modality} features hold {int((~finite).sum())} NaN/inf values (first at index {bad.tolist()}); "
                "after float32 conversion"
            )
        if not entry.masked:
            if mask is not None:
                raise ValueError(f"{modality} takes no mask (only masked modalities do)")
            return x, None
        if mask is None:
            return x, np.ones(x.shape[:2], dtype=bool)
        m = np.asarray(mask)
        if m.shape != x.shape[:2]:
            raise ValueError(f"{modality} mask has shape {list(m.shape)}, expected {list(x.shape[:2])}")
        if m.dtype != bool:
            if m.dtype.kind not in "iu" or not np.isin(m, (0, 1)).all():
                raise ValueError(f"{modality} mask must be bool (or 0/1 integers), got dtype {m.dtype}")
            m = m.astype(bool)
        return x, np.ascontiguousarray(m)

    def encode(self, modality: str, features: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """features [B, T, *shape] (+ mask [B, T] for masked modalities) -> {"layer1": int64 [B, T],
        "layer2": int64 [B, T] (manifest.no_code everywhere for one-layer models), "embedding": float32 [B, E]
        L2-normalised, and "layer1_stages": int64 [B, T, n] for RVQ-n}."""
        return self.run_checked(modality, *self.check_input(modality, features, mask))

    def run_checked(self, modality: str, features: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
        """`encode` of what `check_input` returned, for a caller that checked each part of a batch on its own (the
        service, which checks every request before batching them)."""
        return self._backend.run(modality, features, mask)


def load_bundle(path: str | Path, backend: str = "auto", threads: int = 0) -> Bundle:
    """Verify the bundle at `path` (manifest, versions, every file's sha256, graph signatures) and start a backend.

    backend: "auto" | "onnx-cpu" | "onnx-cuda" | "torch-cuda" | "torch-cpu"; threads: onnxruntime intra-op threads
    (0: its default). Raises BundleError for a bad bundle, BackendUnavailable for a backend this machine lacks.
    """
    root = Path(path)
    manifest = read_manifest(root)
    impl, reason = create_backend(backend, root, manifest, threads)
    log.info("bundle %s: backend %s (%s)", root, impl.name, reason)
    return Bundle(root, manifest, impl, reason)
