"""INPUTs -> the feature arrays a bundle encodes: base64 decoding, media decoding and front-ends.

Runs in a worker thread (decoding and front-ends are CPU work). Every problem with what the client sent raises
`BadInput` naming the input (`inputs[i]`) and what is wrong with it.
"""

from __future__ import annotations

import binascii
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pybase64
from PIL import Image

from srcid.model.frontends import (
    FrontEnd, MediaError, MissingWeightsError, get_frontend, load_audio, load_frames, load_video,
)
from srcid.runtime import Bundle

from .errors import BadInput
from .models import FEATURE_FIELDS, InputFields

EXACT_INT = 2**53  # float64 holds every integer up to here exactly
# Which INPUT fields carry media of which modality (features, either kind, fit every modality).
MEDIA_MODALITY = {"text": "text", "audio_b64": "audio", "video_b64": "video", "frames_b64": "video"}


def build_frontends(bundle: Bundle, missing: dict[str, str] | None = None) -> dict[str, FrontEnd]:
    """One front-end per modality of the bundle, from its manifest (name, files inside the bundle).

    With `missing` given, a front-end whose weights are not in the bundle is left out and `missing[modality]` says
    why: that modality still encodes precomputed features (a deployment whose clients send features needs no
    VGG19 weights). Without it, missing weights raise."""
    out: dict[str, FrontEnd] = {}
    for modality, entry in bundle.manifest.modalities.items():
        files = [bundle.root / f for f in entry.frontend.files]
        options: dict[str, Any] = {"T": bundle.manifest.T}
        if entry.frontend.name == "bert" and files:
            options["model_dir"] = files[0].parent
        elif files:
            weights = [f for f in files if f.suffix == ".safetensors"]
            options["weights"] = (weights or files)[0]
        try:
            frontend = get_frontend(entry.frontend.name, **options)
        except MissingWeightsError as exc:
            if missing is None:
                raise
            missing[modality] = str(exc)
            continue
        if tuple(frontend.output_shape) != tuple(entry.shape):
            raise ValueError(f"{bundle.root}: front-end {entry.frontend.name} gives {modality} steps of shape "
                             f"{list(frontend.output_shape)}, the bundle expects {list(entry.shape)}")
        out[modality] = frontend
    return out


def b64(value: str, where: str) -> bytes:
    try:
        data = pybase64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInput(f"{where}: not valid base64 ({exc})", code="bad_base64") from None
    if not data:
        raise BadInput(f"{where}: empty", code="empty_input")
    return data


def cache_key(bundle_id: str, modality: str, item: InputFields) -> str:
    """sha256 of what determines the answer: bundle, modality, input kind and content."""
    h = hashlib.sha256(f"{bundle_id}\0{modality}\0{item.kind}\0".encode())
    value = getattr(item, item.kind)
    if item.kind == "features":
        h.update(_listed_features_key(value))
    elif item.kind == "frames_b64":
        for frame in value:
            h.update(frame.encode() + b"\0")
    else:
        h.update(value.encode())
    if item.mask is not None:
        h.update(b"\0mask" + bytes(item.mask))
    return h.hexdigest()


def _listed_features_key(value: Any) -> bytes:
    """What keys listed features: the dtype, shape and bytes of the array that the features check reads them as
    (`_feature_array`), so the key fixes the float32 rows encoded. ~10 µs for [10, 128] on the event loop, against
    ~400 for printing the numbers as JSON. Integers up to 2^53 key as the float64s they equal, which float32 rounds
    alike: such features key the same whether the body parser (float64) or orjson (int) read the body. Features the
    check will refuse (ragged, not numbers) key by their JSON, apart from every array."""
    try:
        x = _listed_array(value, "features")
    except BadInput:
        return b"json\0" + json.dumps(value, separators=(",", ":")).encode()
    if x.dtype.kind in "iu" and x.size and -EXACT_INT <= x.min() and x.max() <= EXACT_INT:
        x = x.astype(np.float64)
    return f"array\0{x.dtype.str}\0{x.shape}\0".encode() + np.ascontiguousarray(x).tobytes()


def _feature_array(item: InputFields, bundle: Bundle, modality: str, where: str) -> np.ndarray:
    """The input's features as sent: a nested list, or float32 bytes of exactly [T, *shape]."""
    if item.kind == "features_b64":
        data = b64(item.features_b64, f"{where}.features_b64")
        shape = (bundle.manifest.T, *bundle.manifest.modalities[modality].shape)
        size = 4 * math.prod(shape)
        if len(data) != size:
            raise BadInput(f"{where}.features_b64: {len(data)} bytes; {modality} features {list(shape)} as float32 are "
                           f"{size} bytes", code="bad_features")
        return np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)
    return _listed_array(item.features, f"{where}.features")


def _listed_array(features: Any, where: str) -> np.ndarray:
    """Listed features (nested lists, or the float64 array bodies.py made of them) as numpy reads them."""
    try:
        x = np.asarray(features)
    except ValueError as exc:
        raise BadInput(f"{where}: not a rectangular nested list ({exc})", code="bad_features") from None
    if x.dtype == object or x.dtype.kind not in "fiu" or x.dtype == bool:
        raise BadInput(f"{where}: must be a nested list of numbers [T][D...]", code="bad_features")
    return x


def _features(item: InputFields, bundle: Bundle, modality: str, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """`features` or `features_b64` [T, *shape] (+ `mask` [T]) as a batch of one, checked against the bundle."""
    x = _feature_array(item, bundle, modality, where)
    mask = None if item.mask is None else np.asarray(item.mask, dtype=bool)[None]
    try:
        return bundle.check_input(modality, x[None], mask)
    except ValueError as exc:
        raise BadInput(f"{where}: {exc}", code="bad_features") from None


# What a request may ask the decoders to do, checked from headers before decoding (memory and time stay bounded).
MIN_RATE, MAX_RATE = 1000, 384_000
MAX_AUDIO_S = 600.0
MAX_FRAME_PIXELS = 4096 * 4096


def _check_audio_header(data: bytes, where: str) -> None:
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise BadInput(f"{where}: not a decodable WAV/FLAC/OGG file ({exc})", code="bad_media") from None
    if not MIN_RATE <= info.samplerate <= MAX_RATE:
        raise BadInput(f"{where}: sample rate {info.samplerate} Hz outside [{MIN_RATE}, {MAX_RATE}]", code="bad_media")
    if info.frames > MAX_AUDIO_S * info.samplerate:
        raise BadInput(f"{where}: {info.frames / info.samplerate:.0f} s of audio, at most {MAX_AUDIO_S:.0f} s",
                       code="bad_media")


def _check_image_header(data: bytes, where: str) -> None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadInput(f"{where}: not a decodable PNG/JPEG image ({exc})", code="bad_media") from None
    if width * height > MAX_FRAME_PIXELS:
        raise BadInput(f"{where}: {width} x {height} pixels, at most {MAX_FRAME_PIXELS} per frame", code="bad_media")


def _decode(item: InputFields, modality: str, T: int, where: str) -> Any:
    """Decoded media for the front-end: a waveform [samples], (frames [T, H, W, 3], mask [T]), or a string."""
    try:
        if item.kind == "text":
            if not item.text.split():
                raise BadInput(f"{where}.text: empty (no words)", code="empty_input")
            return item.text
        if item.kind == "audio_b64":
            data = b64(item.audio_b64, f"{where}.audio_b64")
            _check_audio_header(data, f"{where}.audio_b64")
            return load_audio(data)
        if item.kind == "video_b64":
            return load_video(b64(item.video_b64, f"{where}.video_b64"), T, max_pixels=MAX_FRAME_PIXELS)
        if not item.frames_b64:
            raise BadInput(f"{where}.frames_b64: no frames", code="empty_input")
        # Frames past T are never used: they are not decoded.
        frames = [b64(f, f"{where}.frames_b64[{i}]") for i, f in enumerate(item.frames_b64[:T])]
        for i, frame in enumerate(frames):
            _check_image_header(frame, f"{where}.frames_b64[{i}]")
        return load_frames(frames, T)
    except MediaError as exc:
        raise BadInput(f"{where}: {exc}", code="bad_media") from None


@dataclass
class Prepared:
    """One request's INPUTs after decoding, before the front-end: `rows[i]` holds input i's checked features
    ([1, T, *shape], mask [1, T] or None) or None while it waits for the front-end; `media` the decoded media
    of those inputs as (input index, media)."""

    modality: str
    rows: list[tuple[np.ndarray, np.ndarray | None] | None]
    media: list[tuple[int, Any]]
    where: str

    def __len__(self) -> int:
        return len(self.rows)


# Inputs up to this many numbers (features) or characters (text) are prepared on the event loop: handing them to a
# decode thread and back cost ~0.2 ms of CPU a request, several times the check itself (bench/serve_inprocess.py),
# while anything larger, and all media, still goes to a decode thread so the loop never stalls on one request.
INLINE_PREPARE_SIZE = 1 << 16


def _leading_size(value: Any) -> int:
    """Numbers in a nested list, judged by its first elements (exact for a rectangular one), or in an array."""
    if isinstance(value, np.ndarray):
        return value.size
    size = 1
    while isinstance(value, list) and value:
        size *= len(value)
        value = value[0]
    return size


def cheap_to_prepare(items: Sequence[InputFields]) -> bool:
    """Whether `prepare(items)` is cheaper than a thread hop: only features (either kind) and text,
    INLINE_PREPARE_SIZE at most."""
    size = 0
    for item in items:
        if item.kind == "features":
            size += _leading_size(item.features)
        elif item.kind == "features_b64":
            size += len(item.features_b64) * 3 // 16  # base64 -> bytes -> float32 numbers
        elif item.kind == "text":
            size += len(item.text)
        else:
            return False
    return size <= INLINE_PREPARE_SIZE


def prepare(items: Sequence[InputFields], modality: str, bundle: Bundle, where: str = "inputs") -> Prepared:
    """Decode base64 and media and check features (per request: in a decode thread, or on the event loop when
    `cheap_to_prepare`); raises `BadInput`."""
    if modality not in bundle.manifest.modalities:
        raise BadInput(f"modality {modality!r}: this bundle encodes {bundle.modalities}", code="wrong_modality")
    T = bundle.manifest.T
    job = Prepared(modality, [None] * len(items), [], where)
    for i, item in enumerate(items):
        label = f"{where}[{i}]"
        if item.kind in FEATURE_FIELDS:
            job.rows[i] = _features(item, bundle, modality, label)
            continue
        if MEDIA_MODALITY[item.kind] != modality:
            raise BadInput(f"{label}: {item.kind} is {MEDIA_MODALITY[item.kind]} input, the request's modality is "
                           f"{modality}", code="wrong_modality")
        job.media.append((i, _decode(item, modality, T, label)))
    return job


Rows = list[tuple[np.ndarray, np.ndarray | None]]


def featurize(jobs: Sequence[Prepared], bundle: Bundle, frontends: dict[str, FrontEnd]) -> list[Rows | BadInput]:
    """Several requests of one modality -> per request its checked rows (features [1, T, *shape], mask [1, T] or
    None), or the `BadInput` that request alone gets. All their media go through the front-end in one call; the
    rows of features were checked when the request was prepared."""
    modality = jobs[0].modality
    media = [m for job in jobs for _, m in job.media]
    feats = frontends[modality](media) if media else None
    masked = bundle.manifest.modalities[modality].masked
    out: list[Rows | BadInput] = []
    row = 0
    for job in jobs:
        rows = list(job.rows)
        problem = None
        for i, _ in job.media:
            x, m = feats.values[row : row + 1], feats.mask[row : row + 1] if masked else None
            row += 1
            if masked and not m.any():
                problem = problem or BadInput(f"{job.where}[{i}]: no step holds media", code="empty_input")
                continue
            try:
                rows[i] = bundle.check_input(modality, x, m)
            except ValueError as exc:  # NaN from a degenerate decode, say
                problem = problem or BadInput(f"{job.where}[{i}]: {exc}", code="bad_features")
        out.append(rows if problem is None else problem)  # type: ignore[arg-type]
    return out


def stack_rows(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """np.concatenate along the first axis of C-contiguous arrays of one dtype and row shape, without giving up the
    interpreter lock: numpy releases it while it copies, and a batcher thread that gives it up waits for the busy
    event loop to hand it back, up to the 5 ms switch interval each time (a batch of 31 rows spent 10.8 ms so, for
    0.87 ms of work; docs/PERFORMANCE.md, Serve). bytearray.join copies the buffers holding the lock (below 1 MiB)."""
    if len(arrays) == 1:
        return arrays[0]
    first = arrays[0]
    return np.frombuffer(bytearray().join(arrays), dtype=first.dtype).reshape(-1, *first.shape[1:])


def stack(rows: Rows) -> tuple[np.ndarray, np.ndarray | None]:
    """Checked rows -> features [B, T, *shape] and mask [B, T] (None if unmasked)."""
    x = stack_rows([r[0] for r in rows])
    return x, None if rows[0][1] is None else stack_rows([r[1] for r in rows])  # type: ignore[misc]


def to_features(
    items: Sequence[InputFields], modality: str, bundle: Bundle, frontends: dict[str, FrontEnd], where: str = "inputs"
) -> tuple[np.ndarray, np.ndarray | None]:
    """INPUTs of one modality -> features float32 [B, T, *shape] and mask bool [B, T] (None if unmasked)."""
    result = featurize([prepare(items, modality, bundle, where)], bundle, frontends)[0]
    if isinstance(result, BadInput):
        raise result
    return stack(result)


def bundle_id(bundle: Bundle) -> str:
    """What identifies the codes a bundle makes: its weights (checkpoint hash) and front-ends."""
    m = bundle.manifest
    ident = {"checkpoint": m.checkpoint.sha256, "frontends": {k: v.frontend.model_dump() for k, v in m.modalities.items()}}
    return f"v{m.bundle_version}-" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def read_b64(path: str | Path) -> str:
    return pybase64.b64encode(Path(path).read_bytes()).decode()
