"""Runtime backends: onnxruntime (CUDA or CPU provider) over the bundle's graphs, or torch over its safetensors.

Every backend runs one modality's encoder on validated numpy input and returns the graph's outputs by name
(see graph.EncoderGraph).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from .manifest import BundleError, Manifest

BACKENDS = ("auto", "onnx-cuda", "onnx-cpu", "torch-cuda", "torch-cpu")


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run on this machine (no GPU, no onnxruntime-gpu)."""


class Backend(Protocol):
    name: str

    def run(self, modality: str, features: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
        """features [B, T, *shape] float32, mask [B, T] bool or None -> outputs by name."""
        ...


def denormals_flushed() -> bool:
    """Whether the calling thread flushes denormal floats to zero now: 1e-30 * 1e-10 is 1e-40 in IEEE's gradual
    underflow and 0 with either FTZ or DAZ set (torch can set the bits but not read them)."""
    return bool(np.float32(1e-30) * np.float32(1e-10) == 0)


@contextlib.contextmanager
def flushed_denormals() -> Iterator[None]:
    """Denormal floats flushed to zero in the calling thread for the block (the FTZ and DAZ bits of its SSE control
    register, through torch.set_flush_denormal; a no-op on CPUs without them), then as the block found them: IEEE's
    gradual underflow for the caller's own float work, unless the caller flushes too (an enclosing block, say)."""
    import torch

    if denormals_flushed():
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


class OnnxBackend:
    """One onnxruntime session per modality; `device` is "cpu" or "cuda".

    Runs with denormals flushed to zero. onnxruntime's CPU Softmax turns every masked attention score (-inf, or any
    whose exp underflows) into denormals, and arithmetic on them is several times slower: a Softmax over [256, 10,
    10] with the ±1-step window took 371 µs, 71 µs flushed, and a batch of 64 through the embedded bundle's audio
    graph 7.0 ms, 5.3 flushed, with the same outputs to the bit (docs/PERFORMANCE.md, Encode: denormals). The
    session option reaches only onnxruntime's pool threads, so `run` also switches the thread that calls it."""

    def __init__(self, root: Path, manifest: Manifest, device: str = "cpu", threads: int = 0):
        import onnxruntime as ort

        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable(
                "onnx-cuda: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu, "
                "pip install 'srcid[gpu]')"
            )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
        self.name = f"onnx-{device}"
        self.sessions = {}
        for modality, entry in manifest.modalities.items():
            path = root / entry.onnx
            try:
                # Creating a session with that option flushes the creating thread for good; the block ends it.
                with flushed_denormals():
                    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
                raise BundleError(f"{path}: not a loadable ONNX graph ({exc})") from exc
            if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
                raise BackendUnavailable(f"onnx-cuda: onnxruntime could not start CUDA (providers {session.get_providers()})")
            self._check_signature(path, session, manifest.T, entry.shape, entry.inputs, entry.outputs)
            self.sessions[modality] = session

    @staticmethod
    def _check_signature(path, session, T, shape, inputs, outputs) -> None:
        got_in = [i.name for i in session.get_inputs()]
        got_out = [o.name for o in session.get_outputs()]
        if got_in != inputs or got_out != outputs:
            raise BundleError(f"{path}: graph has inputs {got_in} / outputs {got_out}, manifest says {inputs} / {outputs}")
        dims = session.get_inputs()[0].shape
        if list(dims[1:]) != [T, *shape]:
            raise BundleError(f"{path}: graph takes features {dims}, manifest says [batch, {T}, {', '.join(map(str, shape))}]")

    def run(self, modality: str, features: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
        session = self.sessions[modality]
        feeds = {"features": features}
        if mask is not None:
            feeds["mask"] = mask
        names = [o.name for o in session.get_outputs()]
        with flushed_denormals():
            return dict(zip(names, session.run(names, feeds)))


class TorchBackend:
    """SRCID rebuilt from the manifest's config with the bundle's safetensors weights; `device` "cpu" or "cuda"."""

    def __init__(self, root: Path, manifest: Manifest, device: str = "cpu"):
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from ..model import SRCID
        from .graph import EncoderGraph, output_names

        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("torch-cuda: torch sees no CUDA device")
        self.name = f"torch-{device}"
        self.torch = torch
        path = root / manifest.weights
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise BundleError(f"{path}: not a readable safetensors file ({exc})") from exc
        model = SRCID(manifest.config())
        expected = model.state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            raise BundleError(f"{path}: weights do not fit the model in the manifest's config")
        model.load_state_dict(state)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.graphs = {m: EncoderGraph(self.model, m) for m in manifest.modalities}
        self.outputs = output_names(self.model)

    def run(self, modality: str, features: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(features).to(self.device, non_blocking=True)
            m = None if mask is None else torch.from_numpy(mask).to(self.device, non_blocking=True)
            out = self.graphs[modality](x, m)
        return {name: t.cpu().numpy() for name, t in zip(self.outputs, out)}


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def create_backend(kind: str, root: Path, manifest: Manifest, threads: int = 0) -> tuple[Backend, str]:
    """The backend `kind` names (one of BACKENDS) and why it was chosen. `auto` prefers onnxruntime on CUDA,
    then torch on CUDA, then onnxruntime on CPU."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; choose from {list(BACKENDS)}")
    if kind == "onnx-cpu":
        return OnnxBackend(root, manifest, "cpu", threads), "asked for"
    if kind == "onnx-cuda":
        return OnnxBackend(root, manifest, "cuda", threads), "asked for"
    if kind in ("torch-cpu", "torch-cuda"):
        return TorchBackend(root, manifest, kind.split("-")[1]), "asked for"
    try:
        return OnnxBackend(root, manifest, "cuda", threads), "onnxruntime-gpu and a GPU are present"
    except BackendUnavailable as exc:
        reason = str(exc)
    if _torch_cuda():
        return TorchBackend(root, manifest, "cuda"), f"GPU present but no onnxruntime CUDA ({reason})"
    return OnnxBackend(root, manifest, "cpu", threads), f"no GPU backend ({reason}; torch sees no CUDA device)"
