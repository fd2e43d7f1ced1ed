"""Front-ends by name, so a bundle manifest can name one per modality and a service can rebuild it."""

from __future__ import annotations

from typing import Any, Callable

from .base import FrontEnd


def _builtin() -> dict[str, tuple[str, Callable[..., FrontEnd]]]:
    """name -> (modality, factory); factories take T plus their own files/options as keyword arguments.
    Imported on demand so naming a front-end does not load torch networks or transformers."""
    from .logmel import LogMelPatches, LogMelPooled
    from .text import MiniLMWords, TransformerWords
    from .vggish import VGGish
    from .video_frontends import Pixels, VGG19Pool5

    return {
        "logmel": ("audio", LogMelPatches),
        "logmel-pooled": ("audio", LogMelPooled),
        "vggish": ("audio", VGGish),
        "pixels": ("video", Pixels),
        "vgg19-pool5": ("video", VGG19Pool5),
        "minilm": ("text", MiniLMWords),
        "bert": ("text", lambda **kw: TransformerWords(name="bert", **kw)),
    }


def frontend_names() -> dict[str, str]:
    """{front-end name: modality} for every known front-end."""
    return {name: modality for name, (modality, _) in _builtin().items()}


def get_frontend(name: str, **options: Any) -> FrontEnd:
    """Build the front-end called `name` with its files and options, e.g.
    `get_frontend("vggish", weights="vggish.safetensors")`, `get_frontend("bert", model_dir="bert-base-uncased/")`,
    `get_frontend("logmel-pooled", T=10)`. A manifest's `spec()` dict minus "modality"/"output_shape" (and
    with file names resolved to paths) rebuilds the same front-end.
    """
    known = _builtin()
    if name not in known:
        raise KeyError(f"unknown front-end {name!r}; known: {sorted(known)}")
    import inspect

    factory = known[name][1]
    accepted = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"front-end {name!r} takes no option {unknown}; it takes {sorted(accepted)}")
    return factory(**options)
