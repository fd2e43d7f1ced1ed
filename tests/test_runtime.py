"""The runtime: backends and how one is chosen, the round trip to the checkpoint's codes, bad bundles and bad input."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from test_export_support import avdigits, built_bundle, one_torch_thread, random_inputs  # noqa: F401

from srcid.runtime import BackendUnavailable, BundleError, load_bundle
from srcid.runtime.backends import denormals_flushed, flushed_denormals
from srcid.runtime.manifest import sha256_file
from srcid.training.checkpoint import load_model


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture
def bundle_copy(tmp_path_factory, tmp_path):
    """A private copy of the small bundle to damage."""
    _, bundle = built_bundle(tmp_path_factory)
    return shutil.copytree(bundle, tmp_path / "bundle")


def _rehash(bundle, rel):
    """Make the manifest agree with a changed file, as a careless tamperer would."""
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"][rel] = sha256_file(bundle / rel)
    path.write_text(json.dumps(manifest))


def _clip(ckpt_model, modality, seed=0, B=1):
    x, mask = random_inputs(ckpt_model.cfg.modalities[modality], B, ckpt_model.cfg.T, np.random.default_rng(seed))
    if mask is not None:
        mask[:, :3] = True
    return x, mask


@pytest.mark.parametrize("backend", ["onnx-cpu", "torch-cpu"])
def test_round_trip_gives_the_checkpoints_codes(tmp_path_factory, backend):
    ckpt, bundle_dir = built_bundle(tmp_path_factory)
    model, _ = load_model(ckpt)
    bundle = load_bundle(bundle_dir, backend=backend, threads=1)
    assert bundle.backend == backend
    for m in model.modalities:
        x, mask = _clip(model, m)
        got = bundle.encode(m, x, mask)
        want = model.encode(m, torch.from_numpy(x), None if mask is None else torch.from_numpy(mask))
        assert got["layer1"].dtype == np.int64 and got["embedding"].dtype == np.float32
        np.testing.assert_array_equal(got["layer1"], want["layer1"].numpy())
        np.testing.assert_array_equal(got["layer2"], want["layer2"].numpy())
        np.testing.assert_allclose(got["embedding"], want["embedding"].numpy(), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got["embedding"], axis=-1), 1.0, atol=1e-5)


def test_round_trip_on_a_real_avdigits_clip(tmp_path_factory):
    shards = avdigits()
    if shards is None:
        pytest.skip("AV-Digits shards not built (/work/avdigits/shards absent); the synthetic round trip covers this")
    ckpt, bundle_dir = built_bundle(tmp_path_factory)
    model, _ = load_model(ckpt)
    bundle = load_bundle(bundle_dir, backend="onnx-cpu", threads=1)
    split = shards.split(shards.splits[-1])
    item = split[0]
    for m in model.modalities:
        x = item[m][None]
        mask = item[f"{m}_mask"][None] if f"{m}_mask" in item else None
        got = bundle.encode(m, x, mask)
        want = model.encode(m, torch.from_numpy(x), None if mask is None else torch.from_numpy(mask))
        np.testing.assert_array_equal(got["layer1"], want["layer1"].numpy())
        np.testing.assert_array_equal(got["layer2"], want["layer2"].numpy())


def test_auto_picks_onnx_cpu_without_a_gpu_and_logs_why(tmp_path_factory, caplog):
    if torch.cuda.is_available() or _ort_has_cuda():
        pytest.skip("this machine has a GPU backend; auto would not pick onnx-cpu")
    _, bundle_dir = built_bundle(tmp_path_factory)
    with caplog.at_level(logging.INFO, logger="srcid.runtime"):
        bundle = load_bundle(bundle_dir)
    assert bundle.backend == "onnx-cpu"
    assert "no GPU backend" in bundle.backend_reason
    assert any("backend onnx-cpu" in r.getMessage() for r in caplog.records)


def test_gpu_backends_refuse_clearly_where_unavailable(tmp_path_factory):
    _, bundle_dir = built_bundle(tmp_path_factory)
    if not _ort_has_cuda():
        with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
            load_bundle(bundle_dir, backend="onnx-cuda")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="no CUDA device"):
            load_bundle(bundle_dir, backend="torch-cuda")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        load_bundle(bundle_dir, backend="tpu")


@pytest.mark.parametrize("backend", ["torch-cuda", "onnx-cuda"])
def test_gpu_backend_matches_cpu(tmp_path_factory, backend):
    if backend == "torch-cuda" and not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    if backend == "onnx-cuda" and not (_ort_has_cuda() and torch.cuda.is_available()):
        pytest.skip("onnxruntime-gpu or a GPU is missing")
    _, bundle_dir = built_bundle(tmp_path_factory)
    gpu = load_bundle(bundle_dir, backend=backend)
    cpu = load_bundle(bundle_dir, backend="torch-cpu")
    assert gpu.backend == backend
    rng = np.random.default_rng(1)
    for m, spec in gpu.manifest.config().modalities.items():
        x, mask = random_inputs(spec, 64, gpu.manifest.T, rng)
        a, b = gpu.encode(m, x, mask), cpu.encode(m, x, mask)
        assert (a["layer1"] == b["layer1"]).mean() >= 0.999
        assert (a["layer2"] == b["layer2"]).mean() >= 0.999


# --- bad bundles: each a BundleError at load time, naming the file and the problem ---


def test_missing_file(bundle_copy):
    (bundle_copy / "video.onnx").unlink()
    with pytest.raises(BundleError, match=r"video\.onnx: missing from the bundle"):
        load_bundle(bundle_copy, backend="onnx-cpu")


def test_missing_manifest(bundle_copy):
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest\.json: missing"):
        load_bundle(bundle_copy)
    with pytest.raises(FileNotFoundError, match="no such bundle folder"):
        load_bundle(bundle_copy / "nope")


def test_corrupted_onnx_bytes_fail_the_hash(bundle_copy):
    path = bundle_copy / "audio.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"audio\.onnx: sha256 .* does not match"):
        load_bundle(bundle_copy, backend="onnx-cpu")


def test_corrupted_onnx_with_a_matching_hash_is_still_refused(bundle_copy):
    (bundle_copy / "audio.onnx").write_bytes(b"\x08\x07garbage, not a protobuf model")
    _rehash(bundle_copy, "audio.onnx")
    with pytest.raises(BundleError, match=r"audio\.onnx: not a loadable ONNX graph"):
        load_bundle(bundle_copy, backend="onnx-cpu")


def test_corrupted_weights_with_a_matching_hash_fail_the_torch_backend(bundle_copy):
    (bundle_copy / "weights.safetensors").write_bytes(b"not safetensors")
    _rehash(bundle_copy, "weights.safetensors")
    with pytest.raises(BundleError, match=r"weights\.safetensors: not a readable safetensors file"):
        load_bundle(bundle_copy, backend="torch-cpu")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(bundle_version=99), r"bundle_version 99 is not supported"),
        (lambda m: m.update(format="tarball"), r"format 'tarball', expected 'srcid-bundle'"),
        (lambda m: m["modalities"]["audio"].update(shape=[21]), r"modality 'audio' says shape \[21\]"),
        (lambda m: m.update(T=12), r"field 'T' is 12"),
        (lambda m: m["files"].pop("text.onnx"), r"\['text\.onnx'\] are used but have no sha256"),
        (lambda m: m["files"].update({"../escape": "0" * 64}), r"does not stay inside the bundle"),
        (lambda m: m.pop("embedding_dim"), r"field 'embedding_dim': Field required"),
    ],
    ids=["version", "format", "shape", "T", "unlisted", "escape", "missing-field"],
)
def test_tampered_manifest(bundle_copy, edit, message):
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy, backend="onnx-cpu")


def test_manifest_that_is_not_json(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_copy)


# --- bad input to encode: a clear ValueError, nothing run ---


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    _, bundle_dir = built_bundle(tmp_path_factory)
    return load_bundle(bundle_dir, backend="onnx-cpu", threads=1)


def test_bad_input_is_refused_clearly(bundle):
    T = bundle.manifest.T
    audio = bundle.manifest.modalities["audio"].shape
    text = bundle.manifest.modalities["text"].shape
    good = np.zeros((2, T, *audio), np.float32)
    nan = good.copy()
    nan[1, 2, 0] = np.nan
    cases = [
        (("smell", good), r"unknown modality 'smell'; this bundle encodes \['audio', 'video', 'text'\]"),
        (("audio", np.zeros((2, T, audio[0] + 1), np.float32)), r"audio features have shape .* expects \[B, "),
        (("audio", np.zeros((2, T + 1, *audio), np.float32)), r"audio features have shape"),
        (("audio", np.zeros((T, *audio), np.float32)), r"audio features have shape"),
        (("audio", np.zeros((0, T, *audio), np.float32)), r"empty batch"),
        (("audio", nan), r"1 NaN/inf values \(first at index \[1, 2, 0\]\)"),
        (("audio", np.full((2, T, *audio), np.inf)), r"NaN/inf"),
        (("audio", np.full((2, T, *audio), "a")), r"must be numbers"),
        (("audio", good, np.ones((2, T), bool)), r"audio takes no mask"),
        (("text", np.zeros((2, T, *text), np.float32), np.ones((2, T + 1), bool)), r"text mask has shape"),
        (("text", np.zeros((2, T, *text), np.float32), np.full((2, T), 0.5)), r"text mask must be bool"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            bundle.encode(*args)


def test_float64_and_integer_masks_are_accepted(bundle):
    T = bundle.manifest.T
    x = np.random.default_rng(0).standard_normal((3, T, *bundle.manifest.modalities["text"].shape))
    mask = np.ones((3, T), np.int64)
    mask[0, 5:] = 0
    a = bundle.encode("text", x, mask)
    b = bundle.encode("text", x.astype(np.float32), mask.astype(bool))
    np.testing.assert_array_equal(a["layer1"], b["layer1"])
    # no mask on a masked modality means every step is valid
    np.testing.assert_array_equal(bundle.encode("text", x)["layer1"], bundle.encode("text", x, np.ones((3, T), bool))["layer1"])


# --- denormals flushed around the onnxruntime call ---


def test_flushed_denormals_switches_the_calling_thread_for_the_block_only():
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no denormal flush (FTZ/DAZ)")
    assert not denormals_flushed()
    with flushed_denormals():
        assert denormals_flushed()
    assert not denormals_flushed()
    with pytest.raises(RuntimeError), flushed_denormals():
        raise RuntimeError("the runtime failed")
    assert not denormals_flushed()
    # A block inside another, or in a thread that flushes of its own accord, leaves it flushing.
    with flushed_denormals():
        with flushed_denormals():
            pass
        assert denormals_flushed()
    assert not denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        with flushed_denormals():
            pass
        assert denormals_flushed()
    finally:
        torch.set_flush_denormal(False)
    assert np.float32(1e-30) * np.float32(1e-10) > 0, "denormals_flushed itself must not change the thread's state"


def test_onnx_backend_runs_with_denormals_flushed_and_gives_the_same_outputs():
    """The embedded bundle's ±1-step attention window makes denormals in onnxruntime's Softmax: the flushed run
    must give the codes of an unflushed session to the bit, and the session must flush in its own threads too."""
    import onnxruntime as ort

    from srcid.service.settings import EMBEDDED_BUNDLE

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no denormal flush (FTZ/DAZ)")
    bundle = load_bundle(EMBEDDED_BUNDLE, backend="onnx-cpu", threads=1)
    assert not denormals_flushed()  # onnxruntime's option flushes the thread that creates a session, for good
    backend = bundle._backend
    seen = []

    class Recording:
        def __init__(self, session):
            self.session = session

        def get_outputs(self):
            return self.session.get_outputs()

        def run(self, names, feeds):
            seen.append(denormals_flushed())
            return self.session.run(names, feeds)

    x = np.random.default_rng(0).standard_normal((64, bundle.manifest.T, 128)).astype(np.float32)
    plain = ort.InferenceSession(str(EMBEDDED_BUNDLE / "audio.onnx"), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in plain.get_outputs()], plain.run(None, {"features": x})))
    session = backend.sessions["audio"]
    assert session.get_session_options().get_session_config_entry("session.set_denormal_as_zero") == "1"
    backend.sessions["audio"] = Recording(session)
    got = bundle.encode("audio", x)
    assert seen == [True] and not denormals_flushed()
    np.testing.assert_array_equal(got["layer1"], want["layer1"])
    np.testing.assert_array_equal(got["layer2"], want["layer2"])
    np.testing.assert_allclose(got["embedding"], want["embedding"], rtol=0, atol=1e-6)
