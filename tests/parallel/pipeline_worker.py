"""One rank of the 2-process pipeline checks, run by tests/parallel/test_pipeline_launch.py under
`python -m paddle.distributed.launch --nproc_per_node 2`: pp=2 (Fleet's 1F1B over two stages) vs one
process of the same recipe, seed and global batch, computed in the same process. Writes
<out>/rank<r>.json: {check name: largest absolute difference, or a list of them}.

Usage: pipeline_worker.py <data cache dir> <out dir>
"""

import json
import os
import sys

import numpy as np
import paddle
import paddle.distributed as dist

from paddle_ernie5.config import load_config
from paddle_ernie5.model.inputs import to_model_batch
from paddle_ernie5.parallel.runtime import init_runtime
from paddle_ernie5.parallel.topology import rank_from_env
from paddle_ernie5.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE, OUT = sys.argv[1], sys.argv[2]
STEPS = 5
# 4 blocks: the plan cuts [embed, block 0-2] | [block 3, head], so both stages hold MoE layers and
# the aux and z sums cross a stage boundary; 2 micro-batches of 2 rows per pass.
PIPELINE = ["parallel.pp=2", "parallel.micro_batches=2"]


def config(name, *overrides):
    return load_config(
        os.path.join(ROOT, "recipes", "debug.yaml"),
        [
            f"data.cache_dir={CACHE}",
            f"train.run_dir={OUT}/{name}",
            "train.visualdl=false",
            "model.attention.backend=reference",
            "model.num_layers=4",
            "model.moe.aux_loss_weight=0.01",
            "model.moe.z_loss_weight=0.001",
            "train.max_steps=20",
            "data.eval_batches=2",
            "train.warmup_steps=1",
            # As in launch_worker.py: at lr 1e-4 float32 rounding in near-zero gradients moves a
            # parameter by far less than 1e-5 in five steps while parameters move ~5e-4.
            "train.lr=0.0001",
            "train.min_lr=0.00001",
            "model.moe.bias_update_rate=0.01",
            *overrides,
        ],
    )


def quiet(*_):
    pass


def diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def state_diff(a, b) -> float:
    """Largest difference over every parameter and buffer of two whole models."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    return max(diff(v.numpy(), sb[k].numpy()) for k, v in sa.items())


def owned_diff(par: Trainer, ref: Trainer) -> float:
    """The same over the parameters and buffers this rank's stage holds."""
    ref_state = ref.model.state_dict()
    return max(
        diff(v.numpy(), ref_state[k].numpy())
        for k, v in par.model.state_dict().items()
        if k in par.par.owned
    )


@paddle.no_grad()
def eval_logits(trainer: Trainer) -> np.ndarray:
    trainer.par.refresh_model(trainer.model)
    trainer.model.eval()
    np_batch = {k: v[:4] for k, v in trainer.val_packed.items()}
    return trainer.model(to_model_batch(np_batch), with_mtp=False).logits.numpy()


def train_both(par: Trainer, ref: Trainer) -> dict:
    keys = ("loss", "loss/text", "loss/mtp", "loss/aux", "loss/z", "train/grad_norm")
    losses, values = [], []
    before = {n: p.numpy() for n, p in ref.model.named_parameters()}
    for _ in range(STEPS):
        m_par, m_ref = par.train_step(), ref.train_step()
        losses.append(diff([m_par[k] for k in keys], [m_ref[k] for k in keys]))
        values.append([m_ref[k] for k in keys])
    moved = max(diff(p.numpy(), before[n]) for n, p in ref.model.named_parameters())
    routers = [a.router.selection_bias for _, a in ref.model.moe_layers()]
    return {
        "losses": losses,
        "values": values,
        "owned_params": owned_diff(par, ref),
        "moved": moved,
        "bias_moved": max(float(b.abs().max()) for b in routers),
        "loads": sorted(par._last_loads) == sorted(ref._last_loads)
        and max(diff(par._last_loads[i], ref._last_loads[i]) for i in ref._last_loads) == 0,
    }


def main():
    cfg = config("pp2", *PIPELINE)
    rank = rank_from_env()
    runtime = init_runtime(cfg, 2, rank)
    if rank == 0:
        Trainer(config("warm"), log=quiet)  # builds the tokenizer cache once
    dist.barrier()
    results = {"stage": runtime.stage}

    par = Trainer(cfg, log=quiet, parallel=runtime)
    ref = Trainer(config(f"ref{rank}"), log=quiet)
    results["owned"] = len(runtime.owned)
    results["start_params"] = state_diff(par.model, ref.model)
    results["train"] = train_both(par, ref)
    par.par.refresh_model(par.model)
    results["all_params"] = state_diff(par.model, ref.model)  # every stage's, gathered
    results["val_loss"] = diff(par.evaluate(), ref.evaluate())

    # Checkpoints: pp=2 -> one process, and one process -> pp=2 (then one more step on both).
    par.save()
    single = Trainer(cfg, log=quiet)
    assert single.try_resume()
    results["pp_ckpt_to_single_logits"] = diff(eval_logits(single), eval_logits(par))
    results["pp_ckpt_to_single_params"] = state_diff(single.model, ref.model)
    ref.save()
    dist.barrier()
    back_cfg = config(f"ref{rank}", *PIPELINE)
    from paddle_ernie5.parallel.pipeline_runtime import Pipelined
    from paddle_ernie5.parallel.runtime import Distributed

    back_runtime = Pipelined(
        back_cfg, rank, runtime.groups, Distributed(back_cfg, rank, runtime.groups, cuda=False)
    )
    back = Trainer(back_cfg, log=quiet, parallel=back_runtime)
    assert back.try_resume()
    results["single_ckpt_to_pp_logits"] = diff(eval_logits(back), eval_logits(ref))
    results["single_ckpt_to_pp_step"] = back.step
    m_back, m_ref = back.train_step(), ref.train_step()  # moments and bias came through too
    results["after_resume_loss"] = diff(m_back["loss"], m_ref["loss"])
    results["after_resume_params"] = owned_diff(back, ref)

    with open(os.path.join(OUT, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
