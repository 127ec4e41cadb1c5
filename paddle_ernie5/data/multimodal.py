"""Packing documents made of modality segments into fixed-length rows with one FlashMask layout.

A document is a list of `Segment`s (text, image or video scales, audio frames...). Every position
carries a block id: positions of one block (for example all tokens of one visual scale) see each
other bidirectionally; a block id of -1 marks an ordinary causal token. Across blocks, attention is
causal, and nothing crosses documents. The whole row is expressed with the non-causal FlashMask
layout [LTS, UTE] (use it with causal=False; the batch carries mask_causal=False):

    LTS_j = end of j's document          (rows at or after it are other documents or padding)
    UTE_j = j                            (causal token: earlier rows cannot see it)
          = start of j's block           (block member: the block sees it, earlier rows do not)

Padding columns get LTS = 0 (no row sees them). A text-only document gives exactly the causal
document mask. Documents are not split across rows (a visual block must stay whole): a document
longer than the row is an error, and a row is padded when the next document does not fit.

Legend: L segment length, S row length, N rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .packing import IGNORE


@dataclass
class Segment:
    token_types: np.ndarray  # [L] modality id per position (model/embeddings.MODALITY_IDS)
    positions: np.ndarray  # [3, L] Uni-RoPE (t, h, w)
    input_ids: np.ndarray | None = None  # [L] text ids (0 where not text)
    labels: np.ndarray | None = None  # [L] next-text-token targets (IGNORE where none)
    blocks: np.ndarray | None = None  # [L] block id (>= 0, local to the segment) or -1 (causal)
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # [L, ...] modality payloads
    # [L] segment-local row from which on a position is hidden (-1: visible to its document's end);
    # video uses it for the temporal window and for masking historical frames.
    horizon: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.token_types.shape[0])


def text_segment(ids, start_position: int = 0) -> Segment:
    """Causal text: labels are the next token inside the segment; t = h = w = position."""
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.concatenate([ids[1:], [IGNORE]]).astype(np.int64)
    pos = np.arange(start_position, start_position + ids.size, dtype=np.int64)
    return Segment(np.zeros(ids.size, np.int64), np.stack([pos, pos, pos]), ids, labels)


def row_mask(
    doc_lens: list[int], blocks: np.ndarray, seq_len: int, horizon: np.ndarray | None = None
) -> np.ndarray:
    """[S, 2] int32 [LTS, UTE] for one row holding documents of `doc_lens` (then padding).

    blocks   [sum(doc_lens)] row-global block id of each position (-1 = causal token)
    horizon  [sum(doc_lens)] optional: row-global row from which on the position is hidden
             (-1 = none)"""
    total = int(sum(doc_lens))
    if total > seq_len:
        raise ValueError(f"documents hold {total} positions but the row has {seq_len}")
    j = np.arange(total)
    lts = np.repeat(np.cumsum(doc_lens), doc_lens)
    if horizon is not None:
        lts = np.where(horizon >= 0, np.minimum(lts, horizon), lts)
    ute = j.copy()
    member = blocks >= 0
    if member.any():
        ids = blocks[member]
        first = {}
        for pos, b in zip(j[member], ids):
            first.setdefault(int(b), int(pos))
        ute[member] = [first[int(b)] for b in ids]
    lts = np.concatenate([lts, np.zeros(seq_len - total, np.int64)])
    ute = np.concatenate([ute, np.zeros(seq_len - total, np.int64)])
    return np.stack([lts, ute], axis=-1).astype(np.int32)


def _cat(parts, pad: int, fill, dtype, tail_shape=()) -> np.ndarray:
    """Concatenation of `parts` along the first axis followed by `pad` rows of `fill`."""
    a = np.concatenate(parts) if parts else np.zeros((0, *tail_shape), dtype)
    return np.concatenate([a.astype(dtype), np.full((pad, *tail_shape), fill, dtype)])


def pack_segments(
    docs: list[list[Segment]], seq_len: int, pad_id: int = 0, one_per_row: bool = False
) -> dict[str, np.ndarray]:
    """Rows of whole documents (in order) -> model batch arrays, mask_causal=False layout.
    `one_per_row`: row i holds document i alone (scoring, RL batches)."""
    rows: list[list[list[Segment]]] = [[]]
    used = 0
    for doc in docs:
        n = sum(len(s) for s in doc)
        if n > seq_len:
            raise ValueError(f"a document of {n} positions does not fit seq_len={seq_len}")
        if used + n > seq_len or (one_per_row and rows[-1]):
            rows.append([])
            used = 0
        rows[-1].append(doc)
        used += n
    if not rows[-1]:
        rows.pop()
    extra_keys = sorted({k for doc in docs for s in doc for k in s.extras})
    samples = {
        k: next(s.extras[k] for doc in docs for s in doc if k in s.extras) for k in extra_keys
    }
    out = {
        "input_ids": [],
        "labels": [],
        "token_types": [],
        "positions": [],
        "startend_row_indices": [],
    }
    out.update({k: [] for k in extra_keys})
    for row in rows:
        segs = [s for doc in row for s in doc]
        n = sum(len(s) for s in segs)
        pad = seq_len - n
        out["input_ids"].append(
            _cat(
                [s.input_ids if s.input_ids is not None else np.full(len(s), pad_id) for s in segs],
                pad,
                pad_id,
                np.int64,
            )
        )
        out["labels"].append(
            _cat(
                [s.labels if s.labels is not None else np.full(len(s), IGNORE) for s in segs],
                pad,
                IGNORE,
                np.int64,
            )
        )
        out["token_types"].append(_cat([s.token_types for s in segs], pad, 0, np.int64))
        out["positions"].append(_cat([s.positions.T for s in segs], pad, 0, np.int64, (3,)).T)
        blocks, horizon, offset, start = [], [], 0, 0
        for s in segs:
            b = np.full(len(s), -1, np.int64) if s.blocks is None else s.blocks.astype(np.int64)
            blocks.append(np.where(b >= 0, b + offset, -1))
            offset += int(b.max()) + 1 if (b >= 0).any() else 0
            h = np.full(len(s), -1, np.int64) if s.horizon is None else s.horizon.astype(np.int64)
            horizon.append(np.where(h >= 0, h + start, -1))
            start += len(s)
        doc_lens = [sum(len(s) for s in doc) for doc in row]
        out["startend_row_indices"].append(
            row_mask(
                doc_lens,
                np.concatenate(blocks) if blocks else np.zeros(0, np.int64),
                seq_len,
                np.concatenate(horizon) if horizon else None,
            )[None]
        )
        for k in extra_keys:
            sample = samples[k]
            parts = [
                s.extras[k]
                if k in s.extras
                else np.zeros((len(s), *sample.shape[1:]), sample.dtype)
                for s in segs
            ]
            out[k].append(_cat(parts, pad, 0, sample.dtype, sample.shape[1:]))
    batch = {k: np.stack(v) for k, v in out.items()}
    batch["mask_causal"] = False
    return batch
