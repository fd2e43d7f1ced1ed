"""The training loop: learning on the synthetic set, warm start, exact resume, Ctrl-C, DDP over gloo, CLI errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from srcid.training.checkpoint import CheckpointError, load_model, read_checkpoint
from srcid.training.synthetic import synthetic_split
from srcid.training.train import TrainConfig, train

TINY = {"hidden": 32, "heads": 4, "ff": 64, "codebook_size": 32, "club_hidden": 32, "dead_code_steps": 20}


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cpu_training_learns_disentangles_switches_and_aligns_codes(tmp_path):
    """About a minute on an idle 2-core machine: the loss falls, the layer-1 MI estimate falls during warm-up, layer 2
    joins by the MI rule (not forced), and audio and video clips of the same step share layer-1 codes."""
    # One thread: a tiny model gains nothing from two, and OpenMP spinning under a loaded CI machine costs a lot.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = TrainConfig(
        model=TINY, steps=240, batch_size=32, log_every=10, ckpt_every=1000,
        warm={"threshold": 0.2, "patience": 10, "min_steps": 80},
    )  # fmt: skip
    try:
        train(cfg, synthetic_split("train", n_clips=512, seed=0), tmp_path)
    finally:
        torch.set_num_threads(threads)
    rec = _records(tmp_path)
    losses = [r["loss"] for r in rec]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2]), losses
    switch = rec[-1]["warm_switch_step"]
    assert switch is not None and switch >= 80, "layer 2 never joined"
    # The estimate first rises while the CLUB nets learn q(s|z), then falls as the encoders minimise it.
    warm_mi = [r["l1_mi"] for r in rec if r["step"] <= switch]
    peak = max(range(len(warm_mi)), key=warm_mi.__getitem__)
    assert peak < len(warm_mi) - 1 and warm_mi[-1] < 0.85 * warm_mi[peak], warm_mi

    model, _ = load_model(tmp_path / "last.safetensors")
    test = synthetic_split("test", n_clips=256, seed=0)
    a = model.encode("audio", torch.from_numpy(test.arrays["audio"]))["layer1"].flatten()
    v = model.encode("video", torch.from_numpy(test.arrays["video"]))["layer1"].flatten()
    agreement = float((a == v).float().mean())
    pa = torch.bincount(a, minlength=32).float() / len(a)
    pv = torch.bincount(v, minlength=32).float() / len(v)
    chance = float((pa * pv).sum())
    assert agreement > max(4 * chance, 0.3), (agreement, chance)


def _tiny_cfg(steps: int) -> TrainConfig:
    return TrainConfig(
        model={**TINY, "hidden": 16, "ff": 32, "club_hidden": 16}, steps=steps, batch_size=8, log_every=1,
        ckpt_every=3, warm={"force_step": 2},
    )  # fmt: skip


def test_resume_continues_exactly_like_the_uninterrupted_run(tmp_path):
    data = synthetic_split("train", n_clips=20, seed=1)  # 2 batches an epoch: resuming crosses an epoch
    train(_tiny_cfg(6), data, tmp_path / "full")
    train(_tiny_cfg(3), data, tmp_path / "half")
    train(_tiny_cfg(6), data, tmp_path / "half", resume=tmp_path / "half" / "ckpt-0000003.safetensors")
    full = {r["step"]: r["loss"] for r in _records(tmp_path / "full")}
    resumed = {r["step"]: r["loss"] for r in _records(tmp_path / "half")}
    assert resumed[4] == pytest.approx(full[4], rel=1e-6, abs=1e-7)
    assert [resumed[s] for s in (5, 6)] == pytest.approx([full[s] for s in (5, 6)], rel=1e-5)


def test_resume_refuses_another_model_config(tmp_path):
    data = synthetic_split("train", n_clips=20, seed=1)
    train(_tiny_cfg(3), data, tmp_path)
    other = _tiny_cfg(6).model_copy(update={"model": {**TINY, "hidden": 32}})
    with pytest.raises(ValueError, match="another model config"):
        train(other, data, tmp_path, resume=tmp_path / "last.safetensors")


def test_checkpoint_missing_key_or_corrupt_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    train(_tiny_cfg(2), synthetic_split("train", n_clips=16, seed=1), tmp_path)
    tensors, meta = read_checkpoint(tmp_path / "last.safetensors")
    dropped = {k: v for k, v in tensors.items() if "layer1.quantizer.book.embedding" not in k}
    save_file(dropped, str(tmp_path / "dropped.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="missing.*layer1.quantizer.book.embedding"):
        load_model(tmp_path / "dropped.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_model(tmp_path / "corrupt.safetensors")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "absent.safetensors")


def _srcid(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "srcid.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # fmt: skip


def _tiny_flags() -> list[str]:
    return [f"--set=model.{k}={v}" for k, v in {**TINY, "hidden": 16, "ff": 32, "club_hidden": 16}.items()]


def test_ctrl_c_writes_a_checkpoint(tmp_path):
    # As at a terminal: a shell that runs this suite in the background has SIGINT ignored, which Python would
    # inherit and keep, so Ctrl-C would never reach the trainer.
    proc = _srcid("train", "--synthetic", "--synthetic-clips", "64", "--out", str(tmp_path), "--steps", "100000",
                  "--batch-size", "8", "--log-every", "1", *_tiny_flags(),
                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
        time.sleep(0.5)
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    _, meta = read_checkpoint(tmp_path / "last.safetensors")
    assert int(meta["step"]) >= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_keep_identical_codebooks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "srcid.cli", "train", "--synthetic", "--synthetic-clips", "64",
           "--out", str(tmp_path), "--steps", "6", "--batch-size", "8", "--log-every", "3", "--device", "cpu",
           "--warm-force-step", "2", *_tiny_flags()]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = _records(tmp_path)[-1]
    assert final["codebooks_identical_across_ranks"] is True
    _, meta = read_checkpoint(tmp_path / "last.safetensors")
    assert meta["world_size"] == "2"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--synthetic", "--set", "optim.lr=-1"], "lr"),
        (["--synthetic", "--set", "model.codebook_size=0"], "codebook_size"),
        (["--synthetic", "--set", "nonsense=1"], "nonsense"),
        (["--data", "/nonexistent/shards"], "/nonexistent/shards"),
        ([], "exactly one of --data"),
    ],
)
def test_cli_bad_input_is_one_clear_line(tmp_path, args, message):
    proc = _srcid("train", "--out", str(tmp_path), "--steps", "1", *args)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert message in err and "Traceback" not in err, err
