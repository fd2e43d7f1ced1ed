"""How an index is built: exact or IVF, which backend, and the knobs of deletion masking."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from srcid.index.backends import BACKEND_KINDS


@dataclass(frozen=True)
class IndexConfig:
    """kind: "flat" (exact, the default) or "ivf" (approximate, for catalogs of ivf_min_items or more per modality;
    nprobe is tuned until recall@10 against exact search reaches ivf_target_recall). backend: "auto", "blas",
    "bf16", "int8", "faiss-cpu", "faiss-gpu" or "torch" (torch_device "cuda", or "cpu" to run the same blocked code on
    the CPU).
    max_masked: deleted-but-still-indexed entries tolerated on backends without removal before a background rebuild."""

    kind: str = "flat"
    backend: str = "auto"
    torch_device: str = "cuda"
    ivf_min_items: int = 50_000
    ivf_nlist: int | None = None
    ivf_target_recall: float = 0.95
    max_masked: int = 1024

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "ivf"):
            raise ValueError(f"index kind {self.kind!r}: expected 'flat' or 'ivf'")
        if self.backend not in BACKEND_KINDS:
            raise ValueError(f"index backend {self.backend!r}: expected one of {list(BACKEND_KINDS)}")
        if not 0.0 < self.ivf_target_recall <= 1.0:
            raise ValueError(f"ivf_target_recall must be in (0, 1], got {self.ivf_target_recall}")
        if self.ivf_nlist is not None and self.ivf_nlist < 1:
            raise ValueError(f"ivf_nlist must be positive, got {self.ivf_nlist}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
