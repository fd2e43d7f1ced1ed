"""Video front-ends: grey pixels (AV-Digits) and the VGG19 conv stack to pool5 (the AVE feature).

Input items are what `video_io` returns: a `(frames, mask)` pair with frames uint8 RGB [T, H, W, 3],
or a bare frames array [t, H, W, 3] (t <= T steps; missing steps are black and masked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .base import DEFAULT_T, Features, describe, load_safetensors_into, standardise_rows
from .torch_util import conv_stack, pick_device, run_batched

VideoItem = Union[np.ndarray, tuple[np.ndarray, np.ndarray]]

VGG19_PLAN = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resized_steps(batch: Sequence[VideoItem], T: int, size: int, mode: str) -> tuple[torch.Tensor, np.ndarray]:
    """Items -> float32 RGB in [0, 1] resized to size x size, [B * T, 3, size, size], and mask [B, T].

    Each item is resized on its own, so clips of different frame sizes can share a batch.
    """
    out, masks = [], []
    for i, item in enumerate(batch):
        x, m = item if isinstance(item, tuple) else (item, np.ones(len(item), dtype=bool))
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
            raise ValueError(f"video item {i}: expected uint8 RGB frames [t, H, W, 3], got {x.dtype} {x.shape}")
        n = min(len(x), T)
        frames = torch.from_numpy(x[:n]).permute(0, 3, 1, 2).float().div_(255.0)
        antialias = {"antialias": True} if mode == "bilinear" else {}  # "area" averages by definition
        small = F.interpolate(frames, size=(size, size), mode=mode, **antialias)
        padded = torch.zeros((T, 3, size, size))
        padded[:n] = small
        mask = np.zeros(T, dtype=bool)
        mask[:n] = np.asarray(m[:n], dtype=bool)
        out.append(padded)
        masks.append(mask)
    return torch.cat(out), np.stack(masks)


class Pixels:
    """Video -> grey size x size pixels per second [B, T, size * size] (64 for AV-Digits' 8 x 8 digits).

    Luma (ITU-R 601 weights), area-averaged down to size x size, standardised per vector with a floor so a
    blank noisy frame stays near zero (`standardise_rows`).
    """

    name = "pixels"
    modality = "video"

    def __init__(self, T: int = DEFAULT_T, size: int = 8, std_floor: float = 0.1):
        self.T, self.size, self.std_floor = T, size, std_floor
        self.output_shape: tuple[int, ...] = (size * size,)

    def spec(self) -> dict:
        return describe(self, size=self.size, std_floor=self.std_floor)

    @torch.inference_mode()
    def __call__(self, batch: Sequence[VideoItem]) -> Features:
        # Area averaging is linear, so averaging RGB first and taking luma after equals the other order.
        x, mask = resized_steps(batch, self.T, self.size, "area")  # [B * T, 3, size, size]
        luma = torch.tensordot(x, torch.tensor([0.299, 0.587, 0.114]), dims=([1], [0]))  # [B * T, size, size]
        return Features(standardise_rows(luma.reshape(len(batch), self.T, -1).numpy(), self.std_floor), mask)


class VGG19Net(torch.nn.Module):
    """ImageNet VGG19 conv stack through pool5: [N, 3, 224, 224] normalised -> [N, 512, 7, 7].
    Parameter names match torchvision's `vgg19().features` (`features.N.weight`)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = conv_stack(3, VGG19_PLAN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class VGG19Pool5:
    """Video -> VGG19 pool5 maps per second [B, T, 7, 7, 512] (channels last, the AVE feature layout).

    Frames are resized to 224 x 224 (bilinear, antialiased) and ImageNet-normalised.
    """

    name = "vgg19-pool5"
    modality = "video"

    def __init__(
        self, weights: str | Path | None = None, T: int = DEFAULT_T, device: str | None = None, batch_size: int = 32
    ):
        self.T, self.batch_size = T, batch_size
        self.output_shape: tuple[int, ...] = (7, 7, 512)
        self.weights = str(weights) if weights else None
        self.device = pick_device(device)
        self.net = VGG19Net().eval()
        load_safetensors_into(self.net, weights, "VGG19", "weights")
        self.net.to(self.device)
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def spec(self) -> dict:
        return describe(self, weights=Path(self.weights).name)

    @torch.inference_mode()
    def __call__(self, batch: Sequence[VideoItem]) -> Features:
        x, mask = resized_steps(batch, self.T, 224, "bilinear")
        x = (x - self.mean) / self.std
        maps = run_batched(self.net, x, self.batch_size, self.device)  # [B*T, 512, 7, 7]
        return Features(maps.permute(0, 2, 3, 1).reshape(len(batch), self.T, 7, 7, 512).numpy(), mask)
