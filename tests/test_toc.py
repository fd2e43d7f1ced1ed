"""TOC: the dimensions that carry the shared signal are kept, the selection is deterministic, sizes are checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from srcid.model import SRCID, SRCIDConfig
from srcid.model.config import ModalitySpec
from srcid.training.evaluate import EncodedSplit, evaluate_encoded
from srcid.training.report import write_report
from srcid.training.toc import dimension_importance, select_dimensions, toc_size

C, T, D = 4, 5, 16
SIGNAL = [3, 7, 11]


def constructed(n: int, seed: int) -> EncodedSplit:
    """Audio and video agree on the class only in SIGNAL dims (unit scale). Elsewhere: independent noise of a
    LARGER scale (dims 0-2, 4-6, ...), a shared but nearly constant dim (0), and a high-variance dim that is
    anti-correlated across the modalities (1). Variance alone or similarity alone would pick wrongly."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, (n, T))
    prototypes = np.random.default_rng(0).standard_normal((C, len(SIGNAL))) * 1.5
    tiny = 0.01 * rng.standard_normal((n, T))
    vectors = {}
    for m in ("audio", "video"):
        x = 2.0 * rng.standard_normal((n, T, D))
        x[..., SIGNAL] = prototypes[labels] + 0.3 * rng.standard_normal((n, T, len(SIGNAL)))
        x[..., 0] = tiny
        vectors[m] = x.astype(np.float32)
    shared = 3.0 * rng.standard_normal((n, T))
    vectors["audio"][..., 1], vectors["video"][..., 1] = shared, -shared
    valid = {m: np.ones((n, T), bool) for m in vectors}
    valid["video"][:, -1] = False  # only steps valid in both modalities are paired
    return EncodedSplit(vectors, valid, {}, labels, [str(i) for i in range(n)])


def test_toc_keeps_the_signal_dimensions_and_is_deterministic():
    split = constructed(200, seed=1)
    importance = dimension_importance(split.vectors, split.valid)
    assert importance.shape == (D,)
    assert select_dimensions(importance, 3).tolist() == SIGNAL
    assert importance[1] == 0.0  # anti-correlated: no cross-modal similarity
    assert importance[0] < importance[SIGNAL].min() / 100  # similar but nearly constant
    again = dimension_importance(constructed(200, seed=1).vectors, split.valid)
    np.testing.assert_array_equal(importance, again)
    # ties go to the lower index, whatever the order of equal scores
    assert select_dimensions(np.array([1.0, 2.0, 2.0, 2.0, 0.5]), 2).tolist() == [1, 2]
    assert select_dimensions(np.zeros(6), 3).tolist() == [0, 1, 2]


@pytest.fixture
def one_thread():
    """Tiny probes run faster on one thread than on two contended ones; other tests get theirs back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_toc_report_holds_both_results_and_its_effect(tmp_path):
    cfg = SRCIDConfig(
        modalities={"audio": ModalitySpec(shape=(8,)), "video": ModalitySpec(shape=(8,))},
        T=T, hidden=D, heads=2, ff=32, codebook_size=8, club_hidden=8, layers=1,
    )  # fmt: skip
    train, test = constructed(300, seed=2), constructed(100, seed=3)
    for split in (train, test):
        split.codes = {m: [np.zeros((len(split.labels), T, 1), np.int64)] for m in split.vectors}
    report = evaluate_encoded(SRCID(cfg), train, test, C, seed=0, toc_dims=3)
    toc = report["toc"]
    assert toc["dims"] == 3 and toc["of"] == D and toc["selected"] == SIGNAL
    assert set(toc["classification"]) == set(report["classification"]) == {"a2v", "v2a", "a2a", "v2v"}
    # A probe learns to ignore the noise dims, so it loses nothing; the cosine of whole embeddings cannot, so
    # retrieval on the selected dims is far better.
    assert toc["summary"]["cross_modal_accuracy"] >= report["summary"]["cross_modal_accuracy"] - 0.01
    assert toc["summary"]["retrieval_r10"] > report["summary"]["retrieval_r10"] + 0.2
    effect = toc["effect"]["classification"]["a2v"]
    assert effect == pytest.approx(toc["classification"]["a2v"] - report["classification"]["a2v"])

    # an audio-video model: the Markdown and the plots carry just its two modalities
    paths = write_report(report, tmp_path)
    markdown = paths["markdown"].read_text()
    assert "| audio → video |" in markdown and "text" not in markdown
    assert "## TOC: 3 of 16 dimensions kept" in markdown
    assert all(paths[k].stat().st_size > 1000 for k in ("classification_plot", "retrieval_plot", "toc_plot"))


def test_toc_sizes_and_bad_input():
    assert toc_size(512) is None
    assert toc_size(512, dims=64) == 64
    assert toc_size(512, fraction=0.25) == 128
    assert toc_size(10, fraction=0.01) == 1
    for kwargs, message in (
        ({"dims": 0}, "toc_dims"), ({"dims": 513}, "toc_dims"), ({"fraction": 0.0}, "toc_fraction"),
        ({"fraction": 1.5}, "toc_fraction"), ({"dims": 4, "fraction": 0.5}, "not both"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            toc_size(512, **kwargs)
    with pytest.raises(ValueError, match="1..16"):
        select_dimensions(np.zeros(16), 17)
    with pytest.raises(ValueError, match="two paired modalities"):
        dimension_importance({"audio": np.zeros((2, T, D))}, {"audio": np.ones((2, T), bool)})
