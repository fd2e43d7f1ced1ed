"""`srcid export`: the manifest, the ONNX graphs' signatures, the CLI, the paper's dims, the dynamo exporter."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from test_export_parity import TIE, code_margins
from test_export_support import built_bundle, make_checkpoint, one_torch_thread, random_inputs, small_config  # noqa: F401

from srcid.cli import main as cli_main
from srcid.model import SRCID, SRCIDConfig
from srcid.runtime import load_bundle
from srcid.runtime.manifest import sha256_file
from srcid.training.checkpoint import load_model, save_checkpoint
from srcid.training.export import AVDIGITS_FRONTENDS, PAPER_FRONTENDS, _data_fingerprint, export_bundle, export_graph
from srcid.training.step import OptimConfig, TrainStep, WarmStartConfig

ONNX_INT64, ONNX_FLOAT, ONNX_BOOL = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_manifest_describes_the_bundle(tmp_path_factory):
    ckpt, bundle = built_bundle(tmp_path_factory)
    manifest = json.loads((bundle / "manifest.json").read_text())
    cfg = small_config()
    assert manifest["format"] == "srcid-bundle" and manifest["bundle_version"] == 1
    assert manifest["T"] == cfg.T and manifest["layers"] == 2 and manifest["quantizer"] == "vq"
    assert manifest["codebook_sizes"] == {"layer1": 24, "layer2": 24}
    assert manifest["embedding_dim"] == 64 and manifest["opset"] >= 17
    assert manifest["data_fingerprint"] is None  # test checkpoints record none
    assert manifest["checkpoint"] == {"file": ckpt.name, "sha256": sha256_file(ckpt), "step": 3}
    assert SRCIDConfig.model_validate(manifest["model"]) == cfg
    for m, spec in cfg.modalities.items():
        entry = manifest["modalities"][m]
        assert entry["shape"] == list(spec.shape) and entry["masked"] == spec.masked
        assert entry["onnx"] == f"{m}.onnx" and entry["frontend"] == {"name": AVDIGITS_FRONTENDS[m], "files": []}
        assert entry["inputs"] == (["features", "mask"] if spec.masked else ["features"])
    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in on_disk if f != "manifest.json"]
    assert all(sha256_file(bundle / f) == digest for f, digest in manifest["files"].items())


def test_graphs_pass_the_checker_with_the_documented_signature(tmp_path_factory):
    _, bundle = built_bundle(tmp_path_factory)
    cfg = small_config()
    for m, spec in cfg.modalities.items():
        proto = onnx.load(str(bundle / f"{m}.onnx"))
        onnx.checker.check_model(proto, full_check=True)
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
        inputs = {i.name: i for i in proto.graph.input}
        assert inputs["features"].type.tensor_type.elem_type == ONNX_FLOAT
        assert _dims(inputs["features"]) == ["batch", cfg.T, *spec.shape]
        if spec.masked:
            assert inputs["mask"].type.tensor_type.elem_type == ONNX_BOOL
            assert _dims(inputs["mask"]) == ["batch", cfg.T]
        outputs = {o.name: o for o in proto.graph.output}
        assert list(outputs) == ["layer1", "layer2", "embedding"]
        assert [outputs[n].type.tensor_type.elem_type for n in outputs] == [ONNX_INT64, ONNX_INT64, ONNX_FLOAT]
        assert _dims(outputs["layer1"]) == _dims(outputs["layer2"]) == ["batch", cfg.T]
        assert _dims(outputs["embedding"]) == ["batch", 64]


def test_one_layer_bundle_reports_no_layer2(tmp_path_factory):
    _, bundle_dir = built_bundle(tmp_path_factory, "fsq1", quantizer="fsq", layers=1, codebook_size=24,
                                 fsq_levels=(4, 3, 2), only=("video", "text"))
    bundle = load_bundle(bundle_dir, backend="onnx-cpu", threads=1)
    assert bundle.manifest.codebook_sizes == {"layer1": 24} and bundle.manifest.no_code == -1
    out = bundle.encode("video", *random_inputs(small_config().modalities["video"], 3, bundle.manifest.T,
                                                np.random.default_rng(0)))
    assert (out["layer2"] == -1).all() and out["layer2"].shape == out["layer1"].shape
    assert out["embedding"].shape == (3, 32)


def test_rvq_bundle_also_returns_every_stage(tmp_path_factory):
    _, bundle_dir = built_bundle(tmp_path_factory, "rvq2", quantizer="rvq2", only=("audio", "text"))
    bundle = load_bundle(bundle_dir, backend="onnx-cpu", threads=1)
    x, _ = random_inputs(small_config().modalities["audio"], 4, bundle.manifest.T, np.random.default_rng(0))
    out = bundle.encode("audio", x)
    assert out["layer1_stages"].shape == (4, bundle.manifest.T, 2)
    np.testing.assert_array_equal(out["layer1_stages"][..., 0], out["layer1"])


def test_cli_export_copies_frontend_files_records_fingerprint_and_refuses_to_overwrite(tmp_path, capsys):
    cfg = small_config(only=("audio", "text"))
    ckpt = make_checkpoint(tmp_path / "m.safetensors", cfg, steps=1, data_fingerprint="f00d")
    weights = tmp_path / "vggish.safetensors"
    weights.write_bytes(b"front-end weights")
    out = tmp_path / "bundle"
    args = ["export", "--checkpoint", str(ckpt), "--out", str(out), "--frontend", f"audio=vggish:{weights}"]
    assert cli_main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data_fingerprint"] == "f00d"
    assert manifest["modalities"]["audio"]["frontend"] == {"name": "vggish", "files": ["frontends/audio/vggish.safetensors"]}
    assert manifest["modalities"]["text"]["frontend"]["name"] == AVDIGITS_FRONTENDS["text"]
    assert (out / "frontends/audio/vggish.safetensors").read_bytes() == b"front-end weights"
    assert manifest["files"]["frontends/audio/vggish.safetensors"] == sha256_file(weights)
    capsys.readouterr()

    assert cli_main(args) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text()) == manifest  # the refused export changed nothing
    bad_cases = [
        (["--frontend", "audio"], "expected MODALITY=NAME"),
        (["--frontend", f"smell=nose:{weights}"], "names modality 'smell'"),
        (["--frontend", "audio=vggish:/no/such/file"], "does not exist"),
    ]
    for extra, message in bad_cases:
        assert cli_main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b2"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert cli_main(["export", "--checkpoint", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "b3")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "b2").exists() and not (tmp_path / "b3").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left behind


def test_data_fingerprint_is_read_from_metadata_or_config():
    config = json.dumps({"model": {}})
    assert _data_fingerprint({"config": config, "data_fingerprint": "ab12"}) == "ab12"
    assert _data_fingerprint({"config": config, "data_fingerprint": '"ab12"'}) == "ab12"  # JSON-encoded by save
    assert _data_fingerprint({"config": config, "data_fingerprint": ""}) is None  # srcid train without one
    assert _data_fingerprint({"config": config}) is None
    assert _data_fingerprint({"config": json.dumps({"model": {}, "data_fingerprint": "cd34"})}) == "cd34"


def test_paper_dims_export_checks_and_matches_torch(tmp_path):
    """The paper's dims (audio 128, video 7x7x512, text 768 masked, hidden 256, codebook 400), untrained."""
    torch.manual_seed(0)
    cfg = SRCIDConfig()
    model = SRCID(cfg)
    trainer = TrainStep(model, OptimConfig(), WarmStartConfig())
    ckpt = save_checkpoint(tmp_path / "paper.safetensors", model, trainer,
                           {"config": {"model": cfg.model_dump(mode="json")}, "step": 0})
    del model, trainer
    export_bundle(ckpt, tmp_path / "bundle")  # runs the ONNX checker on every graph
    bundle = load_bundle(tmp_path / "bundle", backend="onnx-cpu")
    assert bundle.manifest.embedding_dim == 512 and bundle.manifest.codebook_sizes == {"layer1": 400, "layer2": 400}
    assert {m: e.frontend.name for m, e in bundle.manifest.modalities.items()} == PAPER_FRONTENDS
    model, _ = load_model(ckpt)
    rng = np.random.default_rng(3)
    for m, spec in cfg.modalities.items():
        for B in (1, 3):
            x, mask = random_inputs(spec, B, cfg.T, rng)
            got = bundle.encode(m, x, mask)
            xt, mt = torch.from_numpy(x), None if mask is None else torch.from_numpy(mask)
            want = model.encode(m, xt, mt)
            for name, margin in zip(("layer1", "layer2"), code_margins(model, m, xt, mt)):
                differ = got[name] != want[name].numpy()
                assert not differ.any() or float(margin.numpy()[differ].max()) < TIE
            np.testing.assert_allclose(got["embedding"], want["embedding"].numpy(), atol=1e-4)


def test_dynamo_exporter_gives_the_same_outputs(tmp_path_factory, tmp_path):
    ckpt, _ = built_bundle(tmp_path_factory)
    model, _ = load_model(ckpt)
    path = tmp_path / "text.onnx"
    export_graph(model, "text", path, exporter="dynamo")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    for B in (1, 7):
        x, mask = random_inputs(model.cfg.modalities["text"], B, model.cfg.T, rng)
        got = dict(zip(["layer1", "layer2", "embedding"], session.run(None, {"features": x, "mask": mask})))
        want = model.encode("text", torch.from_numpy(x), torch.from_numpy(mask))
        np.testing.assert_array_equal(got["layer1"], want["layer1"].numpy())
        np.testing.assert_array_equal(got["layer2"], want["layer2"].numpy())
        np.testing.assert_allclose(got["embedding"], want["embedding"].numpy(), atol=1e-5)


def test_unknown_exporter_is_refused(tmp_path_factory, tmp_path):
    ckpt, _ = built_bundle(tmp_path_factory)
    model, _ = load_model(ckpt)
    with pytest.raises(ValueError, match="unknown exporter"):
        export_graph(model, "audio", tmp_path / "a.onnx", exporter="tflite")
