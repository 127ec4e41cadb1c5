"""Ablations: a stability study (the default) and a Mixture of Universal Experts study.

    python tools/ablate.py --study moue --steps 200 --seeds 1,2,3 \
        --source /tmp/fresh/runs/pretrain_tiny --out runs/ablate_moue

MoUE study (`--study moue`, see MOUE_ARMS): from scratch, standard MoE (pretrain_tiny) against
MoUE at matched total parameters (moue_tiny: a pool of 96 = 3 x 32) and at matched activated
parameters (moue_tiny_small: a pool of 32); and from the --source checkpoint (copied under --out),
continued training as a standard MoE against `ernie5 convert-moue` + the same continued training.
Every arm runs --steps steps for each seed, the arms of one seed back to back (so load drift hits
all arms alike). Output: validation loss per arm and seed, mean and standard error over the seeds,
the paired difference to the arm's baseline, seconds per step (training time only, and a
side-by-side timing of the arms' train steps interleaved in this process, median), and the routing
report per layer window of every arm (usage summed over the seeds' final models).

Stability study (the default):

    python tools/ablate.py --steps 200 --lr 0.01 --spike-at 100 --spike-factor 20 --spike-steps 3

Arms: baseline (global-norm clipping), adagc (train.clip.mode=adagc), simreg
(train.simreg.enabled) and both. `--lr` raises the learning rate and
`--spike-at/--spike-factor/--spike-steps` multiply it for a few steps, to provoke the loss spikes
the options are meant to prevent. The arms run one after another in this process; each writes its
own run directory under --out, and an arm whose run already reached --steps is read back instead of
retrained (so an interrupted ablation continues where it was).

Columns: validation loss at the last step; the first evaluation step at which an arm's validation
loss is at or below the baseline's final one; loss spikes, steps whose text loss exceeds 1.5x the
median of the previous --window steps; the highest text loss after the first --window steps; the
largest gradient norm before clipping; the mean share of tensors clipped per step (global clipping
scales every tensor at once, so there it is the share of steps clipped). Extra dotted overrides
after the options apply to every arm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ARMS = {
    "baseline": [],
    "adagc": ["train.clip.mode=adagc"],
    "simreg": ["train.simreg.enabled=true"],
    "both": ["train.clip.mode=adagc", "train.simreg.enabled=true"],
}


def spike_steps(losses: list[float], window: int, ratio: float = 1.5) -> list[int]:
    """Indices i whose loss exceeds `ratio` x the median of the (up to) `window` losses before
    it."""
    import numpy as np

    out = []
    for i in range(5, len(losses)):
        if losses[i] > ratio * float(np.median(losses[max(0, i - window) : i])):
            out.append(i)
    return out


def read_run(run_dir: str) -> tuple[dict[int, dict], dict[int, float]]:
    """(train metrics by step, validation loss by step); the last record of a step wins
    (resumes)."""
    train, val = {}, {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            m = json.loads(line)
            if "loss" in m:
                train[m["step"]] = m
            if "val/loss" in m:
                val[m["step"]] = m["val/loss"]
    return train, val


def summarise(runs: dict[str, str], steps: int, window: int) -> list[dict]:
    data = {arm: read_run(d) for arm, d in runs.items()}
    base_final = data["baseline"][1][steps] if "baseline" in data else None
    rows = []
    for arm, (train, val) in data.items():
        ordered = [train[s] for s in sorted(train)]
        losses = [m["loss/text"] for m in ordered]
        reach = next(
            (s for s in sorted(val) if base_final is not None and val[s] <= base_final), None
        )
        spikes = spike_steps(losses, window)
        rows.append(
            {
                "arm": arm,
                "val_loss": val.get(steps),
                "steps_to_baseline": reach,
                "spikes": len(spikes),
                "spike_steps": [sorted(train)[i] for i in spikes],
                "peak_loss": max(losses[window:]),
                "max_grad_norm": max(m["train/grad_norm"] for m in ordered),
                "clipped": sum(m.get("clip/fraction_clipped", 0.0) for m in ordered) / len(ordered),
                "final_simreg": ordered[-1].get("loss/simreg"),
            }
        )
    return rows


def table(rows: list[dict], steps: int) -> str:
    lines = [
        "| arm | final val loss | steps to baseline's final val loss | loss spikes (steps) "
        "| peak text loss | max grad norm | mean share of tensors clipped |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reach = "not reached" if r["steps_to_baseline"] is None else str(r["steps_to_baseline"])
        where = f" ({', '.join(map(str, r['spike_steps']))})" if r["spike_steps"] else ""
        lines.append(
            f"| {r['arm']} | {r['val_loss']:.4f} | {reach} of {steps} | {r['spikes']}{where} "
            f"| {r['peak_loss']:.2f} | {r['max_grad_norm']:.2f} | {r['clipped']:.3f} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- MoUE study

# arm -> (recipe, baseline arm it is compared with, what is matched, starts from the source)
MOUE_ARMS = {
    "moe": (
        "recipes/pretrain_tiny.yaml",
        None,
        "baseline (standard MoE, 32 experts x 3 layers)",
        False,
    ),
    "moue": ("recipes/moue_tiny.yaml", "moe", "matched total and activated (pool 96)", False),
    "moue_small": ("recipes/moue_tiny_small.yaml", "moe", "matched activated (pool 32)", False),
    "moe_continue": ("recipes/moe_continue_tiny.yaml", None, "baseline (continued MoE)", True),
    "moue_convert": ("recipes/moue_convert_tiny.yaml", "moe_continue", "converted MoE", True),
}


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); 0 for n = 1)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0


def seconds_per_step(run_dir: str, tokens_per_step: int) -> float:
    """Training seconds per step of a run: tokens per step / the last logged tokens per second
    (evaluation and checkpoint time excluded)."""
    train, _ = read_run(run_dir)
    return tokens_per_step / train[max(train)]["perf/tokens_per_s"]


def moue_configs(args, arm: str, seed: int, source: str, converted: str):
    from paddle_ernie5 import config as C

    recipe, _, _, from_source = MOUE_ARMS[arm]
    overrides = [
        f"train.max_steps={args.steps}",
        f"train.seed={seed}",
        f"train.eval_every={max(1, args.steps // 2)}",
        f"train.save_every={args.steps}",
        "train.log_every=10",
        f"train.warmup_steps={min(args.steps // 4, 50 if not from_source else 20)}",
        "train.progress=false",
        "train.visualdl=false",
        "train.keep_last=1",
        f"train.run_dir={os.path.join(args.out, f'{arm}_s{seed}')}",
    ]
    if from_source:
        overrides.append(f"train.init_from={converted if arm == 'moue_convert' else source}")
    return C.load_config(recipe, [*overrides, *args.overrides])


def step0_loss(cfg) -> float:
    """Validation loss of the weights an arm starts from (train.init_from), before any step."""
    import tempfile

    from paddle_ernie5 import config as C
    from paddle_ernie5.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            C.replace(cfg, train=C.replace(cfg.train, run_dir=tmp)), log=lambda *_: None
        )
        trainer.init_weights(cfg.train.init_from)
        return trainer.evaluate()


def time_steps(cfgs: dict, rounds: int, log) -> dict[str, float]:
    """Median seconds of one train step per arm, the arms' steps interleaved in this process."""
    import tempfile

    import numpy as np

    from paddle_ernie5 import config as C
    from paddle_ernie5.train.trainer import Trainer

    trainers, times = {}, {arm: [] for arm in cfgs}
    with tempfile.TemporaryDirectory() as tmp:
        for arm, cfg in cfgs.items():
            train = C.replace(cfg.train, run_dir=os.path.join(tmp, arm), init_from="")
            trainers[arm] = Trainer(C.replace(cfg, train=train), log=lambda *_: None)
            trainers[arm].train_step()  # warm-up
        for _ in range(rounds):
            for arm, trainer in trainers.items():
                t0 = time.perf_counter()
                trainer.train_step()
                times[arm].append(time.perf_counter() - t0)
    log(f"side-by-side timing: {rounds} interleaved rounds")
    return {arm: float(np.median(t)) for arm, t in times.items()}


def routing_lines(cfgs: list, run_dirs: list[str], batches: int) -> list[str]:
    """Routing report of one arm: usage per MoE layer over `batches` validation batches, summed
    over the seeds' final models; per layer window for a universal pool."""
    import itertools

    from paddle_ernie5.data.loader import eval_batches, text_data_for
    from paddle_ernie5.eval.routing import model_windows, normalised_entropy, usage, window_report
    from paddle_ernie5.io import checkpoint
    from paddle_ernie5.model.inputs import to_model_batch
    from paddle_ernie5.model.model import Ernie5Model

    cfg = cfgs[0]
    _, _, val = text_data_for(cfg)
    data = [
        to_model_batch(b)
        for b in itertools.islice(eval_batches(val, cfg.train.batch_size), batches)
    ]
    total, model = None, None
    for run_dir in run_dirs:
        model = Ernie5Model(cfg.model)
        checkpoint.init_weights(model, run_dir, warn=lambda *_: None)
        counts = usage(model, data)
        total = counts if total is None else total + counts
    layer_ids = [i for i, _ in model.moe_layers()]
    windows = model_windows(model)
    if windows is not None:
        return window_report(total, layer_ids, windows)
    lines = [
        "| layer | experts | entropy | max/mean |",
        "|---|---|---:|---:|",
    ]
    for r, l in enumerate(layer_ids):
        lines.append(
            f"| L{l} | all {total.shape[1]} of its own | {normalised_entropy(total[r]):.3f} "
            f"| {total[r].max() / max(total[r].mean(), 1e-12):.2f} |"
        )
    return lines


def run_moue(args) -> int:
    """The MoUE study (module docstring)."""
    import shutil

    from paddle_ernie5.model.params import count_params
    from paddle_ernie5.train.moue import convert_checkpoint
    from paddle_ernie5.train.trainer import Trainer

    arms = args.arms.split(",") if args.arms else list(MOUE_ARMS)
    unknown = [a for a in arms if a not in MOUE_ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown MoUE arms {unknown}; known: {', '.join(MOUE_ARMS)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    os.makedirs(args.out, exist_ok=True)
    source = os.path.join(args.out, "source")
    if any(MOUE_ARMS[a][3] for a in arms) and not os.path.isdir(source):
        shutil.copytree(args.source, source, ignore=shutil.ignore_patterns("vdl"))
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    cfgs: dict[str, dict[int, object]] = {arm: {} for arm in arms}
    for seed in seeds:
        converted = os.path.join(args.out, f"converted_s{seed}")
        if "moue_convert" in arms and not os.path.isdir(converted):
            convert_checkpoint(source, converted, seed=seed, log=say)
        for arm in arms:
            cfg = moue_configs(args, arm, seed, source, converted)
            cfgs[arm][seed] = cfg
            run_dir = cfg.train.run_dir
            if (
                os.path.exists(os.path.join(run_dir, "metrics.jsonl"))
                and args.steps in read_run(run_dir)[1]
            ):
                say(f"{arm} seed {seed}: already trained, read back from {run_dir}")
                continue
            say(f"{arm} seed {seed}: training {args.steps} steps into {run_dir}")
            Trainer(cfg, log=lambda msg: say(f"  {msg}")).fit()
    first = {arm: cfgs[arm][seeds[0]] for arm in arms}
    step0 = {arm: step0_loss(first[arm]) for arm in arms if MOUE_ARMS[arm][3]}
    timing = time_steps(first, args.time_rounds, say) if args.time_rounds else {}
    rows = []
    for arm in arms:
        cfg = first[arm]
        tokens = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
        runs = [cfgs[arm][s].train.run_dir for s in seeds]
        vals = [read_run(d)[1][args.steps] for d in runs]
        base = MOUE_ARMS[arm][1]
        diffs = None
        if base in cfgs:
            diffs = [
                v - read_run(cfgs[base][s].train.run_dir)[1][args.steps]
                for v, s in zip(vals, seeds)
            ]
        p = count_params(cfg.model)
        rows.append(
            {
                "arm": arm,
                "matched": MOUE_ARMS[arm][2],
                "baseline": base,
                "params_total": p["total"],
                "params_activated": p["activated"],
                "val_loss": dict(zip(seeds, vals)),
                "mean_se": mean_se(vals),
                "diff_mean_se": None if diffs is None else mean_se(diffs),
                "val_loss_step0": step0.get(arm),
                "s_per_step_runs": mean_se([seconds_per_step(d, tokens) for d in runs]),
                "s_per_step_side_by_side": timing.get(arm),
                "routing": routing_lines([cfgs[arm][s] for s in seeds], runs, args.routing_batches),
            }
        )
    text = moue_table(rows, args.steps, seeds)
    print(text, end="")
    with open(os.path.join(args.out, "ablation_moue.md"), "w", encoding="utf-8") as f:
        f.write(f"command: python tools/ablate.py {' '.join(sys.argv[1:])}\n\n{text}")
    with open(os.path.join(args.out, "ablation_moue.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    return 0


def moue_table(rows: list[dict], steps: int, seeds: list[int]) -> str:
    lines = [
        f"Validation loss after {steps} steps (nats/token), seeds {', '.join(map(str, seeds))}; "
        "difference = arm - baseline, paired by seed (same data order); s/step: training time "
        "per step in the runs (mean +- s.e.) and in one process, interleaved (median).",
        "",
        "| arm | matched | total params | activated | val loss per seed | mean +- s.e. "
        "| vs baseline | s/step (runs) | s/step (side by side) |",
        "|---|---|---:|---:|---|---|---|---:|---:|",
    ]
    for r in rows:
        m, se = r["mean_se"]
        diff = (
            "-"
            if r["diff_mean_se"] is None
            else (f"{r['diff_mean_se'][0]:+.4f} +- {r['diff_mean_se'][1]:.4f} vs {r['baseline']}")
        )
        side = r["s_per_step_side_by_side"]
        lines.append(
            f"| {r['arm']} | {r['matched']} | {r['params_total']:,} | {r['params_activated']:,} "
            f"| {' / '.join(f'{v:.4f}' for v in r['val_loss'].values())} | {m:.4f} +- {se:.4f} "
            f"| {diff} | {r['s_per_step_runs'][0]:.3f} +- {r['s_per_step_runs'][1]:.3f} "
            f"| {'-' if side is None else f'{side:.3f}'} |"
        )
    starts = [r for r in rows if r.get("val_loss_step0") is not None]
    if starts:
        lines += ["", "Validation loss at step 0 (the weights the arm starts from, seed 1's):", ""]
        lines += [f"- {r['arm']}: {r['val_loss_step0']:.6f}" for r in starts]
    for r in rows:
        lines += [
            "",
            f"Routing of {r['arm']} (validation usage summed over the seeds' models):",
            "",
        ]
        lines += r["routing"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", default="recipes/pretrain_tiny.yaml")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.0, help="peak learning rate; 0 = the recipe's")
    ap.add_argument(
        "--spike-at", type=int, default=0, help="first step of an injected lr spike; 0 = none"
    )
    ap.add_argument("--spike-factor", type=float, default=20.0)
    ap.add_argument("--spike-steps", type=int, default=3)
    ap.add_argument(
        "--adagc-warmup",
        type=int,
        default=25,
        help="train.clip.warmup_steps of the AdaGC arms (the paper's 100 is for long runs)",
    )
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument(
        "--window", type=int, default=20, help="running-median window of the spike count"
    )
    ap.add_argument("--arms", default="", help="comma-separated arms (default: every arm)")
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    ap.add_argument("--out", default="runs/ablate")
    ap.add_argument("--study", default="stability", choices=("stability", "moue"))
    ap.add_argument("--seeds", default="1,2,3", help="MoUE study: train.seed of each repeat")
    ap.add_argument(
        "--source",
        default="runs/pretrain_tiny",
        help="MoUE study: the standard MoE run the conversion arms start from (copied to --out)",
    )
    ap.add_argument(
        "--time-rounds", type=int, default=10, help="MoUE study: interleaved timing rounds"
    )
    ap.add_argument(
        "--routing-batches", type=int, default=8, help="MoUE study: validation batches routed"
    )
    ap.add_argument("overrides", nargs="*", help="dotted overrides applied to every arm")
    args = ap.parse_args()
    if args.study == "moue":
        os.environ["OMP_NUM_THREADS"] = str(args.threads or os.cpu_count())
        import warnings

        warnings.filterwarnings("ignore")
        return run_moue(args)
    arms = args.arms.split(",") if args.arms else list(ARMS)
    if "baseline" not in arms or any(a not in ARMS for a in arms):
        ap.error(f"--arms must include baseline and name only {', '.join(ARMS)}")
    os.environ["OMP_NUM_THREADS"] = str(args.threads or os.cpu_count())
    import warnings

    warnings.filterwarnings("ignore")
    from paddle_ernie5 import config as C
    from paddle_ernie5.train.trainer import Trainer

    class SpikedTrainer(Trainer):
        def learning_rate_at(self, step: int) -> float:
            lr = super().learning_rate_at(step)
            if args.spike_at and args.spike_at <= step < args.spike_at + args.spike_steps:
                return lr * args.spike_factor
            return lr

    common = [
        f"train.max_steps={args.steps}",
        "train.log_every=1",
        f"train.eval_every={args.eval_every}",
        f"train.save_every={args.eval_every}",
        f"train.clip.warmup_steps={args.adagc_warmup}",
        "train.progress=false",
        "train.visualdl=false",
    ]
    if args.lr:
        common.append(f"train.lr={args.lr}")
    runs = {}
    for arm in arms:
        run_dir = os.path.join(args.out, arm)
        runs[arm] = run_dir
        cfg = C.load_config(
            args.recipe, [*common, *ARMS[arm], *args.overrides, f"train.run_dir={run_dir}"]
        )
        if (
            os.path.exists(os.path.join(run_dir, "metrics.jsonl"))
            and args.steps in read_run(run_dir)[1]
        ):
            print(f"{arm}: already trained, read back from {run_dir}", flush=True)
            continue
        print(f"{arm}: training {args.steps} steps into {run_dir}", flush=True)
        SpikedTrainer(cfg, log=lambda msg: print(f"  {msg}", flush=True)).fit()
    rows = summarise(runs, args.steps, args.window)
    text = table(rows, args.steps)
    print(text, end="")
    with open(os.path.join(args.out, "ablation.md"), "w", encoding="utf-8") as f:
        f.write(f"command: python tools/ablate.py {' '.join(sys.argv[1:])}\n\n{text}")
    with open(os.path.join(args.out, "ablation.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
