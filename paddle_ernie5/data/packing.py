"""Pack tokenized documents into fixed-length causal sequences with FlashMask document masks.

Policy: the documents, each as [bos] + ids + [eos], are laid end to end in order and the stream is
cut every seq_len tokens. A document crossing a cut continues at the start of the next sequence as a
new segment (positions restart at 0, no bos); a document longer than seq_len simply spans several
sequences. Only the tail of the last sequence is padding, so waste is below seq_len tokens per
packing.

    stream:  [b a a a e][b c c c c c c e][b d e]
    rows:    |b a a a e b c c|c c c c e b d e|pad...|
    segment:  0 0 0 0 0 1 1 1  0 0 0 0 0 1 1 1
"""

from __future__ import annotations

import numpy as np

from paddle_ernie5.ops.masks import causal_document
from paddle_ernie5.tokenizers.text import BOS_ID, EOS_ID

IGNORE = -100  # label of positions without a next token in the same segment, and of padding


def pack_documents(
    docs: list[list[int]], seq_len: int, pad_id: int, bos_id: int = BOS_ID, eos_id: int = EOS_ID
) -> dict[str, np.ndarray]:
    """Pack documents (ids without bos/eos) into N rows of seq_len tokens.

    Returns input_ids, labels, positions, token_types [N, S] int64 and startend_row_indices
    [N, 1, S, 1] int32 (causal=True, one document segment per block)."""
    lens = np.array([len(d) + 2 for d in docs], dtype=np.int64)
    total = int(lens.sum())
    n_rows = max(1, -(-total // seq_len))
    size = n_rows * seq_len
    doc_starts = np.cumsum(lens) - lens

    stream = np.full(size, pad_id, dtype=np.int64)
    is_body = np.zeros(size, dtype=bool)
    is_body[:total] = True
    is_body[doc_starts] = False
    is_body[doc_starts + lens - 1] = False
    bodies = [np.asarray(d, dtype=np.int64).reshape(-1) for d in docs]
    stream[is_body] = np.concatenate([np.zeros(0, np.int64)] + bodies)
    stream[doc_starts] = bos_id
    stream[doc_starts + lens - 1] = eos_id

    # A segment starts at every document start and at every row start that falls inside the stream.
    seg_start = np.zeros(size, dtype=bool)
    seg_start[doc_starts] = True
    seg_start[0:total:seq_len] = True
    first = np.flatnonzero(seg_start[:total])
    seg_lens = np.diff(np.append(first, total))
    positions = np.zeros(size, dtype=np.int64)
    positions[:total] = np.arange(total) - np.repeat(first, seg_lens)

    # label[i] = stream[i + 1] when token i + 1 continues the segment of token i.
    labels = np.full(size, IGNORE, dtype=np.int64)
    cont = np.zeros(size, dtype=bool)
    cont[: max(total - 1, 0)] = ~seg_start[1:total]
    labels[:-1][cont[:-1]] = stream[1:][cont[:-1]]

    # Segments never cross rows, so each row's segment lengths feed the shared FlashMask builder
    # (which also masks the pad columns of the last row).
    bounds = np.searchsorted(first // seq_len, np.arange(n_rows + 1))
    sri = np.empty((n_rows, 1, seq_len, 1), dtype=np.int32)
    for r in range(n_rows):
        sri[r, 0] = causal_document(seg_lens[bounds[r] : bounds[r + 1]], seq_len)

    shape = (n_rows, seq_len)
    return {
        "input_ids": stream.reshape(shape),
        "labels": labels.reshape(shape),
        "positions": positions.reshape(shape),
        "startend_row_indices": sri,
        "token_types": np.zeros(shape, dtype=np.int64),  # 0 = text; padding is excluded by labels
    }
