"""Training data: readers for the three formats of DESIGN §4, the ITEM contract, batching.

    ds = open_dataset("data/avdigits", "train")          # native shards / VGGSound-AVEL40K / AVE-ECCV18
    loader = make_loader(ds, batch_size=80, shuffle=True, seed=0, num_workers=2)
    for batch in loader: ...                            # {"audio": [B, T, 128], "text_mask": [B, T], ...}
"""

from srcid.training.data.ave import AVEECCV18
from srcid.training.data.detect import open_dataset
from srcid.training.data.errors import DataError
from srcid.training.data.items import Item, ItemDataset, check_item, fingerprint_of, mask_key
from srcid.training.data.loader import SeededSampler, collate, make_loader
from srcid.training.data.native import NativeDataset
from srcid.training.data.vggsound import TextEncoder, VGGSoundAVEL

__all__ = [
    "AVEECCV18",
    "DataError",
    "Item",
    "ItemDataset",
    "NativeDataset",
    "SeededSampler",
    "TextEncoder",
    "VGGSoundAVEL",
    "check_item",
    "collate",
    "fingerprint_of",
    "make_loader",
    "mask_key",
    "open_dataset",
]
