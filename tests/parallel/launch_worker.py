"""One rank of the 2-process parity checks, run by tests/parallel/test_launch.py under
`python -m paddle.distributed.launch --nproc_per_node 2`. Every check compares the parallel run
with a single-process run of the same recipe, seed and global batch computed in the same process.
Writes <out>/rank<r>.json: {check name: largest absolute difference, or a list of them}.

Usage: launch_worker.py <data cache dir> <out dir>
"""

import json
import os
import sys

import numpy as np
import paddle
import paddle.distributed as dist

from paddle_ernie5.config import load_config
from paddle_ernie5.model.inputs import to_model_batch
from paddle_ernie5.model.losses import compute_loss
from paddle_ernie5.optim.optimizer import optimizer_state
from paddle_ernie5.parallel import comm, expert, topology
from paddle_ernie5.parallel.runtime import Distributed
from paddle_ernie5.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE, OUT = sys.argv[1], sys.argv[2]
RANK = dist.get_rank()
STEPS = 5


def config(name, *overrides):
    return load_config(
        os.path.join(ROOT, "recipes", "debug.yaml"),
        [
            f"data.cache_dir={CACHE}",
            f"train.run_dir={OUT}/{name}",
            "train.visualdl=false",
            "model.attention.backend=reference",
            "train.max_steps=20",
            "train.warmup_steps=1",
            # lr: Adam divides each gradient element by its own magnitude, so float32 rounding in
            # near-zero gradients (~3e-8 absolute, checked by the tests) moves a parameter by up to
            # a few % of lr per step; at lr=1e-4 five steps stay well inside 1e-5 while parameters
            # move ~5e-4.
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


def param_diff(par: Trainer, ref: Trainer, runtime) -> float:
    """Largest difference between the parallel model's parameters/buffers and the reference's
    rows."""
    ref_state = {k: v.numpy() for k, v in ref.model.state_dict().items()}
    if getattr(runtime, "ep", 1) > 1:
        ref_state = expert.slice_expert_rows(
            ref_state,
            runtime.expert_names,
            runtime.ep_rank,
            runtime.ep,
            ref.cfg.model.moe.num_experts,
        )
    return max(diff(v.numpy(), ref_state[k]) for k, v in par.model.state_dict().items())


def forward_backward(par: Trainer, ref: Trainer, runtime) -> dict:
    """Logits, loss and every gradient of one global batch: parallel slice vs single process."""
    np_batch = ref.loader.next_batch()
    rows = len(np_batch["input_ids"]) // len(runtime.data_ranks)
    mine = slice(runtime.data_index * rows, (runtime.data_index + 1) * rows)
    out_ref = ref.model(to_model_batch(np_batch))
    parts_ref = compute_loss(out_ref, to_model_batch(np_batch)["labels"], ref.cfg.model)
    parts_ref.total.backward()
    batch = to_model_batch(runtime.shard_batch(np_batch))
    out = par.model(batch)
    loss, values = runtime.objective(
        compute_loss(out, batch["labels"], par.cfg.model), batch["labels"], par.cfg.model
    )
    loss.backward()
    runtime.reduce_gradients(par.model)
    ref_grads = {n: p.grad.numpy() for n, p in ref.model.named_parameters()}
    if runtime.ep > 1:
        ref_grads = expert.slice_expert_rows(
            ref_grads,
            runtime.expert_names,
            runtime.ep_rank,
            runtime.ep,
            ref.cfg.model.moe.num_experts,
        )
    result = {
        "logits": diff(out.logits.numpy(), out_ref.logits.numpy()[mine]),
        "loss": diff(values["loss"], float(parts_ref.total)),
        "grads": max(diff(p.grad.numpy(), ref_grads[n]) for n, p in par.model.named_parameters()),
    }
    for p in [*ref.model.parameters(), *par.model.parameters()]:
        p.clear_gradient(False)
    for t in (ref, par):
        t.loader.load_state_dict({"epoch": 0, "index": 0})
    return result


def train_both(par: Trainer, ref: Trainer, runtime) -> dict:
    losses = []
    before = {n: p.numpy() for n, p in ref.model.named_parameters()}
    for _ in range(STEPS):
        m_par, m_ref = par.train_step(), ref.train_step()
        losses.append(
            diff(
                [m_par[k] for k in ("loss", "train/grad_norm")],
                [m_ref[k] for k in ("loss", "train/grad_norm")],
            )
        )
    moved = max(diff(p.numpy(), before[n]) for n, p in ref.model.named_parameters())
    return {"losses": losses, "params": param_diff(par, ref, runtime), "moved": moved}


@paddle.no_grad()
def eval_logits(trainer: Trainer) -> np.ndarray:
    trainer.model.eval()
    np_batch = {k: v[:4] for k, v in trainer.val_packed.items()}
    return trainer.model(to_model_batch(np_batch), with_mtp=False).logits.numpy()


COLLECTIVES = ("all_gather", "all_reduce", "broadcast", "all_gather_object", "alltoall", "barrier")


def whole_run_collectives(groups) -> list:
    """Every collective this rank issues over a whole expert-parallel `fit` (training steps,
    evaluations with their generated samples, checkpoints, the final step), in order, as
    (name, shape, dtype). Ranks that disagree here deadlock or crash gloo at the first mismatch."""
    calls = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def recording(name):
        def call(*args, **kwargs):
            t = args[1] if name in ("all_gather", "alltoall") else (args[0] if args else None)
            if isinstance(t, list):
                t = t[0] if t else None
            shape = list(t.shape) if hasattr(t, "shape") else None
            calls.append([name, shape, str(getattr(t, "dtype", ""))])
            return originals[name](*args, **kwargs)

        return call

    cfg = config(
        "ep_whole_run",
        "parallel.ep=2",
        "parallel.dispatcher=allgather",
        "train.max_steps=4",
        "train.eval_every=2",
        "train.save_every=3",
    )
    for name in COLLECTIVES:
        setattr(dist, name, recording(name))
    try:
        runtime = Distributed(cfg, RANK, groups, cuda=False)
        result = Trainer(cfg, log=quiet, parallel=runtime).fit()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return {"calls": calls, "step": result.step}


def main_sharding():
    """Optimizer-state sharding through Paddle's sharding optimizer (Fleet initialised with
    sharding=2): forward/backward, parameters after 5 steps, and checkpoints both ways."""
    cfg = config("sharding", "parallel.sharding=2")
    groups = topology.init_groups(cfg.parallel, RANK)
    if RANK == 0:
        Trainer(config("warm"), log=quiet)
    dist.barrier()
    runtime = Distributed(cfg, RANK, groups, cuda=False)
    par = Trainer(cfg, log=quiet, parallel=runtime)
    ref = Trainer(config(f"sharding_ref{RANK}"), log=quiet)
    results = {
        "sharding_optimizer": type(par.optimizer).__name__,
        "sharding_owned": sorted(n for n, r in runtime.owner.items() if r == RANK),
        "sharding_forward_backward": forward_backward(par, ref, runtime),
        "sharding_train": train_both(par, ref, runtime),
    }
    par.save()  # every owner's moments, joined
    dist.barrier()
    single = Trainer(cfg, log=quiet)
    assert single.try_resume()
    results["sharding_ckpt_to_single_logits"] = diff(eval_logits(single), eval_logits(par))
    results["sharding_ckpt_moments"] = len(
        {k.partition("::")[0] for k in optimizer_state(single.model, single.optimizer)}
    )
    back = Trainer(cfg, log=quiet, parallel=Distributed(cfg, RANK, groups, cuda=False))
    assert back.try_resume()
    results["sharding_ckpt_back_logits"] = diff(eval_logits(back), eval_logits(par))
    with open(os.path.join(OUT, f"sharding_rank{RANK}.json"), "w") as f:
        json.dump(results, f, indent=1)


def main():
    cfg_ep = config("ep2", "parallel.ep=2", "parallel.dispatcher=allgather")
    groups = topology.init_groups(cfg_ep.parallel, RANK)
    if RANK == 0:
        Trainer(config("warm"), log=quiet)  # builds the tokenizer cache once
    dist.barrier()
    results = {}

    # Expert parallel: forward/backward, 5 steps, checkpoints both ways, the all-to-all dispatcher.
    runtime = Distributed(cfg_ep, RANK, groups, cuda=False)
    par = Trainer(cfg_ep, log=quiet, parallel=runtime)
    ref = Trainer(config(f"ep_ref{RANK}"), log=quiet)
    results["ep_start_params"] = param_diff(par, ref, runtime)
    results["ep_forward_backward"] = forward_backward(par, ref, runtime)
    allgather = par.model.moe_layers()[0][1].dispatcher
    a2a = expert.AllToAllDispatcher(
        runtime.group("ep"), runtime.ep_rank, 2, exchange=comm.all_gather_all_to_all
    )
    for _, moe in par.model.moe_layers():
        moe.dispatcher = a2a
    results["ep_alltoall_forward_backward"] = forward_backward(par, ref, runtime)
    for _, moe in par.model.moe_layers():
        moe.dispatcher = allgather
    results["ep_train"] = train_both(par, ref, runtime)
    results["ep_bias"] = max(
        diff(a.router.selection_bias.numpy(), b.router.selection_bias.numpy())
        for (_, a), (_, b) in zip(par.model.moe_layers(), ref.model.moe_layers())
    )
    par.save()  # full experts, written by rank 0
    single = Trainer(cfg_ep, log=quiet)  # one process reading the EP=2 checkpoint
    assert single.try_resume()
    results["ep_ckpt_to_single_logits"] = diff(eval_logits(single), eval_logits(par))
    ref.save()
    dist.barrier()
    back = Trainer(
        config(f"ep_ref{RANK}", "parallel.ep=2", "parallel.dispatcher=allgather"),
        log=quiet,
        parallel=Distributed(cfg_ep, RANK, groups, cuda=False),
    )
    assert back.try_resume()
    results["single_ckpt_to_ep_logits"] = diff(eval_logits(back), eval_logits(ref))
    results["single_ckpt_to_ep_step"] = back.step

    # Data parallel: parameters after 5 steps.
    for name, overrides in (("dp", ["parallel.dp=2"]),):
        cfg = config(name, *overrides)
        runtime = Distributed(
            cfg, RANK, topology.init_groups(cfg.parallel, RANK, fleet_init=False), cuda=False
        )
        par = Trainer(cfg, log=quiet, parallel=runtime)
        ref = Trainer(config(f"{name}_ref{RANK}"), log=quiet)
        results[f"{name}_forward_backward"] = forward_backward(par, ref, runtime)
        results[f"{name}_train"] = train_both(par, ref, runtime)
        results[f"{name}_fleet_wrapper"] = type(runtime.dp_model).__name__

    results["ep_whole_run_collectives"] = whole_run_collectives(groups)

    with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main_sharding() if sys.argv[3:] == ["sharding"] else main()
