"""The multimodal pretraining mixture: sources that turn built-in data into documents of
`Segment`s, and a loader that samples them by weight (data.mixture) and packs them into rows
(data/multimodal.py).

A source is registered by name (the fields of config.MixtureConfig) with a factory taking the
`MixtureContext` (config, text tokenizer, split) and returning a `Source`:

    len(source)                   number of distinct items of the split
    source.document(i, rng)       one document: a list of Segments (text, image scales, audio
                                  frames...)
    source.longest()              (optional) positions of its longest document; the loader
                                  refuses a data.seq_len below it before the first step

The text source is defined here; the image/video sources (data/vision_sources.py) and the audio
sources (data/audio_sources.py) register from their own modules, imported by `load_source_modules`.
The rows of step t are drawn from Generator([seed, t]) alone, so the loader's whole state is the
step: resuming gives the same batches.

Legend: S row length, N rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..config import SPECIAL_TOKENS, Config, ConfigError
from ..plugins import import_optional
from .multimodal import Segment, pack_segments, text_segment


class Source(Protocol):
    def __len__(self) -> int: ...

    def document(self, index: int, rng: np.random.Generator) -> list[Segment]: ...


@dataclass
class MixtureContext:
    cfg: Config
    tokenizer: object  # tokenizers/text.TextTokenizer
    split: str  # "train" | "val"
    text_docs: list[list[int]] = field(default_factory=list)  # encoded text corpus of the split
    # Shared by the sources of one modality (tokenised data).
    cache: dict = field(default_factory=dict)

    def special_id(self, name: str) -> int:
        """Id of a modality delimiter, e.g. special_id("<boi>") (config.SPECIAL_TOKENS)."""
        return self.cfg.model.vocab_size + SPECIAL_TOKENS.index(name)

    def text(self, s: str) -> list[int]:
        return list(self.tokenizer.encode(s))


SOURCES: dict[str, Callable[[MixtureContext], Source]] = {}
# Modules that register the image/video and audio sources on import.
SOURCE_MODULES = (
    "paddle_ernie5.data.vision_sources",
    "paddle_ernie5.data.audio_sources",
    "paddle_ernie5.data.long_context",
)


def register_source(name: str):
    def wrap(factory):
        SOURCES[name] = factory
        return factory

    return wrap


def load_source_modules() -> None:
    import_optional(SOURCE_MODULES)


class TextSource:
    """A random window of a corpus document, <bos> first; long documents give several windows."""

    def __init__(self, ctx: MixtureContext):
        self.docs = [d for d in ctx.text_docs if len(d) > 0]
        self.bos = ctx.tokenizer.bos_id
        self.max_len = ctx.cfg.data.seq_len

    def __len__(self) -> int:
        return len(self.docs)

    def document(self, index: int, rng: np.random.Generator) -> list[Segment]:
        doc = self.docs[index]
        n = int(rng.integers(max(8, self.max_len // 4), self.max_len))  # row share, <bos> included
        start = int(rng.integers(0, max(1, len(doc) - (n - 1) + 1)))
        return [text_segment([self.bos] + doc[start : start + n - 1])]


register_source("text")(TextSource)


def draw_documents(
    sources: dict[str, Source],
    weights: dict[str, float],
    rng: np.random.Generator,
    seq_len: int,
    rows: int,
) -> tuple[list[list[Segment]], list[str]]:
    """Documents (and their source names) filling `rows` rows of `seq_len` in packing order."""
    names = [k for k, w in weights.items() if w > 0]
    p = np.array([weights[k] for k in names], dtype=np.float64)
    p /= p.sum()
    docs, drawn = [], []
    row, used = 0, 0
    misses = 0
    while row < rows:
        name = names[int(rng.choice(len(names), p=p))]
        src = sources[name]
        doc = src.document(int(rng.integers(0, len(src))), rng)
        n = sum(len(s) for s in doc)
        if n > seq_len:
            raise ValueError(
                f"a {name!r} document has {n} positions, more than data.seq_len={seq_len}; "
                "raise data.seq_len (and model.max_seq_len) or shrink the modality"
            )
        if used + n > seq_len:
            if used == 0 or misses >= 4 or row + 1 >= rows:
                row, used, misses = row + 1, 0, 0  # close the row (padding) and start the next
                if row >= rows:
                    break
            else:
                misses += 1  # try a few more draws that may still fit this row
                continue
        docs.append(doc)
        drawn.append(name)
        used += n
    return docs, drawn


def check_document_lengths(sources: dict[str, Source], seq_len: int) -> None:
    """Every document a source can make fits a row: checked once, when the loader is built, so a
    long document fails before training rather than at the step that first draws it."""
    for name, src in sources.items():
        longest = getattr(src, "longest", None)
        n = longest() if longest is not None else 0
        if n > seq_len:
            raise ConfigError(
                f"data.seq_len={seq_len} is too short for the {name!r} source: its longest "
                f"document has {n} positions; raise data.seq_len and model.max_seq_len to at "
                f"least {n}, make its pictures or speech shorter, or set data.mixture.{name}=0"
            )


class MixtureLoader:
    """Infinite stream of packed multimodal batches (numpy), `batch_size` rows each."""

    def __init__(self, ctx: MixtureContext, batch_size: int, seed: int):
        load_source_modules()
        weights = ctx.cfg.data.mixture.weights()
        missing = [k for k, w in weights.items() if w > 0 and k not in SOURCES]
        if missing:
            raise ValueError(
                f"data.mixture gives weight to {missing}, which no module registers; "
                f"registered: {sorted(SOURCES)}"
            )
        self.weights = weights
        self.sources = {k: SOURCES[k](ctx) for k, w in weights.items() if w > 0}
        self.seq_len = ctx.cfg.data.seq_len
        check_document_lengths(self.sources, self.seq_len)
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = ctx.tokenizer.pad_id
        self.step = 0
        self.last_sources: list[str] = []
        # Positions each source filled in the last batch (padding not counted).
        self.last_positions: dict[str, int] = {}

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        docs, sources = draw_documents(
            self.sources, self.weights, rng, self.seq_len, self.batch_size
        )
        self.last_sources = sources
        self.last_positions = {k: 0 for k in self.sources}
        for name, doc in zip(sources, docs):
            self.last_positions[name] += sum(len(seg) for seg in doc)
        batch = pack_segments(docs, self.seq_len, self.pad_id)
        n = batch["input_ids"].shape[0]
        if n != self.batch_size:
            raise AssertionError(f"packed {n} rows, expected {self.batch_size}")
        return batch

    def next_batch(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
