"""The bundle manifest (`manifest.json`): what a bundle holds, what each encoder graph expects, and every file's hash.

A bundle folder::

    manifest.json            this schema
    <modality>.onnx          one encoder graph per modality (see graph.EncoderGraph for inputs/outputs)
    weights.safetensors      the same weights for the torch backends
    frontends/<modality>/*   front-end files, when a front-end needs any

Loading checks, before any graph runs: the format name, the bundle version, the schema, that the model config and
the per-modality entries agree, that every file named anywhere is listed in `files`, stays inside the bundle, exists,
and has the listed sha256.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..model import SRCIDConfig

FORMAT = "srcid-bundle"
BUNDLE_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


class BundleError(ValueError):
    """A bundle is missing a file, holds a corrupt or tampered one, or has a manifest this srcid cannot read."""


class FrontendEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="front-end name, e.g. vggish, logmel-pooled, minilm")
    files: list[str] = Field(default_factory=list, description="bundle-relative paths of the files it needs")


class ModalityEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shape: tuple[int, ...] = Field(description="per-step feature shape; the graph takes [B, T, *shape]")
    masked: bool = Field(description="the graph takes a mask [B, T] bool input")
    onnx: str = Field(description="bundle-relative path of the encoder graph")
    inputs: list[str]
    outputs: list[str]
    frontend: FrontendEntry


class CheckpointEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str = Field(description="name of the checkpoint the bundle was exported from")
    sha256: str
    step: int


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str
    bundle_version: int
    srcid_version: str
    created: str = Field(description="UTC time of export, ISO 8601")
    T: int
    layers: int
    quantizer: str
    stages: int = Field(description="layer-1 codes per step (n for RVQ-n, else 1)")
    codebook_sizes: dict[str, int] = Field(description='{"layer1": K1, "layer2": K2}; layer2 absent for 1 layer')
    embedding_dim: int
    no_code: int = Field(description="value of every layer-2 code of a one-layer model")
    opset: int
    exporter: str = Field(description="torch.onnx exporter used: torchscript or dynamo")
    modalities: dict[str, ModalityEntry]
    model: dict[str, Any] = Field(description="the SRCIDConfig the weights were trained with")
    weights: str
    data_fingerprint: Any = Field(description="fingerprint of the training data (null when unrecorded)")
    checkpoint: CheckpointEntry
    files: dict[str, str] = Field(description="bundle-relative path -> sha256 of every file but the manifest")

    def config(self) -> SRCIDConfig:
        return SRCIDConfig.model_validate(self.model)

    def referenced_files(self) -> list[str]:
        refs = [self.weights]
        for entry in self.modalities.values():
            refs.append(entry.onnx)
            refs.extend(entry.frontend.files)
        return refs


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _inside(root: Path, rel: str) -> Path:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise BundleError(f"{root / MANIFEST}: file path {rel!r} does not stay inside the bundle")
    return root / p


def _check_consistent(root: Path, m: Manifest) -> None:
    where = root / MANIFEST
    try:
        cfg = m.config()
    except ValidationError as exc:
        raise BundleError(f"{where}: field 'model' is not a valid SRCID config ({exc.errors()[0]['msg']})") from exc
    if list(m.modalities) != list(cfg.modalities):
        raise BundleError(f"{where}: modalities {list(m.modalities)} differ from the model's {list(cfg.modalities)}")
    for name, entry in m.modalities.items():
        spec = cfg.modalities[name]
        if tuple(entry.shape) != spec.shape or entry.masked != spec.masked:
            raise BundleError(
                f"{where}: modality {name!r} says shape {list(entry.shape)} masked={entry.masked}, "
                f"the model has {list(spec.shape)} masked={spec.masked}"
            )
    derived = {"T": cfg.T, "layers": cfg.layers, "quantizer": cfg.quantizer, "stages": cfg.stages,
               "embedding_dim": cfg.embedding_dim}
    for key, value in derived.items():
        if getattr(m, key) != value:
            raise BundleError(f"{where}: field {key!r} is {getattr(m, key)!r}, the model config says {value!r}")
    unlisted = sorted(set(m.referenced_files()) - set(m.files))
    if unlisted:
        raise BundleError(f"{where}: files {unlisted} are used but have no sha256 in 'files'")


def read_manifest(root: str | Path) -> Manifest:
    """Parse and check `root/manifest.json` and hash every listed file against it."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such bundle folder")
    if not path.is_file():
        raise BundleError(f"{path}: missing (is {root} a model bundle? `srcid export` writes one)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise BundleError(f"{path}: format {got!r}, expected {FORMAT!r}")
    # The version is checked before the schema: a newer bundle may have fields this srcid does not know.
    if raw.get("bundle_version") not in SUPPORTED_VERSIONS:
        raise BundleError(
            f"{path}: bundle_version {raw.get('bundle_version')!r} is not supported; this srcid reads "
            f"{list(SUPPORTED_VERSIONS)} (re-export the checkpoint with this srcid's `srcid export`)"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{path}: field {field!r}: {first['msg']}") from exc
    _check_consistent(root, manifest)
    for rel, digest in manifest.files.items():
        file = _inside(root, rel)
        if not file.is_file():
            raise BundleError(f"{file}: missing from the bundle (listed in {MANIFEST})")
        actual = sha256_file(file)
        if actual != digest:
            raise BundleError(
                f"{file}: sha256 {actual[:12]}... does not match the manifest's {digest[:12]}... "
                "(the file is corrupt or was changed after export)"
            )
    return manifest
