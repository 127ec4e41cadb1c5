"""`ernie5 convert-moue`: a standard MoE checkpoint as a Mixture of Universal Experts model.

Choice (the paper's conversion recipe is not disclosed): the pool is the UNION of the layers'
experts, so total and activated parameters stay those of the source (top_k unchanged). MoE layer j
keeps its own E experts at pool rows [j E, (j+1) E) and its window of W experts (default 2 E) is
centred on them, reaching (W - E) / 2 experts of each neighbouring layer (wrapping around):

    pool      [ layer 0's E ][ layer 1's E ][ layer 2's E ]
    layer 1          [  ·  |     own      |  ·  ]           · = borrowed slots, closed at first

Own slots copy the source router's columns and selection biases. A borrowed slot starts from its
expert's router column and bias in the expert's home layer, and closed: a window_offset of
-closed_offset on its logit and selection score, so it is never chosen and carries e^-30 of the
softmax mass. The trajectory projection starts at zero. Hence at conversion step 0 the converted
model routes exactly like the source and gives the same logits (to float32 rounding). Continued
training then opens the borrowed slots progressively (universal.open_decay per optimizer step).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from ..config import ModelConfig
from ..config.model import UniversalConfig
from ..errors import UserError

_LAYER_KEY = re.compile(
    r"^blocks\.(\d+)\.ffn\.(router\.weight|router\.selection_bias|experts\.\w+)$"
)


class ConversionError(UserError, ValueError):
    """A conversion request this checkpoint cannot satisfy."""


def convert_config(
    cfg: ModelConfig, window: int = 0, trajectory_dim: int = 16, open_decay: float = 0.9
) -> ModelConfig:
    """The universal model a standard MoE model `cfg` converts to (window 0 = 2 E)."""
    moe = cfg.moe
    if moe.universal.enabled:
        raise ConversionError("the checkpoint already holds a universal expert pool")
    n = cfg.num_layers - moe.first_dense_layers
    e, pool = moe.num_experts, n * moe.num_experts
    w = window or min(pool, 2 * e)
    if n < 1:
        raise ConversionError("the model has no MoE layer to convert")
    if not e <= w <= pool:
        raise ConversionError(
            f"--window {w}: allowed {e} (each layer's own experts) .. {pool} (the whole pool)"
        )
    starts = tuple((j * e - (w - e) // 2) % pool for j in range(n))
    universal = UniversalConfig(
        enabled=True,
        window=w,
        starts=starts,
        trajectory_dim=trajectory_dim,
        open_decay=open_decay,
    )
    new = dataclasses.replace(
        cfg, moe=dataclasses.replace(moe, num_experts=pool, universal=universal)
    )
    new.validate("model")
    return new


def convert_state(
    state: dict[str, np.ndarray],
    cfg: ModelConfig,
    new_cfg: ModelConfig,
    closed_offset: float = 30.0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The converted model's state dict (see the module docstring)."""
    e = cfg.moe.num_experts
    layers = list(range(cfg.moe.first_dense_layers, cfg.num_layers))
    uni = new_cfg.moe.universal
    pool, w, d = (
        new_cfg.moe.num_experts,
        uni.window_size(new_cfg.moe.num_experts),
        uni.trajectory_dim,
    )
    out = {k: v for k, v in state.items() if not _LAYER_KEY.match(k)}
    for name in ("w_gate_up", "w_down"):
        out[f"universal.experts.{name}"] = np.concatenate(
            [state[f"blocks.{i}.ffn.experts.{name}"] for i in layers], axis=0
        )
    for j, (i, start) in enumerate(zip(layers, uni.window_starts(len(layers), pool))):
        ids = (start + np.arange(w)) % pool
        home, col = ids // e, ids % e
        router = f"blocks.{i}.ffn.router"
        out[f"{router}.weight"] = np.stack(
            [state[f"blocks.{layers[h]}.ffn.router.weight"][:, c] for h, c in zip(home, col)], 1
        )
        out[f"{router}.selection_bias"] = np.array(
            [state[f"blocks.{layers[h]}.ffn.router.selection_bias"][c] for h, c in zip(home, col)],
            dtype=np.float32,
        )
        out[f"{router}.window_offset"] = np.where(home == j, 0.0, -closed_offset).astype(np.float32)
        if d > 0:
            out[f"{router}.state_proj"] = np.zeros([d, w], dtype=np.float32)
    if d > 0:
        rng = np.random.default_rng(seed)
        out["universal.expert_embed"] = rng.normal(0, d**-0.5, [pool, d]).astype(np.float32)
        out["universal.state_mix"] = rng.normal(0, d**-0.5, [d, d]).astype(np.float32)
    return out


def convert_checkpoint(
    path: str,
    out_dir: str,
    window: int = 0,
    trajectory_dim: int = 16,
    closed_offset: float = 30.0,
    open_decay: float = 0.9,
    seed: int = 0,
    log=print,
) -> str:
    """Convert the model at `path` (run, checkpoint or exported dir) and write `out_dir`
    (config.yaml whose train.init_from is out_dir, model.safetensors, convert.json). Returns
    out_dir."""
    import json
    import os

    from safetensors.numpy import save_file

    from .. import config as C
    from ..io import checkpoint
    from ..model.params import count_params

    cfg_path, source = checkpoint.find_run(path)
    cfg = C.load_config(cfg_path)
    new_model_cfg = convert_config(cfg.model, window, trajectory_dim, open_decay)
    state = checkpoint.load_model_weights(source, warn=log)
    new_state = convert_state(state, cfg.model, new_model_cfg, closed_offset, seed)
    new_cfg = C.replace(
        cfg,
        name=f"{cfg.name}_moue",
        model=new_model_cfg,
        train=dataclasses.replace(
            cfg.train, run_dir=os.path.join(out_dir, "run"), init_from=out_dir
        ),
    )
    os.makedirs(out_dir, exist_ok=True)
    save_file(new_state, os.path.join(out_dir, "model.safetensors"))
    C.save_config(new_cfg, os.path.join(out_dir, "config.yaml"))
    uni = new_model_cfg.moe.universal
    with open(os.path.join(out_dir, "convert.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "source": os.path.abspath(source),
                "pool": new_model_cfg.moe.num_experts,
                "window": uni.window_size(new_model_cfg.moe.num_experts),
                "starts": list(uni.starts),
                "closed_offset": closed_offset,
                "open_decay": open_decay,
            },
            f,
            indent=1,
        )
    before, after = count_params(cfg.model), count_params(new_model_cfg)
    log(
        f"converted {source} -> {out_dir}: pool of {new_model_cfg.moe.num_experts} experts, "
        f"window {uni.window_size(new_model_cfg.moe.num_experts)}, starts {list(uni.starts)}; "
        f"{after['total']:,} parameters ({after['total'] / before['total']:.3f}x), "
        f"{after['activated']:,} activated ({after['activated'] / before['activated']:.3f}x)"
    )
    return out_dir
