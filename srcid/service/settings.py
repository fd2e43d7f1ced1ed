"""Service settings: environment variables with the prefix SRCID_ (the settings contract in docs/SERVICE.md).

`srcid serve` flags override them. Paths left unset derive from `data_dir`, so one variable moves all state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from srcid.index.config import IndexConfig

EMBEDDED_BUNDLE = Path(__file__).resolve().parent.parent / "assets" / "bundle"
DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SRCID_", extra="ignore")

    bundle: Path = Field(EMBEDDED_BUNDLE, description="model bundle folder (default: the embedded AV-Digits bundle)")
    data_dir: Path = Field(Path("./srcid-data"), description="where the defaults keep state (catalog db, index)")
    catalog_url: str | None = Field(None, description="sqlite:///path or redis://host:port/db (default: sqlite in data_dir)")
    index_dir: Path | None = Field(None, description="persisted index; replicas may share it (default: data_dir/index)")
    cache_url: str | None = Field(None, description="redis://... for the encode cache (unset: no cache)")
    api_key: str | None = Field(None, description="Bearer key required for POST/DELETE /items (unset: writes open)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    max_inputs: int = Field(64, ge=1, description="inputs per /encode request")
    max_batch: int = Field(64, ge=1, description="most inputs in one runtime call (1 turns batching off)")
    batch_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits for more requests")
    queue_size: int = Field(1024, ge=1, description="encode requests waiting per modality; a full queue answers 429")
    runtime_backend: str = Field("auto", description="onnx-cpu, onnx-cuda, torch-cuda, torch-cpu or auto")
    # One encoder thread by default: the service already runs calls side by side (a worker per modality, a decode
    # pool), and on a small or shared host spinning onnxruntime workers cost far more than they give
    # (docs/PERFORMANCE.md, Serve). The search threads' default is the state's `search_threads`.
    runtime_threads: int = Field(1, ge=0, description="onnxruntime intra-op threads (0: its default, all cores)")
    index_threads: int | None = Field(None, ge=0, description="threads of CPU search, faiss OpenMP, torch and BLAS "
                                      "(default: 2 with the int8 backend, else 1, and BLAS 1; 0: their default, "
                                      "all cores)")
    index_backend: str = Field("auto", description="blas, bf16, int8, faiss-cpu, faiss-gpu, torch or auto")
    index_kind: Literal["flat", "ivf"] = Field(
        "flat", description="flat: exact search; ivf: approximate, for modalities of ivf_min_items or more")
    ivf_min_items: int = Field(50_000, ge=1, description="with index_kind=ivf: items a modality needs before IVF")
    ivf_target_recall: float = Field(0.95, gt=0, le=1, description="IVF nprobe is tuned to this recall@10 vs exact")
    decode_threads: int = Field(4, ge=1, description="threads that decode media and run front-ends")
    workers: int = Field(1, ge=1, description="server processes, each with its own model, index and batchers")
    demo_catalog: bool = Field(True, description="load the shipped demo items into an empty catalog (embedded bundle only)")
    log_level: str = "info"
    access_log: bool = Field(True, description="one JSON line per request (method, path, route, status, ms)")

    @model_validator(mode="after")
    def _derive_paths(self) -> "Settings":
        if self.catalog_url is None:
            self.catalog_url = f"sqlite:///{(self.data_dir / 'catalog.db').resolve()}"
        if self.index_dir is None:
            self.index_dir = self.data_dir / "index"
        if not self.api_key:
            self.api_key = None
        return self

    def index_config(self) -> IndexConfig:
        return IndexConfig(kind=self.index_kind, backend=self.index_backend, ivf_min_items=self.ivf_min_items,
                           ivf_target_recall=self.ivf_target_recall)

    @property
    def uses_embedded_bundle(self) -> bool:
        return self.bundle.resolve() == EMBEDDED_BUNDLE
