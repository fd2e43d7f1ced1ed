"""Evaluation metrics on constructed inputs whose answers are known: ranks, recalls, probes, chance, codebook."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from srcid.model import SRCID, SRCIDConfig
from srcid.model.config import ModalitySpec
from srcid.training.evaluate import (
    EncodedSplit,
    chance_levels,
    clip_embeddings,
    codebook_figures,
    cross_modal_probes,
    fit_probe,
    ranks_of_positives,
    recall_figures,
    zero_shot_retrieval,
)

C, T, D = 5, 6, 12


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny probes are slower on two contended threads than on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def paired_split(n: int, seed: int, *, shuffle_video: bool = False, noise: float = 0.4) -> EncodedSplit:
    """Per-step class prototypes plus noise; audio, video and text carry IDENTICAL vectors (video optionally
    from other clips and steps, so that it no longer matches the labels)."""
    rng = np.random.default_rng(seed)
    prototypes = np.random.default_rng(99).standard_normal((C, D))
    labels = rng.integers(0, C, (n, T))
    x = (prototypes[labels] + noise * rng.standard_normal((n, T, D))).astype(np.float32)
    video = x.reshape(n * T, D)[rng.permutation(n * T)].reshape(n, T, D) if shuffle_video else x
    valid = np.ones((n, T), bool)
    text_valid = valid.copy()
    text_valid[: n // 4, -2:] = False  # masked steps are left out of probes and embeddings
    return EncodedSplit(
        vectors={"audio": x, "video": video, "text": x.copy()},
        valid={"audio": valid, "video": valid.copy(), "text": text_valid},
        codes={},
        labels=labels,
        ids=[f"clip-{i}" for i in range(n)],
    )


def test_ranks_and_recalls_on_a_hand_built_similarity_matrix():
    sim = np.array([
        [0.9, 0.1, 0.5, 0.0],   # own clip best -> rank 1
        [0.8, 0.2, 0.7, 0.1],   # two keys above -> rank 3
        [0.3, 0.3, 0.3, 0.3],   # all tied -> ties count against: rank 4
        [0.1, 0.6, 0.2, 0.5],   # one above -> rank 2
    ])  # fmt: skip
    ranks = ranks_of_positives(sim, np.eye(4, dtype=bool))
    assert ranks.tolist() == [1, 3, 4, 2]
    figures = recall_figures(ranks)
    assert figures == {"r1": 0.25, "r5": 1.0, "r10": 1.0, "medr": 2.5}
    assert recall_figures(np.array([1, 2, 6, 7, 11, 30]))["r5"] == pytest.approx(2 / 6)
    assert recall_figures(np.array([1, 2, 6, 7, 11, 30]))["r10"] == pytest.approx(4 / 6)

    # With several positives the best-scoring one counts; other positives are not "above" it.
    positives = np.eye(4, dtype=bool)
    positives[1, 0] = True
    assert ranks_of_positives(sim, positives)[1] == 1
    with pytest.raises(ValueError, match="positive"):
        ranks_of_positives(sim, np.zeros((4, 4), bool))


def test_identical_modalities_give_perfect_retrieval_and_cross_modal_equal_to_unimodal():
    train, test = paired_split(120, seed=1), paired_split(60, seed=2)
    probes = cross_modal_probes(train, test, C, seed=0)
    acc, f1 = probes["accuracy"], probes["macro_f1"]
    assert list(f1) == list(acc)
    assert f1["a2v"] == f1["a2a"] > 0.9
    assert list(acc) == ["a2v", "v2a", "a2t", "t2a", "v2t", "t2v", "a2a", "v2v", "t2t"]
    assert acc["a2a"] > 0.9
    assert acc["a2v"] == acc["a2a"]  # the same probe on the same vectors
    assert acc["v2a"] == acc["v2v"]
    retrieval = zero_shot_retrieval(test)
    assert list(retrieval) == ["t2a", "t2v", "a2v", "a2t", "v2t", "v2a"]
    assert retrieval["a2v"] == {"r1": 1.0, "r5": 1.0, "r10": 1.0, "medr": 1.0}
    assert retrieval["v2a"]["r1"] == 1.0
    # text lacks two steps in the first quarter of the clips; the other three quarters match exactly
    assert 0.75 <= retrieval["t2a"]["r1"] < 1.0


def test_shuffled_pairing_falls_to_chance():
    train, test = paired_split(120, seed=1), paired_split(60, seed=2, shuffle_video=True)
    probes = cross_modal_probes(train, test, C, seed=0)
    acc, f1 = probes["accuracy"], probes["macro_f1"]
    assert acc["a2a"] > 0.9 and f1["a2a"] > 0.9
    assert acc["a2v"] < 0.35 and f1["a2v"] < 0.35  # chance is 1/5
    retrieval = zero_shot_retrieval(test)
    assert retrieval["a2v"]["r1"] < 0.1
    assert retrieval["a2v"]["medr"] > 10


def test_a_collapsed_encoder_scores_the_worst_rank_not_the_best():
    split = paired_split(30, seed=3)
    split.vectors = {m: np.ones_like(v) for m, v in split.vectors.items()}
    retrieval = zero_shot_retrieval(split)
    assert retrieval["a2v"] == {"r1": 0.0, "r5": 0.0, "r10": 0.0, "medr": 30.0}


def test_label_match_counts_clips_with_the_same_label_sequence():
    split = paired_split(4, seed=4)
    split.labels[:] = np.array([[0] * T, [0] * T, [1] * T, [2] * T])
    split.vectors = {m: np.ones_like(v) for m, v in split.vectors.items()}
    for m in split.vectors:  # clips 0 and 1 have one embedding, different from the rest
        split.vectors[m][0:2, :, 0] = 5.0
        split.vectors[m][2, :, 1] = 5.0
        split.vectors[m][3, :, 2] = 5.0
    strict = zero_shot_retrieval(split, match="clip")["a2v"]
    by_labels = zero_shot_retrieval(split, match="labels")["a2v"]
    assert strict["r1"] == 0.5  # clips 0 and 1 tie with each other: rank 2
    assert by_labels["r1"] == 1.0
    with pytest.raises(ValueError, match="match"):
        zero_shot_retrieval(split, match="fuzzy")


def test_probe_is_deterministic_and_learns_a_separable_problem():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    x = (np.eye(3)[y] * 3 + rng.standard_normal((600, 3))).astype(np.float32)
    x = np.concatenate([x, rng.standard_normal((600, 5)).astype(np.float32)], 1)
    groups = np.arange(600) // 6
    a = fit_probe(x, y, groups, 3, seed=7)
    b = fit_probe(x, y, groups, 3, seed=7)
    assert torch.equal(a.linear.weight, b.linear.weight)
    assert (a.predict(x) == y).mean() > 0.9


def test_clip_embeddings_match_the_model_retrieval_embedding():
    torch.manual_seed(0)
    cfg = SRCIDConfig(
        modalities={"audio": ModalitySpec(shape=(8,)), "text": ModalitySpec(shape=(6,), masked=True)},
        T=4, hidden=16, heads=2, ff=32, codebook_size=8, club_hidden=8,
    )  # fmt: skip
    model = SRCID(cfg).eval()
    x = torch.randn(5, 4, 6)
    mask = torch.tensor([[True] * 4] * 3 + [[True, True, False, False]] * 2)
    _, vectors, valid = model.quantized_steps("text", x, mask)
    expected = model.encode("text", x, mask)["embedding"].numpy()
    np.testing.assert_allclose(clip_embeddings(vectors.numpy(), valid.numpy()), expected, atol=1e-5)


def test_codebook_figures_and_chance_levels():
    cfg = SRCIDConfig(
        modalities={"audio": ModalitySpec(shape=(8,)), "video": ModalitySpec(shape=(8,))},
        T=T, hidden=16, heads=2, ff=32, codebook_size=8, club_hidden=8, layers=1,
    )  # fmt: skip
    split = paired_split(8, seed=5)
    del split.vectors["text"], split.valid["text"]
    # codes 0..3 used equally often, 4..7 never; a masked step's code must not count
    codes = (np.arange(8 * T).reshape(8, T) % 4)[..., None]
    split.codes = {"audio": [codes], "video": [codes.copy()]}
    split.valid["video"][0, 0] = False
    split.codes["video"][0][0, 0, 0] = 7
    flat = np.arange(8 * T).reshape(8, T)
    split.labels = (flat // 4) % 2  # each code sees labels 0 and 1 equally often
    figures = codebook_figures(SRCID(cfg), split)
    assert figures["layer1_usage"] == 0.5
    assert figures["layer1_perplexity"] == pytest.approx(4.0, rel=1e-3)
    assert figures["layer2_usage"] is None and figures["layer2_perplexity"] is None
    audio = figures["by_modality"]["audio"]
    assert audio["layer1_usage"] == 0.5 and audio["layer1_purity"] == 0.5 and audio["layer2_purity"] is None
    split.labels = flat % 2  # now a code fixes the label
    assert codebook_figures(SRCID(cfg), split)["by_modality"]["video"]["layer1_purity"] == 1.0

    split.labels[:] = 1
    split.labels[0, :2] = 0
    chance = chance_levels(split, split, num_classes=C)
    assert chance["majority_class"] == 1
    assert chance["classification"]["a2v"] == pytest.approx(1 - 1 / (8 * T - 1))  # video's masked step is out
    assert chance["uniform"] == 1 / C
    assert chance["retrieval"] == {"r1": 1 / 8, "r5": 5 / 8, "r10": 1.0, "medr": 4.5}
