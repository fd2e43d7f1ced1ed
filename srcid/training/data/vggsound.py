"""Reader for the authors' VGGSound-AVEL40K layout, so a user with their downloads trains unchanged.

    ROOT/vggsound-avel40k.csv             category, video_id, split   (header row optional)
    ROOT/vggsoundCategories2Prompts.csv   category, prompt            (header row optional; only with text)
    ROOT/VggsoundAVEL40kCategories.txt    one category per line       (optional: fixes the label order)
    ROOT/<zip dir>/<video_id>.zip         one pickle per zip

`zip_dirs` says where the zips are. One folder for all modalities (default "zips"): each zip's pickle is a
dict {"audio": [10, 128], "video": [10, 7, 7, 512]}. A folder per modality ({"audio": "audio_zips",
"video": "video_zips"}, the authors' own download): each zip's pickle is that modality's bare array.
Pickles are read by srcid.training.restricted_pickle (numpy arrays and plain containers only).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from srcid.training.data.errors import DataError
from srcid.training.data.items import Item, check_item, fingerprint_of
from srcid.training.restricted_pickle import ForbiddenPickleError, load_restricted

log = logging.getLogger(__name__)

CSV_NAME = "vggsound-avel40k.csv"
PROMPTS_NAME = "vggsoundCategories2Prompts.csv"
CATEGORIES_NAME = "VggsoundAVEL40kCategories.txt"
AV_MODALITIES = ("audio", "video")

# texts [N] -> (features float [N, T, D], mask bool [N, T]; True = a real step), as a tuple or as an object
# with .values and .mask (the Features that srcid.model.frontends text front-ends return)
TextEncoder = Callable[[list[str]], Any]


@dataclass(frozen=True)
class Clip:
    video_id: str
    category: int


def _read_csv(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, stripped cells) of the non-empty rows."""
    if not path.is_file():
        raise DataError(f"{path}: missing")
    with open(path, newline="", encoding="utf-8") as f:
        return [(n, [c.strip() for c in row]) for n, row in enumerate(csv.reader(f), 1) if any(c.strip() for c in row)]


def read_clip_table(path: Path) -> list[tuple[str, str, str]]:
    """(category, video_id, split) rows of `vggsound-avel40k.csv`, with or without a header row."""
    rows = _read_csv(path)
    columns = (0, 1, 2)
    if rows and {"category", "video_id", "split"} <= {c.lower() for c in rows[0][1]}:
        header = [c.lower() for c in rows[0][1]]
        columns = (header.index("category"), header.index("video_id"), header.index("split"))
        rows = rows[1:]
    out = []
    for line, cells in rows:
        if len(cells) <= max(columns):
            raise DataError(f"{path}:{line}: {len(cells)} columns, expected category, video_id, split")
        out.append(tuple(cells[c] for c in columns))
    if not out:
        raise DataError(f"{path}: no clips listed")
    return out


def read_prompts(path: Path) -> dict[str, str]:
    """category -> prompt from a two-column csv, with or without a header row."""
    rows = _read_csv(path)
    if rows and rows[0][1][0].lower() in ("category", "label") and len(rows[0][1]) >= 2:
        rows = rows[1:]
    prompts = {}
    for line, cells in rows:
        if len(cells) < 2 or not cells[1]:
            raise DataError(f"{path}:{line}: expected category, prompt")
        prompts[cells[0]] = cells[1]
    return prompts


def read_zip_pickle(path: Path) -> Any:
    """The object pickled in the one `.pkl` member of zip `path`, through the restricted unpickler."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if not n.endswith("/") and (".pkl" in n or n.endswith(".pickle"))]
            if len(members) != 1:
                raise DataError(f"{path}: holds {len(members)} pickle files {members[:3]}, expected exactly one")
            data = zf.read(members[0])
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise DataError(f"{path}: corrupt or unreadable zip ({exc})") from exc
    source = f"{path}:{members[0]}"
    try:
        return load_restricted(data, source)
    except ForbiddenPickleError as exc:
        raise DataError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - a malformed pickle can raise almost any type; all are bad data
        raise DataError(f"{source}: not a readable pickle ({type(exc).__name__}: {exc})") from exc


def _fit_time(x: np.ndarray, T: int) -> np.ndarray:
    # The authors' features are sometimes a step or two short (audio shorter than the video); they repeat
    # the last step, and cut longer ones, and so do we.
    if x.shape[0] >= T:
        return x[:T]
    return np.concatenate([x, np.repeat(x[-1:], T - x.shape[0], axis=0)], axis=0)


class VGGSoundAVEL(Dataset):
    """One split of a VGGSound-AVEL40K folder.

    Items: "audio" float32 [T, 128], "video" float32 [T, 7, 7, 512] (shapes are read from the first clip
    unless `shapes` is given), "labels" int64 [] = the category index, and with a `text_encoder`
    "text" float32 [T, D] + "text_mask" bool [T] = the category's prompt, encoded once at open.

    Args:
        root: the folder holding vggsound-avel40k.csv.
        split: a value of the csv's split column ("train", "val", "test").
        zip_dirs: one folder (relative to root, or absolute) for all modalities, or {modality: folder}.
        text_encoder: the text front-end; without it the items are audio + video only.
        prompts_csv: category -> prompt csv (default ROOT/vggsoundCategories2Prompts.csv).
        categories: label order, as a list or a one-per-line file (default ROOT/VggsoundAVEL40kCategories.txt
            if present, else the csv's categories sorted).
        T: steps per clip.
        shapes: expected feature shape per modality without T, e.g. {"audio": [128], "video": [7, 7, 512]}.
        fit_time: pad short clips by repeating the last step and cut long ones (as the authors do);
            when False a clip with another step count is an error.
        check_files: stat every zip of the split at open (a missing zip is reported before training starts).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        zip_dirs: str | Mapping[str, str] = "zips",
        text_encoder: TextEncoder | None = None,
        prompts_csv: str | Path | None = None,
        categories: Sequence[str] | str | Path | None = None,
        T: int = 10,
        shapes: Mapping[str, Sequence[int]] | None = None,
        fit_time: bool = True,
        check_files: bool = True,
    ):
        self.root = Path(root)
        self.T = T
        self.fit_time = fit_time
        csv_path = self.root / CSV_NAME
        table = read_clip_table(csv_path)
        self.categories = self._categories(categories, table, csv_path)
        index = {c: k for k, c in enumerate(self.categories)}
        splits = sorted({s for _, _, s in table})
        if split not in splits:
            raise DataError(f"{csv_path}: no clips in split {split!r} (splits: {splits})")
        self.clips = [Clip(vid, index[cat]) for cat, vid, s in table if s == split]
        self.ids = [c.video_id for c in self.clips]
        self.num_classes: int | None = len(self.categories)

        dirs = {m: zip_dirs for m in AV_MODALITIES} if isinstance(zip_dirs, str) else dict(zip_dirs)
        if set(dirs) != set(AV_MODALITIES):
            raise DataError(f"zip_dirs must name a folder for {list(AV_MODALITIES)}, got {sorted(dirs)}")
        self.groups: dict[Path, list[str]] = {}
        for m in AV_MODALITIES:
            self.groups.setdefault(self.root / dirs[m], []).append(m)
        sizes = self._check_zips(split) if check_files else None

        self.modalities: dict[str, dict] = {}
        first = self._load_av(0, self._expect_shapes(shapes))
        for m in AV_MODALITIES:
            self.modalities[m] = {"shape": list(first[m].shape[1:]), "masked": False}

        self._text: np.ndarray | None = None
        self._text_mask: np.ndarray | None = None
        if text_encoder is not None:
            self._encode_prompts(text_encoder, prompts_csv, table)
        self.fingerprint = fingerprint_of(
            {
                "format": "vggsound-avel40k",
                "csv_sha256": hashlib.sha256(csv_path.read_bytes()).hexdigest(),
                "split": split,
                "categories": self.categories,
                "zip_dirs": {m: str(d) for m, d in dirs.items()},
                "zip_sizes": sizes,
                "text_sha256": None if self._text is None else hashlib.sha256(self._text.tobytes()).hexdigest(),
            }
        )

    def _categories(
        self, categories: Sequence[str] | str | Path | None, table: list[tuple[str, str, str]], csv_path: Path
    ) -> list[str]:
        if categories is None and (self.root / CATEGORIES_NAME).is_file():
            categories = self.root / CATEGORIES_NAME
        if isinstance(categories, (str, Path)):
            path = Path(categories)
            if not path.is_file():
                raise DataError(f"{path}: category list missing")
            categories = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            source = str(path)
        elif categories is None:
            return sorted({c for c, _, _ in table})
        else:
            source = "the categories option"
        unknown = sorted({c for c, _, _ in table} - set(categories))
        if unknown:
            raise DataError(f"{csv_path}: categories not in {source}: {unknown[:5]} ({len(unknown)} in all)")
        return list(categories)

    def _zip_path(self, folder: Path, video_id: str) -> Path:
        return folder / f"{video_id}.zip"

    def _check_zips(self, split: str) -> list[int]:
        sizes, missing = [], []
        for clip in self.clips:
            for folder in self.groups:
                path = self._zip_path(folder, clip.video_id)
                try:
                    sizes.append(path.stat().st_size)
                except FileNotFoundError:
                    missing.append(path)
        if missing:
            raise DataError(
                f"{self.root}: {len(missing)} feature zip(s) of split {split!r} missing, "
                f"e.g. {[str(p) for p in missing[:3]]}"
            )
        return sizes

    def _expect_shapes(self, shapes: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]] | None:
        if shapes is None:
            return None
        return {m: (self.T, *shapes[m]) for m in AV_MODALITIES}

    def _load_av(self, i: int, expected: dict[str, tuple[int, ...]] | None) -> Item:
        """Audio and video of clip i, float32 [T, *shape]; `expected` full shapes, or None to accept any."""
        video_id = self.clips[i].video_id
        item: Item = {}
        for folder, names in self.groups.items():
            path = self._zip_path(folder, video_id)
            content = read_zip_pickle(path)
            for name in names:
                x = self._extract(content, name, len(names) == 1, path)
                if self.fit_time:
                    x = _fit_time(x, self.T)
                if expected is not None and x.shape != expected[name]:
                    raise DataError(f"{path}: {name} has shape {list(x.shape)}, expected {list(expected[name])}")
                item[name] = x
        return item

    @staticmethod
    def _extract(content: Any, name: str, alone: bool, path: Path) -> np.ndarray:
        if isinstance(content, Mapping):
            if name not in content:
                raise DataError(f"{path}: pickle has no {name!r} entry (keys: {sorted(map(str, content))})")
            x = content[name]
        elif alone:
            x = content
        else:
            raise DataError(f"{path}: pickle holds a {type(content).__name__}, expected a dict with {name!r}")
        if not isinstance(x, np.ndarray) or x.dtype.kind not in "fiu":
            raise DataError(f"{path}: {name} is {type(x).__name__} {getattr(x, 'dtype', '')}, expected a numeric array")
        if x.ndim < 2 or x.shape[0] == 0:
            raise DataError(f"{path}: {name} has shape {list(x.shape)}, expected [T, features...]")
        return x.astype(np.float32)

    def _encode_prompts(
        self, text_encoder: TextEncoder, prompts_csv: str | Path | None, table: list[tuple[str, str, str]]
    ) -> None:
        path = Path(prompts_csv) if prompts_csv is not None else self.root / PROMPTS_NAME
        prompts = read_prompts(path)
        used = sorted({c for c, _, _ in table})
        missing = [c for c in used if c not in prompts]
        if missing:
            raise DataError(f"{path}: no prompt for categories {missing[:5]} ({len(missing)} in all)")
        # A category from the label list that no clip uses needs no prompt; its name stands in (never read).
        texts = [prompts.get(c, c) for c in self.categories]
        out = text_encoder(texts)
        feats, mask = (out.values, out.mask) if hasattr(out, "mask") else out
        feats, mask = np.asarray(feats, dtype=np.float32), np.asarray(mask)
        if feats.ndim != 3 or feats.shape[:2] != (len(texts), self.T):
            raise DataError(f"text encoder returned features {list(feats.shape)}, expected [{len(texts)}, {self.T}, D]")
        if mask.shape != (len(texts), self.T) or mask.dtype != np.bool_:
            raise DataError(f"text encoder returned mask {mask.dtype} {list(mask.shape)}, expected bool [{len(texts)}, {self.T}]")
        if not np.isfinite(feats).all():
            raise DataError(f"text encoder returned NaN or inf features for the prompts of {path}")
        self._text, self._text_mask = feats, mask
        self.modalities["text"] = {"shape": [feats.shape[2]], "masked": True}
        log.info("encoded %d prompts from %s: text features %s", len(texts), path, list(feats.shape))

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> Item:
        clip = self.clips[i]
        expected = {m: (self.T, *self.modalities[m]["shape"]) for m in AV_MODALITIES}
        item = self._load_av(i, expected)
        if self._text is not None:
            item["text"] = self._text[clip.category]
            item["text_mask"] = self._text_mask[clip.category]
        item["labels"] = np.asarray(clip.category, dtype=np.int64)
        source = ", ".join(str(self._zip_path(folder, clip.video_id)) for folder in self.groups)
        return check_item(item, self.modalities, self.T, source)
