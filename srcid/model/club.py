"""CLUB (Cheng et al. 2020): a contrastive log-ratio upper bound of mutual information, with a Gaussian q(s | z)."""

from __future__ import annotations

from torch import Tensor, nn


class CLUB(nn.Module):
    """q_θ(s | z) = N(μ(z), diag exp(logvar(z))).

    Fit it by maximising `log_likelihood` on detached pairs; the encoders then minimise `mi_upper_bound`.
    Inputs are z [N, Dz], s [N, Ds] with a weight [N] (0 for padding).
    """

    def __init__(self, z_dim: int, s_dim: int, hidden: int):
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, s_dim))
        self.logvar = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, s_dim), nn.Tanh())

    def log_likelihood(self, z: Tensor, s: Tensor, weight: Tensor) -> Tensor:
        """Mean Gaussian log-likelihood per pair, up to a constant."""
        mu, logvar = self.mu(z), self.logvar(z)
        ll = (-(mu - s).pow(2) / logvar.exp() - logvar).sum(-1)
        return (ll * weight).sum() / weight.sum().clamp_min(1)

    def mi_upper_bound(self, z: Tensor, s: Tensor, s_shuffled: Tensor, weight: Tensor) -> Tensor:
        """E[log q(s|z)] - E[log q(s'|z)], s' drawn from other items (the log-variance terms cancel)."""
        mu, logvar = self.mu(z), self.logvar(z)
        inv_var = (-logvar).exp()
        positive = -0.5 * ((mu - s).pow(2) * inv_var).sum(-1)
        negative = -0.5 * ((mu - s_shuffled).pow(2) * inv_var).sum(-1)
        return ((positive - negative) * weight).sum() / weight.sum().clamp_min(1)
