"""Step time of the tiny recipe: one process vs DP=2, EP=2, PP=2 and EP=2 x PP=2 (gloo, here).

Also the bytes each expert dispatcher sends per step, and for the pipeline the bytes sent between
its stages and its measured bubble. (The first line is the --help description.)

    python tools/bench_parallel.py [--steps 8] [key=value overrides for recipes/pretrain_tiny.yaml]

Each setup runs in its own process group (1 process with every core; 2 processes with half the
cores each), warms up 2 steps and reports the median of --steps timed training steps. Dispatcher
bytes are computed from the routing of a real EP=2 step: the all-gather dispatcher's as it ran, the
all-to-all dispatcher's for the same routing (gloo has no all-to-all, so it is sized, not timed).
Pipeline: the bytes one stage sends the next per step are those of the real activations (forward)
and their gradients (backward) times the micro-batches (p2p shape messages left out); a stage's
measured bubble is the share of each pipeline pass's wall time in which it does not compute (its
layers' forward, the loss on the last stage, backward; timed with Fleet's micro-step hooks), beside
the 1F1B formula (p - 1) / (m + p - 1) for p equal stages and m micro-batches.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "pretrain_tiny.yaml")


def worker(out: str, steps: int, overrides: list[str]) -> None:
    import numpy as np

    from paddle_ernie5.config import load_config
    from paddle_ernie5.parallel import expert
    from paddle_ernie5.parallel.runtime import init_runtime
    from paddle_ernie5.parallel.topology import rank_from_env, world_size_from_env
    from paddle_ernie5.train.trainer import Trainer

    cfg = load_config(
        RECIPE,
        [f"train.run_dir={out}/run", "train.visualdl=false", "train.progress=false", *overrides],
    )
    par = init_runtime(cfg, world_size_from_env(), rank_from_env())
    trainer = Trainer(cfg, log=lambda *_: None, parallel=par)
    for _ in range(2):
        trainer.train_step()
    probe = _PipelineProbe(par) if par.pipelined else None
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    result = {
        "step_s": float(np.median(times)),
        "tokens": cfg.train.batch_size * cfg.data.seq_len,
        "params": trainer.model.num_params(),
    }
    if probe is not None:
        result.update(probe.result(trainer))
    if cfg.parallel.ep > 1:  # one more step, recording each MoE layer's dispatch
        metas = []
        for _, moe in trainer.model.moe_layers():
            moe.dispatcher = _Recording(moe.dispatcher, metas)
        trainer.train_step()
        allgather = sum(expert.AllGatherDispatcher.bytes_sent(meta) for meta, _ in metas)
        alltoall, routed = 0, 0
        for meta, ids_all in metas:
            r, e = meta.ranks, cfg.model.moe.num_experts
            per_rank = ids_all.reshape(r, -1)
            capacity = max(int(np.bincount(row, minlength=e).max()) for row in per_rank)
            alltoall += expert.AllToAllDispatcher.bytes_sent(
                expert.AllToAllMeta(
                    None,
                    None,
                    meta.num_tokens // r,
                    capacity,
                    ranks=r,
                    hidden=meta.hidden,
                    num_experts=e,
                )
            )
            # Rows that really leave their rank (mean over ranks), four exchanges of M floats each.
            away = np.mean([np.sum(row // (e // r) != src) for src, row in enumerate(per_rank)])
            routed += 4 * away * meta.hidden * 4
        result.update(
            {
                "allgather_bytes": allgather,
                "alltoall_bytes": alltoall,
                "routed_bytes": routed,
                "moe_layers": len(metas),
            }
        )
    if par.is_main:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)


class _Recording:
    """Dispatcher wrapper for the benchmark only: keeps (meta, all routed expert ids) per call."""

    def __init__(self, inner, sink):
        self.inner, self.sink = inner, sink

    def dispatch(self, x_TM, routing, num_experts):
        from paddle_ernie5.parallel import comm

        inputs, counts, meta = self.inner.dispatch(x_TM, routing, num_experts)
        ids_all = comm.gather_rows_nograd(routing.topk_ids_TK, self.inner.group).numpy().reshape(-1)
        self.sink.append((meta, ids_all))
        return inputs, counts, meta

    def combine(self, expert_outputs, meta):
        return self.inner.combine(expert_outputs, meta)


class _PipelineProbe:
    """Benchmark only: the wall time of each pipeline pass (the runtime's forward_backward) and the
    time this stage computes in it, from Fleet's micro-step hooks: forward begin -> end, backward
    begin -> end, and on the last stage forward end -> backward begin (the loss; nothing else runs
    between them there)."""

    def __init__(self, runtime):
        from paddle.distributed.fleet.meta_parallel.pipeline_parallel import (
            PipelineParallelMicroStepLocations as At,
        )

        self.runtime, self.wall, self.busy = runtime, 0.0, 0.0
        self.opened: float | None = None
        run = runtime.forward_backward

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = run(*args, **kwargs)
            self.wall += time.perf_counter() - t0
            return out

        runtime.forward_backward = timed
        last = runtime.is_last
        marks = {
            At.FORWARD_BEGIN: True,
            At.FORWARD_END: last,  # the last stage goes on computing: its loss
            At.BACKWARD_BEGIN: True,
            At.BACKWARD_END: False,
        }
        for at, opens in marks.items():
            runtime.engine.register_hook(at, self._mark(opens))

    def _mark(self, opens: bool):
        def hook(**_):
            now = time.perf_counter()
            if self.opened is not None:
                self.busy += now - self.opened
            self.opened = now if opens else None

        return hook

    def result(self, trainer) -> dict:
        """Per stage: the measured bubble; and the bytes stage 0 sends stage 1 per step, from its
        real activations for one micro-batch (forward) and those of them that carry a gradient
        back (backward)."""
        import paddle.distributed as dist

        from paddle_ernie5.parallel.pipeline_runtime import _pipeline_batch

        rt = trainer.par
        sent = 0
        if rt.stage == 0:
            np_batch = trainer.loader.next_batch()
            rows = len(np_batch["input_ids"]) // len(rt.data_ranks) // rt.micro_batches
            acts = rt.pipe(_pipeline_batch({k: v[:rows] for k, v in np_batch.items()}))
            for t in acts.values():
                sent += int(t.numel()) * t.element_size() * (1 if t.stop_gradient else 2)
        parts: list = []
        idle = 1.0 - self.busy / max(self.wall, 1e-9)
        dist.all_gather_object(parts, (rt.stage, idle, sent), group=rt.pp_group)
        p, m = len(rt.pp_ranks), rt.micro_batches
        return {
            "micro_batches": m,
            "bubble": [share for _, share, _ in sorted(parts)],
            "bubble_formula": (p - 1) / (m + p - 1),
            "p2p_bytes": m * sum(n for *_, n in parts),
        }


def run_setup(name: str, procs: int, steps: int, overrides: list[str], threads: int = 0) -> dict:
    out = tempfile.mkdtemp(prefix=f"bench_parallel_{name}_")
    args = [os.path.abspath(__file__), "--worker", out, "--steps", str(steps), *overrides]
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or max(1, cores // procs))}
    env.pop("PADDLE_TRAINERS_NUM", None)
    if procs == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "paddle.distributed.launch",
            "--nproc_per_node",
            str(procs),
            "--log_dir",
            os.path.join(out, "log"),
            *args,
        ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "result.json")) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.overrides)
    cores = os.cpu_count() or 1
    half = max(1, cores // 2)
    setups = [
        ("1 process", 1, max(1, cores), []),
        ("1 process, 1 thread", 1, 1, []),
        ("DP=2", 2, half, ["parallel.dp=2"]),
        ("EP=2 (all-gather)", 2, half, ["parallel.ep=2", "parallel.dispatcher=allgather"]),
        ("PP=2, 2 micro-batches", 2, half, ["parallel.pp=2", "parallel.micro_batches=2"]),
        ("PP=2, 8 micro-batches", 2, half, ["parallel.pp=2", "parallel.micro_batches=8"]),
        (
            "EP=2 x PP=2, 2 micro-batches",
            4,
            max(1, cores // 4),
            [
                "parallel.ep=2",
                "parallel.pp=2",
                "parallel.micro_batches=2",
                "parallel.dispatcher=allgather",
            ],
        ),
    ]
    results = {
        name: run_setup(name.split()[0], procs, args.steps, [*args.overrides, *extra], threads)
        for name, procs, threads, extra in setups
    }
    base = results["1 process"]["step_s"]
    print(
        f"tiny recipe, global batch {results['1 process']['tokens']} tokens/step, {cores} cores, "
        f"median of {args.steps} steps\n"
    )
    print("| setup | processes x threads | step time (s) | vs 1 process | tokens/s |")
    print("|---|---|---|---|---|")
    for name, procs, threads, _ in setups:
        r = results[name]
        print(
            f"| {name} | {procs} x {threads} | {r['step_s']:.3f} | "
            f"{r['step_s'] / base:.2f}x | {r['tokens'] / r['step_s']:.0f} |"
        )
    ep = results["EP=2 (all-gather)"]
    grad_bytes = 2 * (2 - 1) / 2 * results["1 process"]["params"] * 4
    print(
        f"\nbytes sent per rank per step (EP=2, {ep['moe_layers']} MoE layers, forward + backward; "
        "ring collectives)\n"
    )
    print("| traffic | MiB / step / rank |")
    print("|---|---|")
    print(f"| all-gather dispatcher (measured routing) | {ep['allgather_bytes'] / 2**20:.2f} |")
    print(
        f"| all-to-all dispatcher (same routing, sized; blocks padded to the largest load) | "
        f"{ep['alltoall_bytes'] / 2**20:.2f} |"
    )
    print(
        f"| rows routed to the other rank (a variable-split all-to-all would send this) | "
        f"{ep['routed_bytes'] / 2**20:.2f} |"
    )
    print(f"| DP=2 gradient all-reduce (all parameters, fp32) | {grad_bytes / 2**20:.2f} |")
    print(
        "\npipeline (2 stages): share of each pass a stage does not compute, and what stage 0 "
        "sends stage 1 per step (activations forward, their gradients backward)\n"
    )
    print("| setup | bubble, stage 0 / stage 1 (measured) | 1F1B formula | MiB / step |")
    print("|---|---|---|---|")
    for name, *_ in setups:
        r = results[name]
        if "bubble" in r:
            shares = " / ".join(f"{b:.2f}" for b in r["bubble"])
            print(
                f"| {name} | {shares} | {r['bubble_formula']:.2f} | {r['p2p_bytes'] / 2**20:.2f} |"
            )


if __name__ == "__main__":
    from paddle_ernie5.cpu import apply_mkl_fix  # before paddle loads (paddle_ernie5/cpu.py)

    print(apply_mkl_fix(), file=sys.stderr)
    main()
