"""`srcid eval` end to end on synthetic shards: a briefly trained model against an untrained one, the report's
shape and files, the CLI, and clear errors for checkpoints and data that do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from srcid.cli import main
from srcid.model import SRCID
from srcid.training.checkpoint import load_model, save_checkpoint
from srcid.training.data import open_dataset
from srcid.training.evaluate import CLASSIFICATION_KEYS, RETRIEVAL_KEYS, evaluate
from srcid.training.shards import write_shards
from srcid.training.step import OptimConfig, TrainStep, WarmStartConfig
from srcid.training.synthetic import synthetic_split, write_synthetic_shards
from srcid.training.train import TrainConfig, train

SMALL = {"hidden": 32, "heads": 4, "ff": 64, "codebook_size": 32, "club_hidden": 32}
STEPS = 60


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Synthetic shards, a checkpoint trained for STEPS steps, and an untrained one of the same config."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    write_synthetic_shards(root / "shards", sizes={"train": 256, "test": 96}, seed=0)
    cfg = TrainConfig(model=SMALL, steps=STEPS, batch_size=32, warm={"force_step": STEPS // 2}, device="cpu",
                      log_every=STEPS)  # fmt: skip
    train(cfg, open_dataset(root / "shards", "train"), root / "trained")
    model_cfg = load_model(root / "trained" / "last.safetensors")[0].cfg
    torch.manual_seed(0)
    fresh = SRCID(model_cfg)
    save_checkpoint(root / "untrained.safetensors", fresh, TrainStep(fresh, OptimConfig(), WarmStartConfig()),
                    {"config": {"model": model_cfg.model_dump(mode="json")}, "step": 0})  # fmt: skip
    yield root
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cli_report(workdir) -> tuple[int, Path]:
    out = workdir / "report-trained"
    rc = main(["eval", "--checkpoint", str(workdir / "trained" / "last.safetensors"), "--data",
               str(workdir / "shards"), "--out", str(out), "--toc-fraction", "0.25", "--seed", "3"])  # fmt: skip
    return rc, out


def test_trained_model_beats_untrained_on_probes_and_retrieval(workdir, cli_report):
    rc, out = cli_report
    assert rc == 0
    trained = json.loads((out / "report.json").read_text())
    untrained = evaluate(workdir / "untrained.safetensors", workdir / "shards", None, seed=3)
    t, u = trained["summary"], untrained["summary"]
    assert t["cross_modal_accuracy"] > u["cross_modal_accuracy"] + 0.15, (t, u)
    assert t["retrieval_r10"] > u["retrieval_r10"] + 0.1, (t, u)
    # the trained encoder ends well above the majority-class guess on every cross-modal pair
    for key, acc in trained["classification"].items():
        assert acc > trained["chance"]["classification"][key] + 0.1, key


def test_report_has_the_required_shape_and_files(cli_report):
    _, out = cli_report
    report = json.loads((out / "report.json").read_text())
    assert list(report["classification"]) == list(CLASSIFICATION_KEYS)
    assert list(report["retrieval"]) == list(RETRIEVAL_KEYS)
    assert list(report["classification_macro_f1"]) == list(CLASSIFICATION_KEYS)
    for key, acc in report["classification"].items():
        assert 0.0 <= acc <= 1.0 and 0.0 <= report["classification_macro_f1"][key] <= 1.0
    for figures in report["retrieval"].values():
        assert set(figures) == {"r1", "r5", "r10", "medr"}
        assert 0.0 <= figures["r1"] <= figures["r5"] <= figures["r10"] <= 1.0
        assert 1.0 <= figures["medr"] <= 96
    codebook = report["codebook"]
    assert {"layer1_usage", "layer2_usage", "layer1_perplexity", "layer2_perplexity"} <= set(codebook)
    assert 0.0 < codebook["layer1_usage"] <= 1.0 and 0.0 < codebook["layer2_usage"] <= 1.0
    assert 1.0 <= codebook["layer1_perplexity"] <= 32
    assert report["chance"]["uniform"] == 1 / 8
    toc = report["toc"]
    assert toc["dims"] == 16 and toc["of"] == 64 and len(toc["selected"]) == 16
    assert list(toc["classification"]) == list(CLASSIFICATION_KEYS)
    assert report["meta"]["seed"] == 3 and report["meta"]["clips"] == {"train": 256, "test": 96}
    assert report["meta"]["same_data_as_training"] is True
    for png in ("classification.png", "retrieval.png", "toc.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert "| audio → video |" in markdown and "## TOC: 16 of 64 dimensions kept" in markdown


def test_evaluation_is_deterministic(workdir):
    first = evaluate(workdir / "untrained.safetensors", workdir / "shards", None, toc_dims=8, seed=1)
    second = evaluate(workdir / "untrained.safetensors", workdir / "shards", None, toc_dims=8, seed=1)
    first.pop("meta"), second.pop("meta")
    assert first == second


def test_bad_input_gives_clear_errors(workdir, tmp_path, capsys):
    ckpt = workdir / "untrained.safetensors"
    with pytest.raises(FileNotFoundError, match="no-such.safetensors: no such checkpoint"):
        evaluate(tmp_path / "no-such.safetensors", workdir / "shards", None)

    write_synthetic_shards(tmp_path / "wide", sizes={"train": 8, "test": 8}, seed=0,
                           dims={"audio": 20, "video": 48, "text": 24})  # fmt: skip
    with pytest.raises(ValueError, match=r"audio features are \[20\] per step, the checkpoint expects \[32\]"):
        evaluate(ckpt, tmp_path / "wide", None)

    write_synthetic_shards(tmp_path / "av", sizes={"train": 8, "test": 8}, seed=0, dims={"audio": 32, "video": 48},
                           masked=())  # fmt: skip
    with pytest.raises(ValueError, match=r"no \['text'\] features"):
        evaluate(ckpt, tmp_path / "av", None)

    write_synthetic_shards(tmp_path / "short", sizes={"train": 8, "test": 8}, seed=0, T=6)
    with pytest.raises(ValueError, match="T=6 steps"):
        evaluate(ckpt, tmp_path / "short", None)

    splits = {}
    for split in ("train", "test"):
        ds = synthetic_split(split, n_clips=8, seed=0)
        splits[split] = {**{k: v for k, v in ds.arrays.items() if k != "labels"}, "ids": ds.ids}
    write_shards(tmp_path / "unlabelled", splits, ds.modalities, ds.T)
    with pytest.raises(ValueError, match="no labels"):
        evaluate(ckpt, tmp_path / "unlabelled", None)

    with pytest.raises(ValueError, match="toc_dims must be in 1..64"):
        evaluate(ckpt, workdir / "shards", None, toc_dims=65)

    rc = main(["eval", "--checkpoint", str(tmp_path / "gone.safetensors"), "--data", str(workdir / "shards"),
               "--out", str(tmp_path / "out")])  # fmt: skip
    assert rc == 2
    assert "srcid eval: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_explains_the_command(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    for phrase in ("--checkpoint", "--toc-dims", "--toc-fraction", "report.json", "a2v", "R@1/5/10"):
        assert phrase in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the encoders then run on the GPU")
def test_cuda_encoding_gives_the_cpu_report(workdir):
    ckpt, data = workdir / "trained" / "last.safetensors", workdir / "shards"
    on_cpu = evaluate(ckpt, data, None, seed=0, device="cpu")
    on_gpu = evaluate(ckpt, data, None, seed=0, device="cuda")
    # a code can flip where two codebook entries are nearly equidistant; the figures stay within a step or two
    for key, acc in on_cpu["classification"].items():
        assert on_gpu["classification"][key] == pytest.approx(acc, abs=0.03), key
    assert on_gpu["codebook"]["layer1_usage"] == pytest.approx(on_cpu["codebook"]["layer1_usage"], abs=0.07)


def test_report_says_whether_the_probes_saw_the_training_data(workdir, tmp_path, caplog):
    write_synthetic_shards(tmp_path / "other", sizes={"train": 32, "test": 16}, seed=1)
    with caplog.at_level("WARNING", logger="srcid.training.evaluate"):
        report = evaluate(workdir / "trained" / "last.safetensors", tmp_path / "other", None)
    assert report["meta"]["same_data_as_training"] is False
    assert "was trained on data" in caplog.text
    untrained = evaluate(workdir / "untrained.safetensors", tmp_path / "other", None)  # saved without a fingerprint
    assert untrained["meta"]["same_data_as_training"] is None
