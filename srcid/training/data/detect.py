"""`open_dataset`: one entry point that recognises a data folder's format and returns its reader."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from srcid.training.data.ave import AVEECCV18
from srcid.training.data.errors import DataError
from srcid.training.data.items import ItemDataset
from srcid.training.data.native import NativeDataset
from srcid.training.data.vggsound import CSV_NAME, VGGSoundAVEL

# marker file -> reader; a folder is recognised by the first marker it holds.
MARKERS: list[tuple[str, type]] = [
    ("manifest.json", NativeDataset),
    (CSV_NAME, VGGSoundAVEL),
    ("audio_feature.h5", AVEECCV18),
]
SYNTHETIC = "synthetic"


def _check_options(options: dict[str, Any], spec: str, accepted: set[str]) -> None:
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DataError(f"{spec}: unknown option(s) {unknown}; this format accepts {sorted(accepted)}")


def _keyword_names(fn: Any, exclude: tuple[str, ...] = ()) -> set[str]:
    return {k for k, p in inspect.signature(fn).parameters.items() if p.kind is not p.VAR_KEYWORD} - set(exclude)


def open_dataset(spec: str | Path, split: str, **options: Any) -> ItemDataset:
    """Open `split` of the data at `spec` with the reader its format needs.

    spec: a native shard folder (holds manifest.json), a VGGSound-AVEL40K folder (holds vggsound-avel40k.csv),
    an AVE-ECCV18 folder (holds audio_feature.h5), or one of those marker files; or the word "synthetic"
    for the generated paired set of srcid.training.synthetic (options: n_clips, T, num_classes, dims, ...).
    options: passed to the reader (e.g. zip_dirs=, text_encoder= for VGGSound-AVEL40K).
    """
    if str(spec) == SYNTHETIC:
        # Imported here: synthetic builds on this package, so a top-level import would be circular.
        from srcid.training.synthetic import make_synthetic, synthetic_split

        _check_options(options, SYNTHETIC, _keyword_names(make_synthetic, exclude=("stream",)))
        return synthetic_split(split, **options)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    folder = path.parent if path.is_file() else path
    for marker, reader in MARKERS:
        if (folder / marker).is_file():
            _check_options(options, str(folder), _keyword_names(reader, exclude=("root", "split")))
            return reader(folder, split, **options)
    raise DataError(
        f"{folder}: not a data folder srcid can read; expected one of "
        f"{[m for m, _ in MARKERS]} in it (native shards, VGGSound-AVEL40K, AVE-ECCV18), or {SYNTHETIC!r}"
    )
