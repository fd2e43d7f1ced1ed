"""What every front-end shares: the `FrontEnd` protocol, its output, and weight loading that names its file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

DEFAULT_T = 10


class MissingWeightsError(FileNotFoundError):
    """A front-end needs a weights file or model folder the user has not supplied (or that is not there)."""


class WeightsMismatchError(ValueError):
    """A weights file exists but its tensors do not fit the network (missing keys or wrong shapes)."""


@dataclass
class Features:
    """A front-end's output for a batch.

    values: float32 [B, T, *output_shape]; mask: bool [B, T], True where the step holds real media
    (False where the media ran out and the step was padded).
    """

    values: np.ndarray
    mask: np.ndarray


@runtime_checkable
class FrontEnd(Protocol):
    """Turns a batch of decoded media into per-step features [B, T, *output_shape].

    Decoded media per modality: audio a float32 waveform [samples] at 16 kHz (see `audio_io.load_audio`),
    video uint8 RGB frames [T, H, W, 3] one per second (see `video_io`), text a `str`.
    The same input always gives the same output (eval mode, no randomness).
    """

    name: str
    modality: str
    T: int
    output_shape: tuple[int, ...]

    def __call__(self, batch: Sequence[Any]) -> Features: ...

    def spec(self) -> dict:
        """What a bundle manifest records to rebuild this front-end: {"name", "modality", "output_shape", ...}."""
        ...


def describe(frontend: FrontEnd, **options: Any) -> dict:
    """A front-end's `spec()`: its name, modality, per-step shape and T, plus the options that rebuild it."""
    return {
        "name": frontend.name,
        "modality": frontend.modality,
        "output_shape": list(frontend.output_shape),
        "T": frontend.T,
        **options,
    }


def require_file(path: str | Path | None, what: str, option: str) -> Path:
    """The path of a file a front-end cannot work without; a clear `MissingWeightsError` when it is not there."""
    if path is None:
        raise MissingWeightsError(f"{what}: no weights file given (pass {option}=PATH; see docs/FRONTENDS.md)")
    p = Path(path)
    if not p.is_file():
        raise MissingWeightsError(f"{what}: weights file {p} not found (see docs/FRONTENDS.md for how to make it)")
    return p


def load_safetensors_into(module: "torch.nn.Module", path: str | Path, what: str, option: str) -> None:  # noqa: F821
    """Load the tensors of `path` into `module` strictly: every parameter present with its exact shape."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = require_file(path, what, option)
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError) as exc:
        raise WeightsMismatchError(f"{what}: {p} is not a readable safetensors file ({exc})") from exc
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise WeightsMismatchError(f"{what}: {p} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for key, want in expected.items():
        if tuple(tensors[key].shape) != tuple(want.shape):
            raise WeightsMismatchError(
                f"{what}: {p} tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                f"the network needs {tuple(want.shape)}"
            )
    module.load_state_dict({k: tensors[k].to(torch.float32) for k in expected}, strict=True)


def pad_steps(items: Sequence[np.ndarray], T: int, fill: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-item step arrays [t_i, *shape] into [B, T, *shape], truncating past T and padding with `fill`.

    Returns (values, mask) where mask [B, T] marks the steps that came from the item.
    """
    shape = items[0].shape[1:]
    out = np.full((len(items), T, *shape), fill, dtype=np.float32)
    mask = np.zeros((len(items), T), dtype=bool)
    for i, x in enumerate(items):
        n = min(len(x), T)
        out[i, :n] = x[:n]
        mask[i, :n] = True
    return out, mask


def standardise_rows(x: np.ndarray, std_floor: float) -> np.ndarray:
    """Zero-mean, unit-variance per feature vector (last axis), dividing by max(std, std_floor).

    A pure function of the input (no fitted statistics to ship with a bundle); the floor keeps near-constant
    vectors (silence, a blank frame) near zero instead of blowing their noise up to unit variance.
    """
    mean = x.mean(axis=-1, keepdims=True)
    std = x.std(axis=-1, keepdims=True)
    return ((x - mean) / np.maximum(std, std_floor)).astype(np.float32)
