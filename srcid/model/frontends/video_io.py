"""Decoding video to one RGB frame per second: from MP4/WebM files (PyAV) or from a list of images (Pillow)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from .audio_io import MediaError
from .base import DEFAULT_T


def _label(source: str | Path | bytes) -> str:
    return "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)


def load_image(source: str | Path | bytes) -> np.ndarray:
    """One PNG/JPEG image (path or bytes) -> uint8 RGB [H, W, 3]."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(source, (bytes, bytearray)) and not Path(source).is_file():
        raise FileNotFoundError(f"{source}: image file not found")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"{_label(source)}: not a decodable PNG/JPEG image ({exc})") from exc


def frames_to_steps(frames: Sequence[np.ndarray], T: int = DEFAULT_T) -> tuple[np.ndarray, np.ndarray]:
    """Frames (one per second, equal sizes) -> uint8 [T, H, W, 3] and a mask [T].

    More than T frames: the first T are kept. Fewer: the rest are black and masked False.
    """
    if not frames:
        raise MediaError("no frames")
    shape = frames[0].shape
    for i, f in enumerate(frames):
        if f.shape != shape:
            raise MediaError(f"frame {i}: size {f.shape[:2]} differs from frame 0's {shape[:2]}")
    out = np.zeros((T, *shape), dtype=np.uint8)
    n = min(len(frames), T)
    out[:n] = np.stack(frames[:n])
    mask = np.arange(T) < n
    return out, mask


def load_frames(sources: Sequence[str | Path | bytes], T: int = DEFAULT_T) -> tuple[np.ndarray, np.ndarray]:
    """A list of images, one per second -> uint8 RGB [T, H, W, 3] and mask [T] (see `frames_to_steps`)."""
    return frames_to_steps([load_image(s) for s in sources], T)


def _check_pixels(source: str | Path | bytes, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise MediaError(f"{_label(source)}: {width} x {height} pixels, at most {max_pixels} per frame")


def load_video(
    source: str | Path | bytes, T: int = DEFAULT_T, max_pixels: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """An MP4/WebM file (path or bytes) -> uint8 RGB [T, H, W, 3], the frame nearest each second's centre
    (t + 0.5 s), and mask [T] (False for seconds past the end of the video, which are black).

    max_pixels: refuse frames larger than this, from the stream header before any frame is decoded (and again
    per frame, since a stream may change size), so an untrusted file cannot make the decoder allocate at will."""
    import av

    if not isinstance(source, (bytes, bytearray)) and not Path(source).is_file():
        raise FileNotFoundError(f"{source}: video file not found")
    targets = np.arange(T) + 0.5
    best: list[tuple[float, np.ndarray] | None] = [None] * T
    try:
        with av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)) as container:
            if not container.streams.video:
                raise MediaError(f"{_label(source)}: holds no video stream")
            stream = container.streams.video[0]
            _check_pixels(source, stream.codec_context.width, stream.codec_context.height, max_pixels)
            for frame in container.decode(stream):
                _check_pixels(source, frame.width, frame.height, max_pixels)
                if frame.time is None:
                    continue
                t = float(frame.time)
                if t >= T:
                    break
                step = int(np.floor(t))  # centres sit at k + 0.5, so second k's nearest frames lie in [k, k + 1)
                if step < 0:
                    continue
                dist = abs(t - targets[step])
                if best[step] is None or dist < best[step][0]:
                    best[step] = (dist, frame.to_ndarray(format="rgb24"))
    except av.error.FFmpegError as exc:
        raise MediaError(f"{_label(source)}: not a decodable MP4/WebM video ({exc})") from exc
    found = [b[1] for b in best if b is not None]
    if not found:
        raise MediaError(f"{_label(source)}: no decodable frames in the first {T} s")
    shape = found[0].shape
    if any(f.shape != shape for f in found):
        raise MediaError(f"{_label(source)}: the frame size changes within the video")
    out = np.zeros((T, *shape), dtype=np.uint8)
    mask = np.zeros(T, dtype=bool)
    for step, b in enumerate(best):
        if b is not None:
            out[step], mask[step] = b[1], True
    return out, mask
