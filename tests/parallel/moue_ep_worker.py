"""One rank of the 2-process check of a universal expert pool (MoUE) under expert parallelism, run
by tests/model/test_moue.py under `python -m paddle.distributed.launch --nproc_per_node 2`: the
pool is sharded ONCE over the ep group (every MoE layer runs the same half of it), and
forward/backward, five training steps (aux-free biases included) and checkpoints match one
process. Reuses launch_worker.py's comparisons. Writes <out>/moue_rank<r>.json.

Usage: moue_ep_worker.py <data cache dir> <out dir>
"""

import json
import os

import paddle.distributed as dist
from launch_worker import (
    OUT,
    RANK,
    config,
    diff,
    eval_logits,
    forward_backward,
    param_diff,
    quiet,
    train_both,
)

from paddle_ernie5.parallel import topology
from paddle_ernie5.parallel.runtime import Distributed
from paddle_ernie5.train.trainer import Trainer

UNIVERSAL = (
    "model.num_layers=3",
    "model.moe.universal.enabled=true",
    "model.moe.universal.window=6",
    "model.moe.universal.stride=2",
)


def main():
    cfg = config("moue_ep2", *UNIVERSAL, "parallel.ep=2", "parallel.dispatcher=allgather")
    groups = topology.init_groups(cfg.parallel, RANK)
    if RANK == 0:
        Trainer(config("moue_warm", *UNIVERSAL), log=quiet)  # builds the tokenizer cache once
    dist.barrier()
    runtime = Distributed(cfg, RANK, groups, cuda=False)
    par = Trainer(cfg, log=quiet, parallel=runtime)
    ref = Trainer(config(f"moue_ref{RANK}", *UNIVERSAL), log=quiet)
    banks = {id(moe.expert_bank()) for _, moe in par.model.moe_layers()}
    results = {
        "expert_names": runtime.expert_names,
        "pool_rows": par.model.universal.experts.w_gate_up.shape[0],
        "banks": len(banks),
        "start_params": param_diff(par, ref, runtime),
        "forward_backward": forward_backward(par, ref, runtime),
        "train": train_both(par, ref, runtime),
        "bias": max(
            diff(a.router.selection_bias.numpy(), b.router.selection_bias.numpy())
            for (_, a), (_, b) in zip(par.model.moe_layers(), ref.model.moe_layers())
        ),
    }
    par.save()  # the full pool, joined over ep, written by rank 0
    single = Trainer(cfg, log=quiet)
    assert single.try_resume()
    results["ckpt_to_single_logits"] = diff(eval_logits(single), eval_logits(par))
    with open(os.path.join(OUT, f"moue_rank{RANK}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
