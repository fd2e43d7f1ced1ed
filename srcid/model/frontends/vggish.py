"""The VGGish network (Hershey et al. 2017) as torchvggish ports it: log-mel patch [96, 64] -> 128-d embedding.

Weights come from a local safetensors file the user supplies (`convert.py` makes one from the public
torchvggish checkpoint); the key names are torchvggish's (`features.N.*`, `embeddings.N.*`, and optionally
`pca_eigen_vectors` [128, 128] + `pca_means` [128] for the AudioSet PCA/whitening + 8-bit quantisation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from .base import DEFAULT_T, Features, WeightsMismatchError, describe, load_safetensors_into
from .logmel import MEL_BANDS, PATCH_FRAMES, pad_waveforms, patches
from .torch_util import conv_stack, pick_device, run_batched

EMBEDDING = 128
PCA_KEYS = ("pca_eigen_vectors", "pca_means")
QUANTIZE_MIN, QUANTIZE_MAX = -2.0, 2.0


class VGGishNet(nn.Module):
    """[N, 1, 96, 64] log-mel patches -> [N, 128] embeddings (before PCA)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = conv_stack(1, [64, "M", 128, "M", 256, 256, "M", 512, 512, "M"])
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 4 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, EMBEDDING),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        # The TF original flattens channels-last; the first Linear's weights expect that order.
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        return self.embeddings(x)


class VGGish:
    """Audio -> VGGish embeddings [B, T, 128], one per second (the AVE / VGGSound-AVEL feature).

    With `postprocess=True` (needs the PCA tensors in the weights file) the embedding is PCA-whitened,
    clipped to [-2, 2] and quantised to 0..255 as in the released AudioSet features.
    """

    name = "vggish"
    modality = "audio"

    def __init__(
        self,
        weights: str | Path | None = None,
        T: int = DEFAULT_T,
        postprocess: bool = False,
        device: str | None = None,
        batch_size: int = 64,
    ):
        self.T = T
        self.output_shape: tuple[int, ...] = (EMBEDDING,)
        self.weights, self.postprocess, self.batch_size = str(weights) if weights else None, postprocess, batch_size
        self.device = pick_device(device)
        self.net = VGGishNet().eval()
        load_safetensors_into(self.net, weights, "VGGish", "weights")
        self.pca_matrix = self.pca_means = None
        if postprocess:
            tensors = load_file(str(weights))
            missing = [k for k in PCA_KEYS if k not in tensors]
            if missing:
                raise WeightsMismatchError(f"VGGish: postprocess needs {missing} in {weights} (convert with --pca)")
            self.pca_matrix = tensors["pca_eigen_vectors"].float()
            self.pca_means = tensors["pca_means"].float().reshape(1, -1)
        self.net.to(self.device)

    def spec(self) -> dict:
        return describe(self, weights=Path(self.weights).name, postprocess=self.postprocess)

    @torch.inference_mode()
    def __call__(self, batch: Sequence[np.ndarray]) -> Features:
        padded, mask = pad_waveforms(batch, self.T)
        x = patches(padded, self.T).reshape(-1, 1, PATCH_FRAMES, MEL_BANDS)
        emb = run_batched(self.net, x, self.batch_size, self.device)
        if self.postprocess:
            pca = (emb - self.pca_means) @ self.pca_matrix.T
            scale = 255.0 / (QUANTIZE_MAX - QUANTIZE_MIN)
            emb = torch.round((pca.clamp(QUANTIZE_MIN, QUANTIZE_MAX) - QUANTIZE_MIN) * scale)
        return Features(emb.reshape(len(batch), self.T, EMBEDDING).numpy(), mask)
