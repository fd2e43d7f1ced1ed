"""Reader for the project's native shard folders (format in srcid/training/shards.py and docs/DATA.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from srcid.training.data.errors import DataError
from srcid.training.data.items import Item, check_item, fingerprint_of
from srcid.training.shards import ShardError, Shards, ShardSplit


class NativeDataset(Dataset):
    """One split of a native shard folder. Arrays stay memory-mapped: an item reads its rows from disk,
    so a 40k-clip set need not fit in RAM.

    Items: each modality float32 [T, *shape], "<m>_mask" bool [T] for masked modalities, optional
    "labels" int64 [T] or [].
    """

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        try:
            shards = Shards(self.root)
            self.split: ShardSplit = shards.split(split)
        except (ShardError, FileNotFoundError) as exc:
            raise DataError(str(exc)) from exc
        except KeyError as exc:  # unknown split; KeyError's str() would add quotes around the message
            raise DataError(exc.args[0]) from exc
        self.split_name = split
        self.T: int = shards.T
        self.modalities: dict[str, dict] = shards.modalities
        self.num_classes: int | None = shards.manifest.get("num_classes")
        self.ids: list[str] = self.split.ids
        self.fingerprint = fingerprint_of({"format": "srcid-shards", "data": shards.fingerprint, "split": split})

    def __getstate__(self) -> dict:
        # Pickling an np.memmap copies its data; a spawn-started worker would receive the whole split.
        return {"root": self.root, "split": self.split_name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], state["split"])

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> Item:
        source = f"{self.root / self.split_name} (clip {i}, id {self.ids[i]})"
        try:
            item = self.split[i]
        except OSError as exc:  # a shard file truncated or removed after open shows up as a failed page read
            raise DataError(f"{source}: cannot read ({exc})") from exc
        return check_item(item, self.modalities, self.T, source)

    def is_memory_mapped(self) -> bool:
        """True when every array is an np.memmap, i.e. nothing was loaded into RAM at open."""
        return all(isinstance(a, np.memmap) for a in self.split.arrays.values())
