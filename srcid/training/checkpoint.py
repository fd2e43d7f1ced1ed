"""Checkpoints as one safetensors file: weights, optimiser and RNG state as tensors, config and counters as metadata.

Tensor keys: `model.<name>` (parameters and buffers), `warm.<name>`, `opt.<i>.<field>` / `club_opt.<i>.<field>`
(Adam state per parameter index), `rng.cpu`, `rng.cuda.<device>`. Metadata (strings): `format` = "srcid-checkpoint",
`version`, `config` (the training config as JSON, whose "model" entry is the SRCIDConfig), `step`, `epoch`,
`batch_in_epoch`, `data_fingerprint`, and the optimisers' `param_groups` as JSON. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..model import SRCID, SRCIDConfig

FORMAT = "srcid-checkpoint"
VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or lacks something it must hold."""


def _optimizer_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    state = opt.state_dict()
    tensors = {
        f"{prefix}.{i}.{k}": v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
        for i, fields in state["state"].items()
        for k, v in fields.items()
    }
    return tensors, json.dumps(state["param_groups"])


def _load_optimizer(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor], groups: str) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            _, i, field = key.split(".", 2)
            state.setdefault(int(i), {})[field] = value
    opt.load_state_dict({"state": state, "param_groups": json.loads(groups)})


def save_checkpoint(path: str | Path, model: SRCID, trainer: Any, meta: dict[str, Any]) -> Path:
    """Write atomically (temp file, fsync, rename). `trainer` is a TrainStep; `meta` holds config, step, etc."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"warm.{k}": v.detach().cpu().contiguous() for k, v in trainer.warm.state_dict().items()})
    opt_tensors, opt_groups = _optimizer_tensors("opt", trainer.opt)
    club_tensors, club_groups = _optimizer_tensors("club_opt", trainer.club_opt)
    tensors.update(opt_tensors)
    tensors.update(club_tensors)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    metadata.update(format=FORMAT, version=VERSION, opt_groups=opt_groups, club_opt_groups=club_groups)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a checkpoint, checked for format and the keys every checkpoint must have."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an srcid checkpoint (format={metadata.get('format')!r})")
    if metadata.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {metadata.get('version')!r}, this srcid reads {VERSION}")
    for key in ("config", "step"):
        if key not in metadata:
            raise CheckpointError(f"{path}: metadata has no {key!r}")
    return tensors, metadata


def model_config(metadata: dict[str, str]) -> SRCIDConfig:
    return SRCIDConfig.model_validate(json.loads(metadata["config"])["model"])


def load_model_state(model: SRCID, tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the model in its config: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, the config needs {tuple(expected[k].shape)}")
    model.load_state_dict(state)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[SRCID, dict[str, str]]:
    """The model of a checkpoint, in eval mode, and the checkpoint's metadata."""
    tensors, metadata = read_checkpoint(path)
    model = SRCID(model_config(metadata))
    load_model_state(model, tensors, path)
    return model.to(device).eval(), metadata


def restore_trainer(trainer: Any, tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | Path) -> None:
    """Optimiser, warm-start and RNG state of a checkpoint into a TrainStep built on the restored model."""
    warm = {k[len("warm.") :]: v for k, v in tensors.items() if k.startswith("warm.")}
    if not warm:
        raise CheckpointError(f"{path}: holds no warm-start state (a weights-only file cannot resume training)")
    trainer.warm.load_state_dict(warm)
    _load_optimizer(trainer.opt, "opt", tensors, metadata["opt_groups"])
    _load_optimizer(trainer.club_opt, "club_opt", tensors, metadata["club_opt_groups"])
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    trainer.step_count = int(metadata["step"])
