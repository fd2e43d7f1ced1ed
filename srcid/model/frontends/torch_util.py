"""Device choice and batched inference shared by the network front-ends."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def pick_device(device: str | None) -> torch.device:
    """`device` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def run_batched(net: torch.nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Apply `net` to x [N, ...] in chunks of `batch_size` on `device`; the result comes back on the CPU."""
    outs = [net(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def conv_stack(in_channels: int, plan: Sequence[int | str]) -> nn.Sequential:
    """VGG-style layers: an int is a 3x3 conv (padding 1) + ReLU with that many channels, "M" a 2x2 max-pool.
    The layer indices match torchvision/torchvggish `features.N` keys."""
    layers: list[nn.Module] = []
    for v in plan:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = int(v)
    return nn.Sequential(*layers)
