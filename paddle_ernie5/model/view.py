"""Elastic view: which layers, which experts and which top-k a forward pass uses.

The same parameters serve every view; a view is an argument, never state on the model. Experts can
be restricted for all layers (`experts`) or per layer (`layer_experts`, e.g. an exported sub-model
whose experts were chosen layer by layer)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ElasticView:
    layers: tuple[int, ...] | None = None  # indices of the blocks to run; None = all
    experts: tuple[int, ...] | None = None  # experts every router may choose; None = all
    top_k: int | None = None  # None = the configured top_k
    # (layer, experts) overrides of `experts`
    layer_experts: tuple[tuple[int, tuple[int, ...]], ...] | None = None

    def experts_of(self, layer: int) -> tuple[int, ...] | None:
        for index, experts in self.layer_experts or ():
            if index == layer:
                return experts
        return self.experts

    def expert_mask(self, num_experts: int, layer: int | None = None) -> np.ndarray | None:
        experts = self.experts if layer is None else self.experts_of(layer)
        if experts is None:
            return None
        mask = np.zeros([num_experts], dtype=bool)
        mask[list(experts)] = True
        return mask

    def for_layer(self, layer: int) -> ElasticView:
        """The view one block sees: its own expert subset and the top-k."""
        return ElasticView(experts=self.experts_of(layer), top_k=self.top_k)


FULL_VIEW = ElasticView()


def evenly_spaced_layers(num_layers: int, keep: int) -> tuple[int, ...]:
    """`keep` layer indices spread evenly over the depth, first and last included."""
    if not 1 <= keep <= num_layers:
        raise ValueError(f"cannot keep {keep} of {num_layers} layers")
    if keep == 1:
        return (num_layers - 1,)
    return tuple(int(round(i * (num_layers - 1) / (keep - 1))) for i in range(keep))
