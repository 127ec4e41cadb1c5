"""Elastic view: which layers, which experts and which top-k a forward pass uses.

The same parameters serve every view; a view is an argument, never state on the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ElasticView:
    layers: tuple[int, ...] | None = None  # indices of the blocks to run; None = all
    experts: tuple[int, ...] | None = None  # experts the routers may choose; None = all
    top_k: int | None = None  # None = the configured top_k

    def expert_mask(self, num_experts: int) -> np.ndarray | None:
        if self.experts is None:
            return None
        mask = np.zeros([num_experts], dtype=bool)
        mask[list(self.experts)] = True
        return mask


FULL_VIEW = ElasticView()
