"""One rank of the 4-process pipeline checks, run by tests/parallel/test_pipeline_launch.py under
`python -m paddle.distributed.launch --nproc_per_node 4`: dp=2 x pp=2, then ep=2 x pp=2 (the same
Fleet topology: its data axis is dp x ep), each against one process of the same recipe, seed and
global batch. Writes <out>/rank<r>.json.

Usage: pipeline4_worker.py <data cache dir> <out dir>
"""

import json
import os

import paddle.distributed as dist
from pipeline_worker import OUT, PIPELINE, STEPS, config, diff, eval_logits, quiet

from paddle_ernie5.parallel import expert, topology
from paddle_ernie5.parallel.pipeline_runtime import Pipelined
from paddle_ernie5.parallel.runtime import Distributed, init_runtime
from paddle_ernie5.train.trainer import Trainer

EP = [*PIPELINE, "parallel.ep=2", "parallel.dispatcher=allgather"]


def reference_rows(state: dict, runtime) -> dict:
    """A one-process state as this rank holds it: its rows of the experts under expert parallel."""
    if runtime.ep == 1:
        return state
    return expert.slice_expert_rows(
        state, runtime.expert_names, runtime.ep_rank, runtime.ep, runtime.cfg.model.moe.num_experts
    )


def parity(par: Trainer, ref: Trainer) -> dict:
    losses = []
    for _ in range(STEPS):
        m_par, m_ref = par.train_step(), ref.train_step()
        keys = ("loss", "loss/aux", "loss/z", "train/grad_norm")
        losses.append(diff([m_par[k] for k in keys], [m_ref[k] for k in keys]))
    par.par.refresh_model(par.model)
    want = reference_rows({k: v.numpy() for k, v in ref.model.state_dict().items()}, par.par)
    params = max(diff(v.numpy(), want[k]) for k, v in par.model.state_dict().items())
    return {"losses": losses, "params": params, "val_loss": diff(par.evaluate(), ref.evaluate())}


def main():
    rank = topology.rank_from_env()
    cfg = config("dp2pp2", *PIPELINE, "parallel.dp=2")
    runtime = init_runtime(cfg, 4, rank)
    if rank == 0:
        Trainer(config("warm"), log=quiet)  # builds the tokenizer cache once
    dist.barrier()
    results = {"dp2pp2": {"stage": runtime.stage, "data_ranks": runtime.data_ranks}}
    par = Trainer(cfg, log=quiet, parallel=runtime)
    results["dp2pp2"].update(parity(par, Trainer(config(f"dp_ref{rank}"), log=quiet)))

    cfg = config("ep2pp2", *EP)
    groups = topology.init_groups(cfg.parallel, rank, fleet_init=False)
    runtime = Pipelined(cfg, rank, groups, Distributed(cfg, rank, groups, cuda=False))
    par = Trainer(cfg, log=quiet, parallel=runtime)
    ref = Trainer(config(f"ep_ref{rank}"), log=quiet)
    results["ep2pp2"] = {"stage": runtime.stage, "ep_ranks": groups["ep"][1], **parity(par, ref)}
    par.save()  # every stage's experts, joined over ep and then over the pipeline
    single = Trainer(cfg, log=quiet)
    assert single.try_resume()
    results["ep2pp2"]["ckpt_to_single_logits"] = diff(eval_logits(single), eval_logits(ref))

    with open(os.path.join(OUT, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
