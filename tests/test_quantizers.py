"""EMA codebook, MM-EMA, dead-code re-seeding, RVQ-n and FSQ."""

import math

import pytest
import torch

from srcid.model.quantizers import (
    EMACodebook,
    FiniteScalarQuantizer,
    ResidualVectorQuantizer,
    VectorQuantizer,
    multimodal_targets,
)


def _clusters(n_centres: int, dim: int, per: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_centres, dim, generator=g) * 5
    points = centres.repeat_interleave(per, 0) + spread * torch.randn(n_centres * per, dim, generator=g)
    return centres, points


def test_ema_codebook_converges_to_cluster_centres_and_uses_codes():
    torch.manual_seed(0)
    centres, points = _clusters(8, 6, 64, 0.05, seed=1)
    book = EMACodebook(16, 6, decay=0.8, eps=1e-5, dead_after=5)
    for _ in range(200):
        idx = book.nearest(points)
        book.update(points, idx, torch.ones(len(points)), points)
    idx = book.nearest(points)
    used = idx.unique().numel() / book.size
    nearest_code = torch.cdist(centres, book.embedding).min(1).values
    assert used > 0.9, f"only {used:.0%} of codes in use"
    # Two codes may split one tight cluster; each still sits within the cluster's spread of its centre.
    assert nearest_code.max() < 0.2, nearest_code


def test_dead_code_is_reseeded_with_embedding_count_and_sum_together_and_comes_back():
    torch.manual_seed(0)
    _, points = _clusters(4, 3, 50, 0.1, seed=2)
    book = EMACodebook(4, 3, decay=0.9, eps=1e-5, dead_after=3)
    book.update(points, book.nearest(points), torch.ones(len(points)), points)  # data init
    # Kill code 0: push it far away so nothing picks it.
    book.reseed(torch.tensor([True, False, False, False]), torch.full((4, 3), 1e3))
    assert (book.nearest(points) != 0).all()
    for _ in range(3):
        book.update(points, book.nearest(points), torch.ones(len(points)), points)
    # After dead_after unused updates it was re-seeded from data: all three statistics agree.
    assert book.embedding[0].abs().max() < 100, book.embedding[0]
    assert book.ema_count[0] == pytest.approx(1.0)
    assert torch.allclose(book.ema_sum[0], book.embedding[0] * book._smoothed_count()[0], atol=1e-4)
    # The next EMA step keeps the seed (the authors' bug: reset only the embedding, and EMA restores 1e3).
    for _ in range(5):
        book.update(points, book.nearest(points), torch.ones(len(points)), points)
    assert book.embedding[0].abs().max() < 100
    assert (book.nearest(points) == 0).any(), "re-seeded code never came back into use"


def _hand_built_quantizer(vectors):
    vq = VectorQuantizer(size=len(vectors), dim=2, decay=0.0, eps=1e-8, dead_after=100)
    vq.book.embedding.copy_(torch.tensor(vectors))
    vq.book.ema_sum.copy_(torch.tensor(vectors))
    vq.book.initialized.fill_(True)
    return vq


def test_mm_ema_mixes_paired_vectors_half_quarter_quarter():
    vq = _hand_built_quantizer([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    z = {"audio": torch.tensor([[9.0, 1.0]]), "video": torch.tensor([[1.0, 9.0]]), "text": torch.tensor([[-9.0, -8.0]])}
    idx = {m: vq(v)[1] for m, v in z.items()}
    assert [int(idx[m]) for m in z] == [0, 1, 2]
    vq.update(z, idx, {m: torch.ones(1, dtype=torch.bool) for m in z})
    a, v, t = z["audio"][0], z["video"][0], z["text"][0]
    assert torch.allclose(vq.book.embedding[0], 0.5 * a + 0.25 * v + 0.25 * t, atol=1e-4)
    assert torch.allclose(vq.book.embedding[1], 0.5 * v + 0.25 * a + 0.25 * t, atol=1e-4)
    assert torch.allclose(vq.book.embedding[2], 0.5 * t + 0.25 * a + 0.25 * v, atol=1e-4)


def test_mm_ema_masked_partner_gives_its_share_to_the_modality_itself():
    z = {"audio": torch.tensor([[1.0, 0.0]]), "video": torch.tensor([[0.0, 1.0]]), "text": torch.tensor([[5.0, 5.0]])}
    valid = {"audio": torch.tensor([True]), "video": torch.tensor([True]), "text": torch.tensor([False])}
    mixed = multimodal_targets(z, valid)
    assert torch.allclose(mixed["audio"][0], torch.tensor([0.75, 0.25]))
    two = multimodal_targets({"audio": z["audio"], "video": z["video"]}, valid)
    assert torch.allclose(two["audio"][0], torch.tensor([0.5, 0.5]))


def test_rvq_reconstruction_error_falls_as_stages_grow():
    torch.manual_seed(0)
    x = torch.randn(2048, 16)
    errors = []
    for n in (1, 2, 3, 4):
        rvq = ResidualVectorQuantizer(n, size=32, dim=16, decay=0.8, eps=1e-5, dead_after=10)
        for _ in range(40):
            _, idx = rvq(x)
            rvq.update({"audio": x, "video": x}, {"audio": idx, "video": idx}, {m: torch.ones(len(x), dtype=torch.bool) for m in ("audio", "video")})
        q, idx = rvq(x)
        assert idx.shape == (2048, n)
        errors.append(float((rvq.decode(idx) - x).pow(2).mean()))
    assert all(b < a * 0.97 for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("levels", [(5, 5, 4, 4), (4, 3, 2)])
def test_fsq_lies_on_its_grid_and_passes_gradients_straight_through(levels):
    torch.manual_seed(0)
    fsq = FiniteScalarQuantizer(levels, dim=8)
    h = (3 * torch.randn(500, len(levels))).requires_grad_()
    grid = fsq.quantize(h)
    half = torch.tensor(levels) // 2
    scaled = grid.detach() * half
    assert torch.allclose(scaled, scaled.round(), atol=1e-5), "not on the integer grid"
    assert (scaled.round() >= -half).all() and (scaled.round() <= torch.tensor(levels) - 1 - half).all()
    grid.sum().backward()
    assert h.grad is not None and (h.grad.abs() > 0).float().mean() > 0.5
    # Index <-> grid is a bijection over all 400 codes.
    idx = fsq.grid_to_index(grid.detach())
    assert idx.min() >= 0 and idx.max() < math.prod(levels)
    assert torch.allclose(fsq.index_to_grid(idx), grid.detach(), atol=1e-6)
    all_idx = torch.arange(math.prod(levels))
    assert torch.equal(fsq.grid_to_index(fsq.index_to_grid(all_idx)), all_idx)
