"""Convert public PyTorch checkpoints to the safetensors files the VGGish and VGG19 front-ends load.

Run where you have the downloaded .pth files (no network is used):

    python -m srcid.model.frontends.convert vggish --pth vggish-10086976.pth \
        --pca vggish_pca_params-970ea276.pth --out vggish.safetensors
    python -m srcid.model.frontends.convert vgg19 --pth vgg19-dcbb9e9d.pth --out vgg19.safetensors

Checkpoints are read with `torch.load(weights_only=True)`, PyTorch's restricted unpickler (tensors, numpy
arrays and plain containers only; no code runs). The output is checked by loading it into the network.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .base import load_safetensors_into
from .video_frontends import VGG19Net
from .vggish import PCA_KEYS, VGGishNet

EMBEDDING = 128


def _numpy_globals() -> list:
    """The numpy pieces a pickled ndarray references, for torch's weights-only unpickler."""
    core = getattr(np, "_core", None) or np.core
    dtype_classes = [type(np.dtype(t)) for t in (np.float32, np.float64, np.int64, np.int32)]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *dtype_classes]


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A .pth state dict -> {name: float32 tensor}, through the restricted unpickler."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint not found")
    with torch.serialization.safe_globals(_numpy_globals()):
        state = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{p}: expected a state dict, got {type(state).__name__}")
    tensors = {k: v if torch.is_tensor(v) else torch.as_tensor(np.asarray(v)) for k, v in state.items()}
    return {k: v.float().contiguous() for k, v in tensors.items()}


def convert_vggish(pth: str | Path, out: str | Path, pca: str | Path | None = None) -> Path:
    """torchvggish `vggish-10086976.pth` (+ optional `vggish_pca_params-970ea276.pth`) -> safetensors."""
    state = load_checkpoint(pth)
    net = VGGishNet()
    tensors = {k: state[k] for k in net.state_dict() if k in state}
    if pca is not None:
        params = load_checkpoint(pca)
        missing = [k for k in PCA_KEYS if k not in params]
        if missing:
            raise ValueError(f"{pca}: lacks {missing}")
        tensors["pca_eigen_vectors"] = params["pca_eigen_vectors"].reshape(EMBEDDING, EMBEDDING).contiguous()
        tensors["pca_means"] = params["pca_means"].reshape(EMBEDDING).contiguous()
    return _save_checked(tensors, net, out, "VGGish")


def convert_vgg19(pth: str | Path, out: str | Path) -> Path:
    """torchvision `vgg19-dcbb9e9d.pth` (ImageNet) -> safetensors holding the conv stack (`features.*`) only."""
    state = load_checkpoint(pth)
    net = VGG19Net()
    return _save_checked({k: state[k] for k in net.state_dict() if k in state}, net, out, "VGG19")


def _save_checked(tensors: dict[str, torch.Tensor], net: torch.nn.Module, out: str | Path, what: str) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    load_safetensors_into(net, out, what, "--pth")  # names any missing tensor or shape mismatch
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert VGGish / VGG19 .pth checkpoints to safetensors.")
    parser.add_argument("network", choices=["vggish", "vgg19"])
    parser.add_argument("--pth", required=True, help="the downloaded PyTorch checkpoint")
    parser.add_argument("--pca", help="vggish only: torchvggish's PCA parameters .pth (enables postprocess)")
    parser.add_argument("--out", required=True, help="the safetensors file to write")
    args = parser.parse_args(argv)
    if args.network == "vggish":
        path = convert_vggish(args.pth, args.out, args.pca)
    else:
        path = convert_vgg19(args.pth, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
