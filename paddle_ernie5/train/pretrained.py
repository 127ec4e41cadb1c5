"""A fresh run's start from separately trained components: the audio input tables from the
codec's codebooks (model.audio.init_from_codebooks) and the patch mergers from a vision_merger run
(model.vision.merger_init). The model only defines the layers; loading them is done here, by the
code that builds a model for training. Not applied on resume or init_from (the checkpoint holds
them)."""

from __future__ import annotations

import os

import numpy as np

from ..errors import UserError
from ..model.audio import AudioEmbedding
from ..model.vision import VisualEmbedding
from ..tokenizers.audio import load_codec

# Written by train/vision_merger.py: every tensor of each pre-trained kind's visual embedding,
# keyed "<kind>.<parameter name>" (kind: image, video).
MERGER_WEIGHTS = "merger.safetensors"
OLD_MERGER_WEIGHTS = "merger.pdparams"  # a pickle, written by earlier versions; never read


def merger_key(kind: str, name: str) -> str:
    return f"{kind}.{name}"


def read_merger(path: str) -> dict[str, dict[str, np.ndarray]]:
    """{kind: {parameter name: array}} of the vision_merger run at `path`; a clear error when it
    has none, has only the old pickle, or the file is not safetensors."""
    from safetensors.numpy import load_file

    file = os.path.join(path, MERGER_WEIGHTS)
    redo = (
        "re-run the merger pre-training (`ernie5 train recipes/vision_merger.yaml "
        "train.run_dir=<new dir>`) and point model.vision.merger_init at it"
    )
    if not os.path.isfile(file):
        old = os.path.join(path, OLD_MERGER_WEIGHTS)
        if os.path.exists(old):
            raise UserError(
                f"model.vision.merger_init={path!r}: {old} is a pickle written by an older "
                f"version and is not read (loading a pickle can run any code); {redo}"
            )
        raise UserError(
            f"model.vision.merger_init={path!r}: no {MERGER_WEIGHTS} there; pre-train the "
            "merger with `ernie5 train recipes/vision_merger.yaml` or set "
            "model.vision.merger_init=''"
        )
    try:
        flat = load_file(file)
    except Exception as e:  # any parse failure means the same thing here
        raise UserError(
            f"model.vision.merger_init={path!r}: {file} is not a safetensors file ({e}); {redo}"
        ) from None
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in flat.items():
        kind, _, name = key.partition(".")
        out.setdefault(kind, {})[name] = value
    return out


def load_merger(embedding, kind: str, path: str) -> bool:
    """Copy the pre-trained weights of `kind`'s visual embedding (merger, place tables) from the
    vision_merger run at `path` into `embedding`; False when that run trained no `kind` attribute.
    A missing run or another shape is a clear error."""
    saved = read_merger(path).get(kind)
    if saved is None:
        return False
    own = embedding.state_dict()
    wanted = [k for k in own if k.startswith(("merger.", "place."))]
    bad = [k for k in wanted if k not in saved or list(saved[k].shape) != list(own[k].shape)]
    if bad:
        raise UserError(
            f"model.vision.merger_init={path!r}: the saved {kind} merger does not fit this "
            f"model ({bad[0]}); pre-train it with this recipe's model settings"
        )
    for k in wanted:
        own[k].set_value(saved[k])
    return True


def init_layer_fresh(layer) -> str | None:
    """Start one layer from its pre-trained component, if its config asks for one; returns a note
    for the log (None when nothing applies)."""
    if isinstance(layer, AudioEmbedding) and layer.acfg.init_from_codebooks:
        layer.init_from_codebooks(load_codec(layer.acfg).codebooks()[: layer.levels])
        return "audio input tables initialised from the codec's codebooks"
    if isinstance(layer, VisualEmbedding) and layer.merger_init:
        kind, path = layer.modality, layer.merger_init
        if load_merger(layer, kind, path):
            return f"{kind} patch merger initialised from {path}"
        if layer.frozen:  # a fixed random merger would never learn
            raise UserError(
                f"model.vision.freeze_merger lists {kind}, but {path} pre-trained no "
                f"{kind} merger: add attributes to vision_merger.{kind}_attributes there, "
                f"or drop {kind} from freeze_merger"
            )
        return f"{kind} patch merger: not pre-trained in {path}; starts random"
    return None


def init_fresh(model) -> list[str]:
    """`init_layer_fresh` over every sublayer of `model`; the notes, in order."""
    return [note for layer in model.sublayers() if (note := init_layer_fresh(layer))]
