"""Epoch-based loader of packed text batches with exact resume, plus the built-in text pipeline.

Epoch e: docs = docs_ids_fn(e) (BPE-dropout re-encodes here), document order and then row order
are shuffled with Generator(seed + e), the rows are cut into batches and the last incomplete batch
is dropped. The state is just (epoch, index of the next row), because everything else is
recomputed from the seed: resuming repacks the epoch and continues with the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from paddle_ernie5.data.packing import pack_documents
from paddle_ernie5.model.losses import IGNORE
from paddle_ernie5.tokenizers.text import BOS_ID, EOS_ID


class PackedTextLoader:
    """Infinite stream of training batches: dicts of numpy arrays with the batch dim first."""

    def __init__(
        self,
        docs_ids_fn: Callable[[int], list[list[int]]],
        seq_len: int,
        batch_size: int,
        pad_id: int,
        seed: int,
        shuffle: bool = True,
        bos_id: int = BOS_ID,
        eos_id: int = EOS_ID,
    ):
        self.docs_ids_fn = docs_ids_fn
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.bos_id, self.eos_id = bos_id, eos_id
        self.epoch = 0
        self.index = 0
        self._packed = None  # (epoch, packed arrays with rows already in epoch order)

    def _epoch_rows(self) -> dict[str, np.ndarray]:
        if self._packed is None or self._packed[0] != self.epoch:
            docs = self.docs_ids_fn(self.epoch)
            rng = np.random.default_rng(self.seed + self.epoch)
            if self.shuffle:
                # Shuffling documents first moves the row cuts, so each epoch splits documents
                # differently.
                docs = [docs[i] for i in rng.permutation(len(docs))]
            packed = pack_documents(docs, self.seq_len, self.pad_id, self.bos_id, self.eos_id)
            if self.shuffle:
                order = rng.permutation(len(packed["input_ids"]))
                packed = {k: v[order] for k, v in packed.items()}
            if len(packed["input_ids"]) < self.batch_size:
                raise ValueError(
                    f"epoch {self.epoch} packs {len(packed['input_ids'])} rows, fewer than "
                    f"batch_size={self.batch_size}"
                )
            self._packed = (self.epoch, packed)
        return self._packed[1]

    def next_batch(self) -> dict[str, np.ndarray]:
        rows = self._epoch_rows()
        if self.index + self.batch_size > len(rows["input_ids"]):
            self.epoch, self.index = self.epoch + 1, 0
            rows = self._epoch_rows()
        batch = {k: v[self.index : self.index + self.batch_size] for k, v in rows.items()}
        self.index += self.batch_size
        return batch

    def batches_per_epoch(self) -> int:
        return len(self._epoch_rows()["input_ids"]) // self.batch_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def eval_batches(packed: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Rows of a packing in order, batch_size at a time; the last batch may be smaller."""
    n = len(packed["input_ids"])
    for start in range(0, n, batch_size):
        yield {k: v[start : start + batch_size] for k, v in packed.items()}


def build_text_data(
    cache_dir: str,
    vocab_size: int,
    seq_len: int,
    batch_size: int,
    seed: int,
    bpe_dropout: float = 0.0,
    val_fraction: float = 0.05,
    split_seed: int | None = None,
):
    """(tokenizer, training loader, packed validation) for the built-in text corpus.

    Training documents are re-encoded each epoch with BPE-dropout seeded by seed + epoch; validation
    is always encoded without dropout. `split_seed` (data.split_seed; default `seed`) picks the
    train/validation split and so the tokenizer; `seed` the batches and the dropout."""
    from paddle_ernie5.data.text import build_text_corpus, get_text_tokenizer

    split_seed = seed if split_seed is None else split_seed
    train_docs, val_docs = build_text_corpus(split_seed, val_fraction)
    tok = get_text_tokenizer(cache_dir, vocab_size, split_seed, val_fraction)
    if bpe_dropout > 0.0:

        def docs_ids_fn(epoch: int) -> list[list[int]]:
            return tok.encode_batch(train_docs, dropout=bpe_dropout, seed=seed + epoch)
    else:
        fixed = tok.encode_batch(train_docs)

        def docs_ids_fn(epoch: int) -> list[list[int]]:
            return fixed

    loader = PackedTextLoader(
        docs_ids_fn, seq_len, batch_size, tok.pad_id, seed, bos_id=tok.bos_id, eos_id=tok.eos_id
    )
    val_packed = pack_documents(
        tok.encode_batch(val_docs), seq_len, tok.pad_id, tok.bos_id, tok.eos_id
    )
    return tok, loader, val_packed


def text_data_for(cfg, bpe_dropout: bool = False):
    """`build_text_data` with a run config's settings (data.*, model.vocab_size, train.batch_size
    and train.seed); BPE-dropout only when asked, as training uses it and evaluation does not."""
    dc, tc = cfg.data, cfg.train
    return build_text_data(
        dc.cache_dir,
        cfg.model.vocab_size,
        dc.seq_len,
        tc.batch_size,
        tc.seed,
        dc.bpe_dropout if bpe_dropout else 0.0,
        dc.val_fraction,
        dc.split_seed,
    )


def unigram_baseline(train_docs: list[list[int]], val_labels: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on the val targets of an add-one unigram model fit on the
    training tokens."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for doc in train_docs:
        np.add.at(counts, np.asarray(doc, dtype=np.int64), 1)
    logp = np.log(counts / counts.sum())
    targets = val_labels[val_labels != IGNORE]
    return float(-logp[targets].mean())
