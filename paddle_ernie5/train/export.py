"""`ernie5 export`: slice a trained run into a standalone elastic sub-model (model/slicing.py)."""

from __future__ import annotations

import dataclasses

from ..model.slicing import check_request, plan_export, slice_state
from ..model.view import ElasticView


def export_from_checkpoint(
    path: str, layers: int, experts: int, top_k: int, out_dir: str, num_batches: int = 8, log=print
) -> ElasticView:
    """Slice the model at `path` (run, checkpoint or exported dir) and write a standalone model to
    `out_dir` (config.yaml, model.safetensors, export.json). Returns the equivalent ElasticView."""
    import itertools
    import json
    import os

    from safetensors.numpy import save_file

    from .. import config as C
    from ..data.loader import eval_batches, text_data_for
    from ..io import checkpoint
    from ..model.inputs import to_model_batch
    from ..model.model import Ernie5Model

    cfg_path, source = checkpoint.find_run(path)
    cfg = C.load_config(cfg_path)
    check_request(cfg.model, layers, experts, top_k)
    model = Ernie5Model(cfg.model)
    checkpoint.set_weights(
        model,
        checkpoint.load_model_weights(source, warn=log),
        f"the weights in {source}",
        f"; {cfg_path} holds another model (was a run directory reused?)",
    )
    _, _, val_packed = text_data_for(cfg)
    batches = [
        to_model_batch(b)
        for b in itertools.islice(eval_batches(val_packed, cfg.train.batch_size), num_batches)
    ]
    kept, layer_experts, view = plan_export(model, cfg.model, batches, layers, experts, top_k)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    new_state, new_model_cfg = slice_state(state, cfg.model, kept, layer_experts, top_k)
    new_cfg = C.replace(
        cfg,
        name=f"{cfg.name}_L{layers}_E{experts}_k{top_k}",
        model=new_model_cfg,
        elastic=C.ElasticConfig(),
        train=dataclasses.replace(
            cfg.train, run_dir=os.path.join(out_dir, "run"), init_from=out_dir
        ),
    )
    os.makedirs(out_dir, exist_ok=True)
    save_file(new_state, os.path.join(out_dir, "model.safetensors"))
    C.save_config(new_cfg, os.path.join(out_dir, "config.yaml"))
    with open(os.path.join(out_dir, "export.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "source": os.path.abspath(source),
                "layers": list(kept),
                "top_k": top_k,
                "experts": {str(k): list(v) for k, v in layer_experts.items()},
            },
            f,
            indent=1,
        )
    from ..model.params import count_params

    before, after = count_params(cfg.model), count_params(new_model_cfg)
    log(
        f"exported {out_dir}: layers {list(kept)}, {experts} experts per MoE layer, top-{top_k}; "
        f"{after['total'] / before['total']:.1%} of total and "
        f"{after['activated'] / before['activated']:.1%} of activated parameters"
    )
    return view
