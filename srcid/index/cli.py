"""`srcid index build|stats|verify`: rebuild an index from its catalog, show it, check it against the catalog."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from srcid.index import persist
from srcid.index.backends import BACKEND_KINDS, choose_backend_kind
from srcid.index.catalog import Catalog, open_catalog
from srcid.index.catalog_index import CatalogIndex, load_persisted
from srcid.index.config import IndexConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "index",
        help="build, inspect or verify the retrieval index of a catalog",
        description="The catalog (sqlite:///path/catalog.db or redis://host:port/db) is the source of truth; the "
        "index in --index-dir is derived from it. build: rebuild from the catalog and persist. stats: print the "
        "persisted manifest, the catalog's counts and the backend as JSON. verify: load the persisted index, catch "
        "it up in memory, compare counts, ids and a sample of vectors with the catalog; exit 1 on any mismatch.",
    )
    parser.add_argument("action", choices=["build", "stats", "verify"],
                        help="build: rebuild from the catalog and save; stats: show; verify: check against the catalog")
    parser.add_argument("--catalog", required=True, help="catalog URL: sqlite:///path/catalog.db or redis://host:port/db")
    parser.add_argument("--index-dir", required=True, type=Path, help="folder holding manifest.json and the index files")
    parser.add_argument("--bundle-version", default=None, help="model bundle version (required when the catalog is new)")
    parser.add_argument("--dim", type=int, default=None, help="embedding size E (required when the catalog is new)")
    parser.add_argument("--kind", choices=["flat", "ivf"], default="flat", help="exact search (default) or IVF")
    parser.add_argument("--backend", choices=list(BACKEND_KINDS), default="auto",
                        help="auto: faiss-gpu if available, else torch on CUDA, else bf16 on a CPU with AMX (exact: "
                        "a bf16 pass, float32 re-scoring), else int8 on a CPU with AVX-512 VNNI or AVX2 (the same "
                        "with an int8 pass: torch's product with VNNI, onnxruntime's without), else blas (exact "
                        "search by numpy BLAS); IVF is faiss's on the CPU")
    parser.add_argument("--ivf-min-items", type=int, default=50_000, help="modalities smaller than this stay exact")
    parser.add_argument("--ivf-target-recall", type=float, default=0.95,
                        help="IVF: smallest nprobe whose measured recall@10 against exact search reaches this")
    parser.add_argument("--sample", type=int, default=100, help="verify: items per modality whose vectors are compared")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = IndexConfig(kind=args.kind, backend=args.backend, ivf_min_items=args.ivf_min_items,
                         ivf_target_recall=args.ivf_target_recall)
    with open_catalog(args.catalog, args.dim, args.bundle_version) as catalog:
        if args.action == "build":
            index = CatalogIndex(catalog, config)
            index.rebuild()
            manifest = index.save(args.index_dir)
            print(json.dumps({"built": index.describe(), "files": manifest["modalities"]}, indent=2))
            return 0
        if args.action == "stats":
            manifest, reason = persist.read_manifest(args.index_dir)
            print(json.dumps({"catalog": catalog.describe(), "backend_now": choose_backend_kind(config.backend),
                              "manifest": manifest, "manifest_problem": reason}, indent=2))
            return 0
        return _verify(catalog, args.index_dir, config, args.sample)


def _verify(catalog: Catalog, index_dir: Path, config: IndexConfig, sample: int) -> int:
    """Print a JSON report of the persisted index against the catalog; 0 if consistent, 1 if not."""
    manifest, _ = persist.read_manifest(index_dir)
    # Verify the index as it was built (flat or IVF), whatever --kind says.
    index = CatalogIndex(catalog, replace(config, kind=(manifest or {}).get("kind", config.kind)))
    _, reason = load_persisted(index, index_dir)
    if reason is not None:
        report: dict = {"ok": False, "problems": [f"index at {index_dir} cannot serve catalog {catalog.url}: {reason}"]}
    else:
        behind = catalog.version() - index.position
        index.sync()
        problems = index.check_against_catalog(sample=sample)
        report = {"ok": not problems, "problems": problems, "behind_catalog_by": behind, "index": index.describe()}
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1
