"""VGGish-compatible log-mel front-ends.

The log-mel spectrogram follows the AudioSet VGGish recipe (`mel_features.py` of tensorflow/models):
16 kHz mono, 25 ms periodic-Hann windows every 10 ms, |rfft| over 512 points, 64 HTK-mel triangles from
125 to 7500 Hz (DC bin zeroed), log(mel + 0.01). One 0.96 s patch of 96 frames x 64 bands starts at each
whole second, so step t covers [t, t + 0.96) s. Audio shorter than T seconds is padded with silence.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from .audio_io import SAMPLE_RATE
from .base import DEFAULT_T, Features, describe, standardise_rows

WINDOW = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms
FFT = 512  # next power of two above the window
MEL_BANDS = 64
MEL_LOW_HZ = 125.0
MEL_HIGH_HZ = 7500.0
LOG_OFFSET = 0.01
PATCH_FRAMES = 96  # 0.96 s
FRAMES_PER_SECOND = SAMPLE_RATE // HOP


def hertz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale, as VGGish uses."""
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


@lru_cache(maxsize=4)
def mel_matrix(num_bins: int = FFT // 2 + 1, bands: int = MEL_BANDS) -> np.ndarray:
    """Triangular mel weights [num_bins, bands] (float64), VGGish's `spectrogram_to_mel_matrix`."""
    bin_mel = hertz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2, num_bins))
    edges = np.linspace(hertz_to_mel(MEL_LOW_HZ), hertz_to_mel(MEL_HIGH_HZ), bands + 2)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_mel[:, None] - lower) / (centre - lower)
    falling = (upper - bin_mel[:, None]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0  # VGGish drops the DC bin
    return weights


def pad_waveforms(waveforms: Sequence[np.ndarray], T: int) -> tuple[torch.Tensor, np.ndarray]:
    """Waveforms [samples] (16 kHz) -> zero-padded/truncated [B, T * 16000] and the step mask [B, T]
    (a step is real when the audio reaches into it)."""
    length = T * SAMPLE_RATE
    out = np.zeros((len(waveforms), length), dtype=np.float32)
    mask = np.zeros((len(waveforms), T), dtype=bool)
    for i, w in enumerate(waveforms):
        w = np.asarray(w, dtype=np.float32)
        if w.ndim != 1:
            raise ValueError(f"audio item {i}: expected a mono waveform [samples], got shape {w.shape}")
        n = min(len(w), length)
        out[i, :n] = w[:n]
        mask[i, : min(T, -(-n // SAMPLE_RATE))] = True
    return torch.from_numpy(out), mask


def log_mel(waveforms: torch.Tensor) -> torch.Tensor:
    """[B, samples] at 16 kHz -> log-mel frames [B, F, 64], F = 1 + (samples - 400) // 160."""
    frames = waveforms.unfold(-1, WINDOW, HOP)
    window = torch.hann_window(WINDOW, periodic=True, dtype=waveforms.dtype, device=waveforms.device)
    spectrum = torch.fft.rfft(frames * window, n=FFT).abs()
    weights = torch.as_tensor(mel_matrix(), dtype=waveforms.dtype, device=waveforms.device)
    return torch.log(spectrum @ weights + LOG_OFFSET)


def patches(waveforms: torch.Tensor, T: int) -> torch.Tensor:
    """[B, >= T * 16000 samples] -> one 96 x 64 patch per second [B, T, 96, 64]."""
    mel = log_mel(waveforms)
    starts = torch.arange(T, device=mel.device) * FRAMES_PER_SECOND
    index = starts[:, None] + torch.arange(PATCH_FRAMES, device=mel.device)  # [T, 96]
    return mel[:, index]


class LogMelPatches:
    """Audio -> VGGish input patches [B, T, 96, 64] (the log-mel itself, no network)."""

    name = "logmel"
    modality = "audio"

    def __init__(self, T: int = DEFAULT_T):
        self.T = T
        self.output_shape: tuple[int, ...] = (PATCH_FRAMES, MEL_BANDS)

    def spec(self) -> dict:
        return {"name": self.name, "modality": self.modality, "output_shape": list(self.output_shape), "T": self.T}

    @torch.inference_mode()
    def __call__(self, batch: Sequence[np.ndarray]) -> Features:
        padded, mask = pad_waveforms(batch, self.T)
        return Features(patches(padded, self.T).numpy(), mask)


def centre_in_time(p: torch.Tensor) -> torch.Tensor:
    """Shift each patch [N, 96, 64] in time so its energy centroid sits at the middle frame.

    Energy per frame is the mean log-mel above the patch's quietest frame, squared so the word outweighs the
    noise floor. Frames shifted in from outside take the patch's per-band floor. This removes where in its
    second the word happens to start, and keeps its temporal shape.
    """
    frames = torch.arange(PATCH_FRAMES, device=p.device, dtype=p.dtype)
    energy = p.mean(-1)
    weight = (energy - energy.amin(1, keepdim=True)) ** 2
    centroid = (weight * frames).sum(1) / weight.sum(1).clamp_min(1e-9)
    shift = torch.round(PATCH_FRAMES // 2 - centroid).long()
    source = frames.long()[None, :] - shift[:, None]  # [N, 96]: which frame lands at each position
    inside = (source >= 0) & (source < PATCH_FRAMES)
    moved = p.gather(1, source.clamp(0, PATCH_FRAMES - 1)[..., None].expand(-1, -1, p.shape[-1]))
    return torch.where(inside[..., None], moved, p.amin(1, keepdim=True))


class LogMelPooled:
    """Audio -> a compact per-second feature [B, T, time_bins * mel_bins] (128 by default).

    Each 96 x 64 patch is centred in time on its energy (`centre_in_time`, unless centre=False),
    average-pooled to 8 time x 16 mel cells (12 frames x 4 bands each), flattened time-major, and
    standardised per vector (`standardise_rows`). The pooled grid keeps the word's temporal shape (onset,
    vowel, coda) that a mean over time would lose; centring makes that shape line up across steps wherever
    the word falls in its second. docs/FRONTENDS.md gives the probe figures behind these choices.
    """

    name = "logmel-pooled"
    modality = "audio"

    def __init__(
        self, T: int = DEFAULT_T, time_bins: int = 8, mel_bins: int = 16, std_floor: float = 1.0, centre: bool = True
    ):
        if PATCH_FRAMES % time_bins or MEL_BANDS % mel_bins:
            raise ValueError(f"time_bins must divide {PATCH_FRAMES} and mel_bins {MEL_BANDS}")
        self.T = T
        self.time_bins, self.mel_bins, self.std_floor, self.centre = time_bins, mel_bins, std_floor, centre
        self.output_shape: tuple[int, ...] = (time_bins * mel_bins,)

    def spec(self) -> dict:
        return describe(
            self, time_bins=self.time_bins, mel_bins=self.mel_bins, std_floor=self.std_floor, centre=self.centre
        )

    @torch.inference_mode()
    def __call__(self, batch: Sequence[np.ndarray]) -> Features:
        padded, mask = pad_waveforms(batch, self.T)
        p = patches(padded, self.T)  # [B, T, 96, 64]
        B = p.shape[0]
        if self.centre:
            p = centre_in_time(p.flatten(0, 1)).reshape(p.shape)
        grid = p.reshape(B, self.T, self.time_bins, PATCH_FRAMES // self.time_bins, self.mel_bins, -1)
        pooled = grid.mean(dim=(3, 5)).reshape(B, self.T, -1).numpy()
        return Features(standardise_rows(pooled, self.std_floor), mask)
