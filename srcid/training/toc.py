"""TOC, training-free codebook optimisation (after Huang et al. 2024, arXiv 2403.05168): keep the dimensions of
the quantised vectors that both vary across codes and carry the cross-modal similarity; drop the rest.

No labels and no gradient steps: the importance of dimension d comes from the paired quantised vectors of the
training split (steps where both modalities are valid), averaged over every pair of modalities (m, o):

    importance_d = mean over pairs (m, o) of  sigma_m,d * sigma_o,d * max(0, rho_mo,d)

with sigma the standard deviation of dimension d over the pair's steps (variance: does the dimension tell
codes apart?) and rho the Pearson correlation of dimension d between the paired modalities (similarity:
does it agree across modalities on the same event?). The product equals max(0, cross-modal covariance).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np


def dimension_importance(vectors: dict[str, np.ndarray], valid: dict[str, np.ndarray]) -> np.ndarray:
    """vectors: modality -> [N, T, D] paired quantised vectors; valid: modality -> [N, T] bool -> importance [D]."""
    modalities = list(vectors)
    if len(modalities) < 2:
        raise ValueError(f"TOC needs at least two paired modalities, got {modalities}")
    dims = {vectors[m].shape[-1] for m in modalities}
    if len(dims) != 1:
        raise ValueError(f"TOC needs vectors of one width for all modalities, got {sorted(dims)}")
    scores = []
    for m, o in combinations(modalities, 2):
        both = valid[m] & valid[o]
        if not both.any():
            raise ValueError(f"TOC: {m} and {o} share no valid step")
        x = vectors[m][both].astype(np.float64)
        y = vectors[o][both].astype(np.float64)
        sigma_x, sigma_y = x.std(0), y.std(0)
        covariance = ((x - x.mean(0)) * (y - y.mean(0))).mean(0)
        denom = sigma_x * sigma_y
        rho = np.divide(covariance, denom, out=np.zeros_like(covariance), where=denom > 1e-12)
        scores.append(denom * np.maximum(rho, 0.0))
    return np.mean(scores, axis=0)


def select_dimensions(importance: np.ndarray, n: int) -> np.ndarray:
    """Indices [n] of the n most important dimensions, in increasing index order; equal scores keep the lower
    index, so the selection depends on the scores alone."""
    if not 1 <= n <= importance.shape[0]:
        raise ValueError(f"TOC keeps 1..{importance.shape[0]} dimensions, asked for {n}")
    order = np.lexsort((np.arange(importance.shape[0]), -importance))
    return np.sort(order[:n])


def toc_size(total: int, dims: int | None = None, fraction: float | None = None) -> int | None:
    """Dimensions to keep from `total`: `dims`, or round(fraction * total) (at least 1); None when neither."""
    if dims is not None and fraction is not None:
        raise ValueError("give the TOC size as a count (toc_dims) or as a fraction (toc_fraction), not both")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"toc_fraction must be in (0, 1], got {fraction}")
        return max(1, int(round(fraction * total)))
    if dims is not None and not 1 <= dims <= total:
        raise ValueError(f"toc_dims must be in 1..{total} (the quantised vectors have {total} dimensions), got {dims}")
    return dims
