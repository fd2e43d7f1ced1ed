"""collate and make_loader: batch layout, seeded and resumable order, worker count and rank independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from srcid.training.data import DataError, SeededSampler, collate, make_loader
from srcid.training.synthetic import make_synthetic


class Indexed(torch.utils.data.Dataset):
    """Clip i has audio filled with i, so a batch tells which clips it holds."""

    T = 4
    modalities = {"audio": {"shape": [3], "masked": False}}

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"audio": np.full((self.T, 3), i, np.float32), "labels": np.array([i % 5], np.int64)}


def _order(loader) -> list[int]:
    return [int(v) for b in loader for v in b["audio"][:, 0, 0]]


def test_collate_layout_and_dtypes():
    ds = make_synthetic(5, T=6, dims={"audio": 4, "video": (2, 3), "text": 5}, seed=3)
    batch = collate([ds[i] for i in range(5)])
    assert set(batch) == {"audio", "video", "text", "text_mask", "labels"}
    assert batch["audio"].shape == (5, 6, 4) and batch["audio"].dtype == torch.float32
    assert batch["video"].shape == (5, 6, 2, 3)
    assert batch["text_mask"].shape == (5, 6) and batch["text_mask"].dtype == torch.bool
    assert batch["labels"].shape == (5, 6) and batch["labels"].dtype == torch.int64
    np.testing.assert_array_equal(batch["video"][2].numpy(), ds[2]["video"])
    per_clip = collate([{"labels": np.array([3])}, {"labels": np.array(4)}])
    assert per_clip["labels"].tolist() == [3, 4]


def test_collate_rejects_inconsistent_items():
    a = {"audio": np.zeros((4, 3), np.float32)}
    with pytest.raises(DataError, match=r"item 1 has keys \['video'\], item 0 has \['audio'\]"):
        collate([a, {"video": np.zeros((4, 3), np.float32)}])
    with pytest.raises(DataError, match=r"audio has different shapes in one batch: \[\[4, 2\], \[4, 3\]\]"):
        collate([a, {"audio": np.zeros((4, 2), np.float32)}])
    with pytest.raises(DataError, match="empty batch"):
        collate([])


def test_same_seed_same_order_other_seed_other_order_and_epochs_differ():
    ds = Indexed(23)
    first = make_loader(ds, batch_size=4, shuffle=True, seed=7)
    epoch0, epoch1 = _order(first), _order(first)
    assert sorted(epoch0) == list(range(23)) and sorted(epoch1) == list(range(23))
    assert epoch0 != list(range(23)) and epoch1 != epoch0
    again = make_loader(ds, batch_size=4, shuffle=True, seed=7)
    assert _order(again) == epoch0 and _order(again) == epoch1
    assert _order(make_loader(ds, batch_size=4, shuffle=True, seed=8)) != epoch0
    assert _order(make_loader(ds, batch_size=4, shuffle=False, seed=7)) == list(range(23))


def test_resume_mid_epoch_continues_with_the_same_batches():
    ds = Indexed(30)
    full = make_loader(ds, batch_size=4, shuffle=True, seed=1, drop_last=True)
    _order(full)
    epoch1 = [b["audio"][:, 0, 0].tolist() for b in full]
    resumed = make_loader(ds, batch_size=4, shuffle=True, seed=1, drop_last=True)
    resumed.sampler.set_epoch(1, offset=3 * 4)  # three batches of epoch 1 were done before the interruption
    assert [b["audio"][:, 0, 0].tolist() for b in resumed] == epoch1[3:]


def test_workers_do_not_change_the_batches():
    ds = make_synthetic(40, seed=2)
    serial = list(make_loader(ds, batch_size=8, shuffle=True, seed=4, num_workers=0))
    parallel = list(make_loader(ds, batch_size=8, shuffle=True, seed=4, num_workers=2))
    assert len(serial) == len(parallel) == 5
    for a, b in zip(serial, parallel, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key])


@pytest.mark.parametrize(("n", "drop_last"), [(24, False), (25, False), (25, True)])
def test_ranks_split_an_epoch(n, drop_last):
    ranks = [SeededSampler(n, shuffle=True, seed=5, rank=r, world_size=3, drop_last=drop_last) for r in range(3)]
    parts = [list(s) for s in ranks]
    assert len({len(p) for p in parts}) == 1 and all(len(p) == len(s) for p, s in zip(parts, ranks, strict=True))
    seen = [i for p in parts for i in p]
    if n % 3 == 0:
        assert sorted(seen) == list(range(n))
    elif drop_last:
        assert len(seen) == 24 and len(set(seen)) == 24
    else:
        assert set(seen) == set(range(n)) and len(seen) == 27  # padded by wrapping, like DistributedSampler
    with pytest.raises(ValueError, match="rank 3 outside world_size 3"):
        SeededSampler(n, shuffle=True, seed=5, rank=3, world_size=3)
