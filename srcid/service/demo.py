"""The demo catalog shipped beside the embedded bundle (srcid/assets/demo/demo.json): loaded into an empty catalog
at start so that `srcid serve` answers /retrieve out of the box.

demo.json: {"items": [{"id", "modality", "metadata", and one of "file" (audio), "frames" (list of PNGs, video)
or "text"}]}, file names relative to the demo folder.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from srcid.index.errors import DuplicateIdError

from .media import read_b64, to_features
from .models import InputFields
from .settings import DEMO_DIR

if TYPE_CHECKING:
    from .state import ServiceState

log = logging.getLogger(__name__)


def demo_input(entry: dict[str, Any], root: Path) -> InputFields:
    """A demo.json entry as the INPUT a client would send."""
    if "text" in entry:
        return InputFields(text=entry["text"])
    if "frames" in entry:
        return InputFields(frames_b64=[read_b64(root / f) for f in entry["frames"]])
    return InputFields(audio_b64=read_b64(root / entry["file"]))


def read_demo(root: Path = DEMO_DIR) -> list[dict[str, Any]]:
    path = root / "demo.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: demo catalog list not found (scripts/build_demo_assets.py writes it)")
    return json.loads(path.read_text())["items"]


def load_demo(state: "ServiceState", root: Path = DEMO_DIR) -> int:
    """Encode every demo item with the service's bundle and add them to its catalog; returns how many."""
    bundle, catalog = state.bundle, state.catalog
    assert bundle is not None and catalog is not None
    entries = read_demo(root)
    by_modality: dict[str, list[dict]] = defaultdict(list)
    for entry in entries:
        by_modality[entry["modality"]].append(entry)
    items = []
    for modality, group in by_modality.items():
        x, mask = to_features([demo_input(e, root) for e in group], modality, bundle, state.frontends, "demo")
        out = bundle.encode(modality, x, mask)
        for row, entry in enumerate(group):
            enc = {k: out[k][row] for k in ("layer1", "layer2", "embedding")}
            items.append(state.new_item(entry["id"], modality, enc, entry.get("metadata", {})))
    try:
        catalog.add(items)
    except DuplicateIdError as exc:  # another replica filled the same empty catalog first
        log.info("demo catalog already there: %s", exc)
        return 0
    log.info("demo catalog loaded", extra={"figures": {m: len(g) for m, g in by_modality.items()}})
    return len(items)
