"""Encode speed, features -> codes + embedding, at the paper's dims (audio 128, video 7x7x512, text 768; T = 10).

    python bench/encode.py                     # CPU: onnxruntime vs torch eager at batch 1, 32, 256, ratio beside
    python bench/encode.py --threads 1         # both runtimes on one thread (+ GFLOP/s against a measured GEMM rate)
    python bench/encode.py --gpu               # CUDA: torch eager vs torch.compile vs CUDA graphs, batch 1024/8192
    python bench/encode.py --gpu --device cpu --batches 4 --modalities audio   # smoke-run the --gpu code on a CPU

The model is untrained (speed does not depend on the weights) and is exported with `srcid export` code into a
temporary bundle. Every figure is measured in this run; ratios compare runtimes on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from srcid.model import SRCID, SRCIDConfig
from srcid.runtime import load_bundle
from srcid.runtime.graph import EncoderGraph
from srcid.training.checkpoint import save_checkpoint
from srcid.training.export import export_bundle
from srcid.training.step import OptimConfig, TrainStep, WarmStartConfig

log = logging.getLogger("bench.encode")


def clips_per_second(fn: Callable[[], object], batch: int, min_seconds: float, sync: Callable[[], None]) -> float:
    """Run fn until min_seconds have passed (after two warm-up calls); return clips/s."""
    for _ in range(2):
        fn()
    sync()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and calls >= 3:
            return batch * calls / elapsed


def inputs(cfg: SRCIDConfig, modality: str, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    spec = cfg.modalities[modality]
    x = rng.standard_normal((batch, cfg.T, *spec.shape), dtype=np.float32)
    mask = (np.arange(cfg.T)[None] < rng.integers(1, cfg.T + 1, (batch, 1))) if spec.masked else None
    return x, mask


def build_bundle(workdir: Path) -> tuple[SRCID, Path]:
    torch.manual_seed(0)
    cfg = SRCIDConfig()  # the paper's dims
    model = SRCID(cfg)
    ckpt = save_checkpoint(workdir / "paper.safetensors", model, TrainStep(model, OptimConfig(), WarmStartConfig()),
                           {"config": {"model": cfg.model_dump(mode="json")}, "step": 0})
    export_bundle(ckpt, workdir / "bundle")
    return model.eval(), workdir / "bundle"


def onnx_matmul_flops(path: Path, feeds: dict[str, np.ndarray]) -> float:
    """FLOPs of the MatMul/Gemm nodes of an encoder graph on `feeds` (2·M·N·K each, with the shapes the graph
    really has: every product's inputs are exposed as outputs and the graph is run once). These are nearly all of
    its arithmetic, and what onnxruntime really runs: the exporter drops what the outputs do not need (layer 2's
    Ψ, which eager `encode` still computes)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    constants = {t.name: tuple(t.dims) for t in model.graph.initializer}
    products = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    wanted = sorted({name for n in products for name in n.input[:2] if name not in constants})
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in wanted if name not in known)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    shapes = dict(constants)
    shapes.update({name: value.shape for name, value in zip(wanted, session.run(wanted, feeds))})
    flops = 0.0
    for node in products:
        a, b = shapes[node.input[0]], shapes[node.input[1]]
        flags = {x.name: x.i for x in node.attribute}
        m, k = (a[-1], a[-2]) if flags.get("transA") else (a[-2], a[-1])
        n = b[-2] if flags.get("transB") else b[-1]
        flops += 2.0 * float(np.prod(a[:-2], dtype=np.float64)) * m * n * k
    return flops


def gemm_peak(threads: int, n: int = 1024, seconds: float = 2.0) -> float:
    """GFLOP/s of a large fp32 matrix product on this machine with `threads` threads: what arithmetic-bound
    inference can at best reach here."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    rate = clips_per_second(lambda: torch.mm(a, b), 1, seconds, lambda: None)
    return rate * 2 * n**3 / 1e9


def cpu_bench(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, bundle_dir = build_bundle(Path(tmp))
        bundle = load_bundle(bundle_dir, backend="onnx-cpu", threads=args.threads)
        rng = np.random.default_rng(0)
        for modality in args.modalities:
            for batch in args.batches:
                x, mask = inputs(model.cfg, modality, batch, rng)
                xt, mt = torch.from_numpy(x), None if mask is None else torch.from_numpy(mask)

                def torch_eager():
                    with torch.inference_mode():
                        return model.encode(modality, xt, mt)

                # Alternate the runtimes for several rounds and keep each one's best: on a shared machine the
                # load changes under a run, and interleaving exposes both runtimes to the same conditions.
                ort = eager = 0.0
                for _ in range(args.rounds):
                    ort = max(ort, clips_per_second(lambda: bundle.encode(modality, x, mask), batch, args.seconds,
                                                    lambda: None))
                    eager = max(eager, clips_per_second(torch_eager, batch, args.seconds, lambda: None))
                feeds = {"features": x} if mask is None else {"features": x, "mask": mask}
                ort_flops = onnx_matmul_flops(bundle_dir / f"{modality}.onnx", feeds) / batch
                row = {"modality": modality, "batch": batch, "onnxruntime_cpu": ort, "torch_eager_cpu": eager,
                       "ratio": ort / eager, "onnxruntime_gflops": ort * ort_flops / 1e9,
                       "torch_eager_gflops": eager * ort_flops / 1e9, "mflop_per_clip": ort_flops / 1e6,
                       "load_average": os.getloadavg()[0]}
                log.info(json.dumps(row))
                rows.append(row)
    peak = gemm_peak(args.threads)
    # Eager computes a little more than the graph (layer 2's Ψ, unused by the outputs), so its GFLOP/s here,
    # counted on the graph's products, is a lower bound.
    print(f"\nfeatures -> codes, paper dims, T = 10, threads = {args.threads}, best of {args.rounds} (clips/s); "
          f"GFLOP/s on the graph's matrix products, against a 1024^3 fp32 GEMM at {peak:.1f} GFLOP/s on the same threads")
    print(f"{'modality':<8} {'batch':>6} {'onnxruntime':>12} {'torch eager':>12} {'ratio':>7} {'MFLOP/clip':>11} "
          f"{'GFLOP/s ort':>12} {'eager':>7} {'% of GEMM ort':>14} {'eager':>6}")
    for r in rows:
        r["gemm_gflops"] = peak
        print(f"{r['modality']:<8} {r['batch']:>6} {r['onnxruntime_cpu']:>12.1f} {r['torch_eager_cpu']:>12.1f} "
              f"{r['ratio']:>6.2f}x {r['mflop_per_clip']:>11.1f} {r['onnxruntime_gflops']:>12.1f} "
              f"{r['torch_eager_gflops']:>7.1f} {100 * r['onnxruntime_gflops'] / peak:>13.0f}% "
              f"{100 * r['torch_eager_gflops'] / peak:>5.0f}%")
    return rows


def cuda_graph_runner(graph: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> Callable[[], object]:
    """Capture one encode of (x, mask) into a CUDA graph; the runner replays it (inputs stay in place)."""
    args = (x,) if mask is None else (x, mask)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):
            graph(*args)
    torch.cuda.current_stream().wait_stream(stream)
    captured = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(captured):
        graph(*args)
    return captured.replay


def gpu_bench(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device (torch sees none); use --device cpu to smoke-run this code")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = SRCID(SRCIDConfig()).to(device).eval()
    rows = []
    for modality in args.modalities:
        graph = EncoderGraph(model, modality).eval()
        compiled = torch.compile(graph, dynamic=False)
        for batch in args.batches:
            x, mask = inputs(model.cfg, modality, batch, np.random.default_rng(0))
            xt = torch.from_numpy(x).to(device)
            mt = None if mask is None else torch.from_numpy(mask).to(device)
            call_args = (xt,) if mt is None else (xt, mt)

            def eager(g=graph, a=call_args):
                with torch.inference_mode():
                    return g(*a)

            def compiled_call(g=compiled, a=call_args):
                with torch.inference_mode():
                    return g(*a)

            # name -> a factory returning the timed call (CUDA graph capture itself may fail, so it runs in the try)
            variants: dict[str, Callable[[], Callable[[], object]]] = {
                "torch_eager": lambda: eager, "torch_compile": lambda: compiled_call,
            }
            if device.type == "cuda":
                variants["cuda_graph"] = lambda: cuda_graph_runner(graph, xt, mt)
            row: dict = {"modality": modality, "batch": batch, "device": str(device), "tf32": args.tf32}
            for name, factory in variants.items():
                try:
                    row[name] = clips_per_second(factory(), batch, args.seconds, sync)
                except Exception as exc:  # report a variant that fails to build instead of losing the others
                    row[name] = f"failed: {type(exc).__name__}: {exc}"[:200]
            log.info(json.dumps(row))
            rows.append(row)
            del xt, mt
            if device.type == "cuda":
                torch.cuda.empty_cache()
    names = ["torch_eager", "torch_compile"] + (["cuda_graph"] if device.type == "cuda" else [])
    print(f"\nfeatures -> codes on {device}, paper dims, T = 10, tf32={args.tf32} (clips/s, inputs already on device)")
    print(f"{'modality':<8} {'batch':>6} " + " ".join(f"{n:>14}" for n in names) + f" {'best/eager':>10}")
    for r in rows:
        numbers = [r[n] for n in names]
        best = max((v for v in numbers if isinstance(v, float)), default=float("nan"))
        cells = " ".join(f"{v:>14.0f}" if isinstance(v, float) else f"{'failed':>14}" for v in numbers)
        ratio = best / r["torch_eager"] if isinstance(r["torch_eager"], float) else float("nan")
        print(f"{r['modality']:<8} {r['batch']:>6} {cells} {ratio:>9.2f}x")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="torch eager vs torch.compile vs CUDA graphs")
    parser.add_argument("--device", default="cuda", help="device of the --gpu run (cpu only to smoke-test the code)")
    parser.add_argument("--tf32", action="store_true", help="--gpu: allow TF32 matmuls (faster, codes may shift at ties)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 32 256; --gpu 1024 8192)")
    parser.add_argument("--modalities", nargs="+", default=["audio", "video", "text"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both runtimes")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="CPU: alternating rounds per figure (best kept)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    args.batches = args.batches or ([1024, 8192] if args.gpu else [1, 32, 256])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("machine: %s, %d CPUs, torch %s, load average %s", platform.platform(), os.cpu_count(),
             torch.__version__, os.getloadavg())
    rows = gpu_bench(args) if args.gpu else cpu_bench(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
