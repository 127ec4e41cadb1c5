"""Numpy batches from the data pipeline -> the tensors a model's forward takes."""

from __future__ import annotations

import numpy as np
import paddle

_TEXT_KEYS = (
    "input_ids",
    "labels",
    "token_types",
    "positions",
    "startend_row_indices",
    "mask_causal",
)


def to_model_batch(np_batch: dict) -> dict:
    """Numpy batch from the data pipeline -> model inputs (positions broadcast to t = h = w). Keys
    beyond the text ones (modality inputs and targets, data/mixture.py) become tensors as they are:
    floating arrays float32, integer arrays int64."""
    pos = np_batch["positions"]
    if pos.ndim == 2:
        pos = np.broadcast_to(pos[:, None, :], (pos.shape[0], 3, pos.shape[1]))
    extras = {
        k: paddle.to_tensor(v, dtype="float32" if np.issubdtype(v.dtype, np.floating) else "int64")
        for k, v in np_batch.items()
        if k not in _TEXT_KEYS and isinstance(v, np.ndarray)
    }
    return {
        **extras,
        "input_ids": paddle.to_tensor(np_batch["input_ids"], dtype="int64"),
        "labels": paddle.to_tensor(np_batch["labels"], dtype="int64"),
        "token_types": paddle.to_tensor(np_batch["token_types"], dtype="int64"),
        "positions": paddle.to_tensor(np.ascontiguousarray(pos), dtype="int64"),
        "startend_row_indices": paddle.to_tensor(np_batch["startend_row_indices"], dtype="int32"),
        "mask_causal": bool(np_batch.get("mask_causal", True)),
    }
