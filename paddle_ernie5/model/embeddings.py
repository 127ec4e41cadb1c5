"""Per-modality input embeddings behind one registry.

Each modality registers a factory building a layer that maps the batch to [B, S, M] for the
positions whose `token_types` equal its id, or returns None when the batch carries none of its
inputs (a text-only batch through a multimodal model). Adding a modality means registering one
class; the blocks never change. Text is built in; image, video and audio register themselves from
their own modules.
"""

from __future__ import annotations

from collections.abc import Callable

import paddle
from paddle import nn

from ..config import MODALITIES, ModelConfig
from ..plugins import import_optional

MODALITY_IDS = {name: i for i, name in enumerate(MODALITIES)}
_REGISTRY: dict[str, Callable[[ModelConfig], nn.Layer]] = {}
# Modules registering the embeddings and heads of the non-text modalities when imported.
MODALITY_MODULES = ("paddle_ernie5.model.vision", "paddle_ernie5.model.audio")


def load_modality_modules() -> None:
    import_optional(MODALITY_MODULES)


def register_modality(name: str):
    """Class decorator: `@register_modality("image") class ImageEmbedding(nn.Layer)`."""
    if name not in MODALITY_IDS:
        raise ValueError(f"unknown modality {name!r}; known: {list(MODALITY_IDS)}")

    def wrap(factory):
        _REGISTRY[name] = factory
        return factory

    return wrap


@register_modality("text")
class TextEmbedding(nn.Layer):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.table = nn.Embedding(
            cfg.text_vocab, cfg.hidden_size, weight_attr=nn.initializer.Normal(std=cfg.init_std)
        )

    def forward(self, batch):
        return self.table(batch["input_ids"])


class ModalityEmbeddings(nn.Layer):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.multimodal:
            load_modality_modules()
        missing = [m for m in cfg.modalities if m not in _REGISTRY]
        if missing:
            raise ValueError(
                f"model.modalities lists {missing}, which have no embedding registered "
                f"in this build; available: {sorted(_REGISTRY)}"
            )
        self.by_modality = nn.LayerDict({m: _REGISTRY[m](cfg) for m in cfg.modalities})

    def forward(self, batch):
        if len(self.by_modality) == 1:
            return next(iter(self.by_modality.values()))(batch)
        types_BS1 = batch["token_types"].unsqueeze(-1)
        x = None
        for name, layer in self.by_modality.items():
            part = layer(batch)
            if part is None:
                continue
            x = part if x is None else paddle.where(types_BS1 == MODALITY_IDS[name], part, x)
        return x

    def text_table(self):
        return self.by_modality["text"].table
