"""CLUB, cross-modal CPC and L_cmcm on data whose answer is known."""

import math

import torch

from srcid.model.club import CLUB
from srcid.model.cmcm import cmcm_loss
from srcid.model.cpc import CrossModalCPC


def _gaussian_pairs(n, d, rho, g):
    x = torch.randn(n, d, generator=g)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=g)
    return x, y


def _fitted_club_bound(rho: float, d: int = 4) -> float:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    club = CLUB(d, d, 64)
    opt = torch.optim.Adam(club.parameters(), lr=3e-3)
    w = torch.ones(512)
    for _ in range(600):
        x, y = _gaussian_pairs(512, d, rho, g)
        opt.zero_grad()
        (-club.log_likelihood(x, y, w)).backward()
        opt.step()
    x, y = _gaussian_pairs(20000, d, rho, g)
    with torch.no_grad():
        return float(club.mi_upper_bound(x, y, y[torch.randperm(len(y), generator=g)], torch.ones(len(y))))


def test_club_bound_is_at_or_above_true_mi_for_correlated_gaussians():
    d, rho = 4, 0.7
    true_mi = -d / 2 * math.log(1 - rho**2)  # 1.347 nats
    bound = _fitted_club_bound(rho, d)
    # Tolerance: 5% of the true value for the estimator's sampling and fitting error.
    assert bound >= true_mi * 0.95, (bound, true_mi)
    # And it is a useful bound, not a blow-up: CLUB with the exact conditional gives d·ρ²/(1-ρ²) = 3.84.
    assert bound < 1.2 * d * rho**2 / (1 - rho**2), bound


def test_club_bound_is_near_zero_for_independent_pairs():
    assert abs(_fitted_club_bound(0.0)) < 0.05


def _shared_dynamics(B, T, H, g, maps):
    # A latent that evolves smoothly; each modality sees it through its own fixed map plus noise.
    latent = torch.cumsum(torch.randn(B, T, 8, generator=g), 1)
    return {m: latent @ A + 0.1 * torch.randn(B, T, H, generator=g) for m, A in maps.items()}


def test_cpc_accuracy_rises_well_above_chance_on_shared_dynamics():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    B, T, H = 32, 10, 16
    maps = {m: torch.randn(8, H, generator=g) for m in ("audio", "video", "text")}
    cpc = CrossModalCPC(list(maps), H, horizon=2, same_weight=0.1)
    opt = torch.optim.Adam(cpc.parameters(), lr=3e-3)
    valid = {m: torch.ones(B, T, dtype=torch.bool) for m in maps}
    for _ in range(300):
        z = _shared_dynamics(B, T, H, g, maps)
        loss, _ = cpc(z, valid, torch.randint(0, T - 2, ()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accs = [float(cpc(_shared_dynamics(B, T, H, g, maps), valid, torch.tensor(t))[1]) for t in range(T - 2)]
    assert sum(accs) / len(accs) > 10 / B, accs  # chance is 1/B


def test_cmcm_is_lower_for_matched_than_for_shuffled_pairs():
    g = torch.Generator().manual_seed(0)
    K, H, B, T = 32, 16, 24, 10
    codebook = torch.randn(K, H, generator=g) * 3
    codes = torch.randint(0, K, (B, T), generator=g)
    z = {m: codebook[codes] + 0.3 * torch.randn(B, T, H, generator=g) for m in ("audio", "video")}
    valid = {m: torch.ones(B, T, dtype=torch.bool) for m in z}
    matched = cmcm_loss(z, valid, codebook)
    shuffled = cmcm_loss({"audio": z["audio"], "video": z["video"][torch.randperm(B, generator=g)]}, valid, codebook)
    assert matched < shuffled - 1.0, (matched, shuffled)
    # The log-sum-exp form stays finite where naive probabilities underflow.
    far = {m: v * 100 for m, v in z.items()}
    assert torch.isfinite(cmcm_loss(far, valid, codebook * 100))
