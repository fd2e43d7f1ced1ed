"""`srcid export`: turn a training checkpoint into a model bundle (DESIGN §2; layout in docs/BUNDLE.md).

Each modality's encoder (graph.EncoderGraph, i.e. `SRCID.encode`) is exported with torch.onnx (the TorchScript
tracer by default, the dynamo exporter on request) with a dynamic batch axis, checked with the ONNX checker, and run
once through onnxruntime against torch before the bundle is published. The bundle is written to a temporary folder
and renamed into place, so a failed export never leaves a half-written bundle behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..model import SRCID, SRCIDConfig, paper_modalities
from ..runtime.graph import NO_CODE, EncoderGraph, input_names, output_names
from ..runtime.manifest import BUNDLE_VERSION, FORMAT, MANIFEST, WEIGHTS, sha256_file
from .checkpoint import load_model_state, model_config, read_checkpoint

log = logging.getLogger(__name__)

OPSET = 18
EXPORTERS = ("torchscript", "dynamo")
# Front-ends named by default: the paper's extractors for the paper's feature dims, AV-Digits' otherwise.
PAPER_FRONTENDS = {"audio": "vggish", "video": "vgg19-pool5", "text": "bert"}
AVDIGITS_FRONTENDS = {"audio": "logmel-pooled", "video": "pixels", "text": "minilm"}


class ExportError(RuntimeError):
    """The exported graph does not reproduce the torch model (an exporter fault, not bad input)."""


def default_frontends(cfg: SRCIDConfig) -> dict[str, str]:
    paper = paper_modalities()
    is_paper = all(cfg.modalities[m] == paper[m] for m in cfg.modalities)
    names = PAPER_FRONTENDS if is_paper else AVDIGITS_FRONTENDS
    return {m: names[m] for m in cfg.modalities}


def parse_frontend(spec: str) -> tuple[str, str, list[Path]]:
    """`MODALITY=NAME[:FILE[,FILE...]]` -> (modality, name, files)."""
    modality, sep, rest = spec.partition("=")
    name, _, files = rest.partition(":")
    if not sep or not modality or not name:
        raise ValueError(f"--frontend {spec!r}: expected MODALITY=NAME[:FILE[,FILE...]], e.g. audio=vggish:vggish.safetensors")
    paths = [Path(f) for f in files.split(",") if f]
    if len({p.name for p in paths}) != len(paths):
        raise ValueError(f"--frontend {spec!r}: two files share a name; they would overwrite each other in the bundle")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"--frontend {spec!r}: front-end file {p} does not exist")
    return modality, name, paths


def _data_fingerprint(meta: dict[str, str]) -> Any:
    """The checkpoint's training-data fingerprint (metadata key, else the training config's); None when it has
    none (`srcid train` writes "" then)."""
    raw = meta.get("data_fingerprint") or json.loads(meta["config"]).get("data_fingerprint")
    if not raw or not isinstance(raw, str):
        return raw or None
    try:
        return json.loads(raw) or None
    except json.JSONDecodeError:
        return raw


def _example(model: SRCID, modality: str, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    spec = model.cfg.modalities[modality]
    x = torch.randn(batch, model.cfg.T, *spec.shape, generator=g)
    if not spec.masked:
        return (x,)
    lengths = torch.randint(1, model.cfg.T + 1, (batch, 1), generator=g)
    return x, torch.arange(model.cfg.T).expand(batch, -1) < lengths



@contextmanager
def _torchscript_exportable():
    """The TorchScript exporter cannot translate the transformer's fused inference kernel nor aten::atanh (FSQ's
    bound): take the unfused path while tracing, and map atanh to ONNX Atanh."""
    torch.onnx.register_custom_op_symbolic("aten::atanh", lambda g, x: g.op("Atanh", x), 9)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _name_output_dims(path: Path, model: SRCID) -> None:
    """Give every output the dims the manifest documents ([batch, T], [batch, E], [batch, T, n])."""
    import onnx

    proto = onnx.load(str(path))
    dims = {"layer1": ["batch", model.cfg.T], "layer2": ["batch", model.cfg.T],
            "embedding": ["batch", model.cfg.embedding_dim], "layer1_stages": ["batch", model.cfg.T, model.cfg.stages]}
    for output in proto.graph.output:
        shape = output.type.tensor_type.shape
        for d, value in zip(shape.dim, dims[output.name]):
            d.Clear()
            if isinstance(value, str):
                d.dim_param = value
            else:
                d.dim_value = value
    onnx.save(proto, str(path))


def export_graph(model: SRCID, modality: str, path: Path, opset: int = OPSET, exporter: str = "torchscript") -> None:
    """Write `modality`'s encoder graph to `path` (dynamic batch axis) and run the ONNX checker on it.

    exporter "torchscript" (torch.onnx.export(dynamo=False)) traces in seconds; "dynamo" (torch.export based)
    gives the same graph semantics but takes ~25 s per graph on a 2-core machine."""
    import onnx

    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose from {list(EXPORTERS)}")
    graph = EncoderGraph(model, modality).eval()
    names, outputs = input_names(model, modality), output_names(model)
    example = _example(model, modality, 2, 0)
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(
            graph, example, str(path), input_names=names, output_names=outputs,
            dynamic_shapes={n: {0: batch} for n in names}, opset_version=opset, dynamo=True,
            external_data=False, verbose=False,
        )
    else:
        with _torchscript_exportable(), warnings.catch_warnings():
            # Tracer warnings flag the model's checks of static feature dims, which the trace may fix as constants.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                graph, example, str(path), input_names=names, output_names=outputs,
                dynamic_axes={n: {0: "batch"} for n in names + outputs}, opset_version=opset, dynamo=False,
            )
    _name_output_dims(path, model)
    onnx.checker.check_model(str(path), full_check=True)


def self_check(model: SRCID, modality: str, path: Path) -> dict[str, float]:
    """Run the exported graph and torch on a random batch; raise ExportError unless they agree.

    A few codes may flip at near-ties (float rounding differs between runtimes), so the bar is 95 % of codes and
    embedding cosine 0.999 here; tests/test_export_parity.py checks parity properly."""
    import onnxruntime as ort

    inputs = _example(model, modality, 5, 1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: t.numpy() for n, t in zip(input_names(model, modality), inputs)})
    want = [t.numpy() for t in EncoderGraph(model, modality)(*inputs)]
    figures = {name: float((g == w).mean()) for name, g, w in zip(output_names(model), got, want) if name != "embedding"}
    figures["embedding_cos"] = float((got[2] * want[2]).sum(-1).min())
    if min(v for k, v in figures.items() if k != "embedding_cos") < 0.95 or figures["embedding_cos"] < 0.999:
        raise ExportError(f"{path}: the ONNX graph does not reproduce torch on a test batch: {figures}")
    return figures


def _prepare_out(out: Path, force: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ValueError(f"{out} exists and is not an empty folder; choose another --out or pass --force")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, out)


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    frontends: dict[str, tuple[str, list[Path]]] | None = None,
    opset: int = OPSET,
    force: bool = False,
    exporter: str = "torchscript",
) -> Path:
    """Export `checkpoint` into the bundle folder `out`; returns the manifest path.

    frontends: {modality: (front-end name, files to copy)}; modalities left out get `default_frontends`.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    tensors, meta = read_checkpoint(checkpoint)
    cfg = model_config(meta)
    model = SRCID(cfg)
    load_model_state(model, tensors, checkpoint)
    model.eval()
    chosen = {m: (name, []) for m, name in default_frontends(cfg).items()}
    for m, spec in (frontends or {}).items():
        if m not in cfg.modalities:
            raise ValueError(f"--frontend names modality {m!r}; the checkpoint's model has {list(cfg.modalities)}")
        chosen[m] = spec
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _prepare_out(out, force)
    try:
        entries = {}
        for modality in tqdm(cfg.modalities, desc="export", unit="graph"):
            started = time.perf_counter()
            export_graph(model, modality, tmp / f"{modality}.onnx", opset, exporter)
            figures = self_check(model, modality, tmp / f"{modality}.onnx")
            log.info(
                "exported %s: %.1f s, %.1f MB, self-check %s", modality, time.perf_counter() - started,
                (tmp / f"{modality}.onnx").stat().st_size / 1e6, json.dumps(figures),
            )
            name, files = chosen[modality]
            copied = []
            for f in files:
                rel = f"frontends/{modality}/{f.name}"
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, tmp / rel)
                copied.append(rel)
            entries[modality] = {
                "shape": list(cfg.modalities[modality].shape),
                "masked": cfg.modalities[modality].masked,
                "onnx": f"{modality}.onnx",
                "inputs": input_names(model, modality),
                "outputs": output_names(model),
                "frontend": {"name": name, "files": copied},
            }
        _save_weights(model, tmp / WEIGHTS)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT,
            "bundle_version": BUNDLE_VERSION,
            "srcid_version": _srcid_version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "T": cfg.T,
            "layers": cfg.layers,
            "quantizer": cfg.quantizer,
            "stages": cfg.stages,
            "codebook_sizes": {f"layer{i + 1}": layer.quantizer.size for i, layer in enumerate(model.layers())},
            "embedding_dim": cfg.embedding_dim,
            "no_code": NO_CODE,
            "opset": opset,
            "exporter": exporter,
            "modalities": entries,
            "model": cfg.model_dump(mode="json"),
            "weights": WEIGHTS,
            "data_fingerprint": _data_fingerprint(meta),
            "checkpoint": {"file": checkpoint.name, "sha256": sha256_file(checkpoint), "step": int(meta["step"])},
            "files": {rel: sha256_file(tmp / rel) for rel in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("bundle written: %s (%d modalities, step %s)", out, len(entries), meta["step"])
    return out / MANIFEST


def _save_weights(model: SRCID, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "srcid-bundle-weights", "config": model.cfg.model_dump_json()})


def _srcid_version() -> str:
    try:
        return importlib_metadata.version("srcid")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint as a model bundle (ONNX encoders, weights, manifest)",
        description="Export a training checkpoint as a model bundle: manifest.json, one ONNX encoder per modality "
        "(features [B, T, *shape] (+ mask [B, T]) -> layer1, layer2 int64 [B, T] (layer2 = -1 for one-layer models), "
        "embedding float32 [B, E]), "
        "weights.safetensors for the torch backends, and front-end files. See docs/BUNDLE.md.",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file (.safetensors) from `srcid train`")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to create (must not exist or be empty)")
    p.add_argument(
        "--frontend", action="append", default=[], metavar="MODALITY=NAME[:FILE[,FILE...]]",
        help="front-end for a modality and files to copy into the bundle, e.g. audio=vggish:vggish.safetensors; "
        "defaults: vggish / vgg19-pool5 / bert at the paper's feature dims, else logmel-pooled / pixels / minilm",
    )
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (>= 17; default {OPSET})")
    p.add_argument(
        "--exporter", choices=EXPORTERS, default="torchscript",
        help="torch.onnx exporter: torchscript (fast, default) or dynamo (torch.export based, slower); same outputs",
    )
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.opset < 17:
        raise ValueError(f"--opset {args.opset}: the encoder graphs need opset 17 or later")
    frontends = {}
    for spec in args.frontend:
        modality, name, files = parse_frontend(spec)
        frontends[modality] = (name, files)
    path = export_bundle(args.checkpoint, args.out, frontends, args.opset, args.force, args.exporter)
    print(path)
    return 0
