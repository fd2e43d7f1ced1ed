"""Decoding audio files (WAV/FLAC/OGG via soundfile) to mono float32 at the front-ends' 16 kHz."""

from __future__ import annotations

import io
from math import gcd
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000


class MediaError(ValueError):
    """A media file or payload cannot be decoded (corrupt, empty, unsupported)."""


def resample(waveform: np.ndarray, rate_in: int, rate_out: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling (anti-aliased FIR, scipy.signal.resample_poly) of [samples] or [samples, C]."""
    if rate_in == rate_out:
        return waveform.astype(np.float32, copy=False)
    if rate_in <= 0:
        raise MediaError(f"sample rate {rate_in} is not positive")
    from scipy.signal import resample_poly

    g = gcd(rate_in, rate_out)
    return resample_poly(waveform, rate_out // g, rate_in // g, axis=0).astype(np.float32)


def load_audio(source: str | Path | bytes, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode a WAV/FLAC/OGG file (a path or its bytes) to a mono float32 waveform [samples] at `sample_rate`.

    Channels are averaged; the rate is converted with `resample`. Raises `MediaError` naming the file for a
    corrupt or empty file, `FileNotFoundError` for a missing one.
    """
    import soundfile as sf

    label = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    if not isinstance(source, (bytes, bytearray)) and not Path(source).is_file():
        raise FileNotFoundError(f"{label}: audio file not found")
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
        data, rate = sf.read(handle, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise MediaError(f"{label}: not a decodable WAV/FLAC/OGG file ({exc})") from exc
    if data.shape[0] == 0:
        raise MediaError(f"{label}: the audio holds no samples")
    if not np.isfinite(data).all():
        raise MediaError(f"{label}: the audio holds NaN or inf samples")
    return resample(data.mean(axis=1), rate, sample_rate)
