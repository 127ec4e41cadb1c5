"""`ernie5` command line: parse -> build -> run. Heavy imports happen after the thread count is
set."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from . import config as C
from .errors import UserError

USAGE_ERROR = 2


def _set_threads(threads: int) -> None:
    """Pick the intra-op thread count, then import paddle (it pins OMP_NUM_THREADS=1 when unset)."""
    import contextlib
    import io

    from .cpu import apply_mkl_fix

    if "paddle" not in sys.modules:  # MKL reads it when it loads, i.e. with paddle
        print(apply_mkl_fix(), file=sys.stderr)
    n = threads or os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ.setdefault("MKL_NUM_THREADS", str(n))
    warnings.filterwarnings("ignore", message=".*ccache.*")
    # Paddle prints a two-line caution at import whenever OMP_NUM_THREADS > 1; for single-process
    # CPU training more threads is exactly what we want, so keep that caution out of the output.
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        import paddle  # noqa: F401
    kept = [l for l in captured.getvalue().splitlines() if "OMP_NUM_THREADS" not in l]
    if kept:
        print("\n".join(kept), file=sys.stderr)


def check_run_paths(cfg) -> None:
    """The directories a training run writes into, checked before any work: train.run_dir and
    data.cache_dir are directories (or can be created) and writable."""
    from .io.paths import check_output_dir

    check_output_dir(cfg.train.run_dir, "train.run_dir")
    check_output_dir(cfg.data.cache_dir, "data.cache_dir")


def cmd_train(args) -> int:
    cfg = C.load_config(args.recipe, args.overrides)
    if cfg.build_only:
        raise C.ConfigError(
            f"recipe {args.recipe!r} is build-only (it sizes a model and is never "
            "allocated); use `ernie5 config` to see its parameter count"
        )
    check_run_paths(cfg)
    if cfg.component != "pretrain":
        _set_threads(cfg.train.threads)
        from .train.components import run_component

        metrics = run_component(cfg)
        print(
            " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
            )
        )
        return 0
    # Under paddle.distributed.launch the processes of one machine share its cores.
    local_procs = int(os.environ.get("PADDLE_LOCAL_SIZE", "1"))
    _set_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // local_procs))
    from .parallel.runtime import init_runtime
    from .parallel.topology import rank_from_env, world_size_from_env
    from .train.trainer import Trainer

    trainer = Trainer(cfg, parallel=init_runtime(cfg, world_size_from_env(), rank_from_env()))
    result = trainer.fit()
    if not trainer.par.is_main:
        return 0
    unigram = trainer.unigram_loss()
    print(
        f"validation loss {result.val_loss:.4f} nats/token (ppl {_exp(result.val_loss):.1f}); "
        f"unigram baseline {unigram:.4f} (ppl {_exp(unigram):.1f}); run dir {result.run_dir}"
    )
    if args.eval:
        from .eval.runner import evaluate_run

        print(evaluate_run(result.run_dir, log=lambda *_: None)[1], end="")
    return 0


def cmd_config(args) -> int:
    import yaml

    cfg = C.load_config(args.recipe, args.overrides)
    from .model.params import count_params

    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    if not isinstance(cfg, C.Config):
        return 0  # a separately trained component: no backbone to size
    p = count_params(cfg.model)
    print(
        f"# parameters: {p['total']:,} total, {p['activated']:,} activated per token "
        f"({100 * p['activated'] / p['total']:.2f}%)"
    )
    return 0


def cmd_export(args) -> int:
    from .io.paths import check_output_dir
    from .train.export import export_from_checkpoint

    check_output_dir(args.out, "--out")
    _set_threads(args.threads)
    export_from_checkpoint(args.checkpoint, args.layers, args.experts, args.top_k, args.out)
    return 0


def cmd_convert_dha(args) -> int:
    from .io.paths import check_output_dir

    check_output_dir(args.out, "--out")
    _set_threads(args.threads)
    from .config.model import HeadFusionConfig
    from .train import dha

    if dha.is_fusing(args.checkpoint):
        if args.kv_budget is not None:
            raise UserError(
                f"{args.checkpoint} is being fused already: convert-dha on it merges the fused "
                "heads; drop --kv-budget"
            )
        dha.merge(args.checkpoint, args.out)
        return 0
    if args.kv_budget is None:
        raise UserError("--kv-budget is required to convert a checkpoint (e.g. 0.25)")
    fusion = HeadFusionConfig(
        steps=args.fusion_steps, schedule=args.fusion_schedule, granularity=args.granularity
    )
    fusion.validate("--fusion")
    dha.convert(
        args.checkpoint,
        args.kv_budget,
        args.out,
        args.method,
        fusion,
        args.calibration_batches,
    )
    return 0


def cmd_eval(args) -> int:
    if args.compare and not args.elastic_grid:
        raise UserError(
            "--compare adds runs to the --elastic-grid table; to compare evaluated runs seed by "
            "seed use `python -m paddle_ernie5.eval.compare --baseline ... --candidate ...`"
        )
    _set_threads(args.threads)
    from .eval.runner import evaluate_run

    rows, report = evaluate_run(
        args.checkpoint,
        elastic_grid=args.elastic_grid,
        compare=args.compare,
        max_batches=args.max_batches,
    )
    print(report)
    return 0 if rows else 1


def cmd_routing_report(args) -> int:
    if args.out:
        from .io.paths import check_output_dir

        check_output_dir(args.out, "--out")
    _set_threads(args.threads)
    from .eval.runner import routing_report

    print(routing_report(args.checkpoint, args.out, args.max_batches))
    return 0


def cmd_generate(args) -> int:
    _set_threads(args.threads)
    from . import generate

    return generate.run(args)


def cmd_plan(args) -> int:
    """Parameters, memory per device and tokens per step of a recipe under its parallel degrees."""
    from .parallel.planner import format_plan, make_plan

    cfg = C.load_config(args.recipe, args.overrides)
    if not isinstance(cfg, C.Config):
        raise C.ConfigError(
            f"recipe {args.recipe!r} trains component {cfg.component!r}; "
            "`ernie5 plan` sizes backbone recipes"
        )
    print(f"ernie5 plan: {args.recipe} {' '.join(args.overrides)}".rstrip())
    print(format_plan(cfg, make_plan(cfg)))
    return 0


def cmd_convert_moue(args) -> int:
    """A standard MoE run as a Mixture of Universal Experts model (train/moue.py)."""
    from .io.paths import check_output_dir

    check_output_dir(args.out, "--out")
    _set_threads(args.threads)
    from .train.moue import convert_checkpoint

    convert_checkpoint(
        args.checkpoint,
        args.out,
        window=args.window,
        trajectory_dim=args.trajectory_dim,
        closed_offset=args.closed_offset,
        open_decay=args.open_decay,
        seed=args.seed,
    )
    return 0


def _exp(x: float) -> float:
    import math

    return math.exp(min(x, 50.0))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ernie5",
        description="Train, evaluate, export and size paddle_ernie5 models. "
        "Recipes are YAML files under recipes/; append section.key=value to override any field.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (
        ("train", cmd_train, "train a recipe"),
        ("config", cmd_config, "print a recipe's resolved config and size"),
        (
            "plan",
            cmd_plan,
            "size a recipe on a cluster: parameters, memory per "
            "device, tokens per step (parallel.* overrides)",
        ),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("recipe", help="path to a YAML recipe, e.g. recipes/pretrain_tiny.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50")
        if name == "train":
            p.add_argument(
                "--eval",
                action="store_true",
                help="after training, print the evaluation table (as `ernie5 eval`)",
            )
        p.set_defaults(fn=fn)
    p = sub.add_parser("export", help="slice an elastic sub-model into a standalone checkpoint")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run directory, checkpoint directory (…/checkpoints/step_N) or exported model",
    )
    p.add_argument("--layers", type=int, required=True, help="layers to keep (evenly spaced)")
    p.add_argument("--experts", type=int, required=True, help="experts per MoE layer (most loaded)")
    p.add_argument("--top-k", type=int, required=True, help="experts per token")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser(
        "convert-dha",
        help="convert a run to Decoupled-Head Attention under a KV budget (head fusion that "
        "continued training completes), or merge a run whose fusion is done",
    )
    p.add_argument("--checkpoint", required=True, help="run, checkpoint or exported-model dir")
    p.add_argument(
        "--kv-budget",
        type=float,
        default=None,
        help="share of the multi-head KV cache to keep, in (0, 1] (omit to merge a fused run)",
    )
    p.add_argument("--method", default="dha", help="dha (default) or gqa (mean-pooling baseline)")
    p.add_argument(
        "--fusion-steps", type=int, default=8, help="optimizer steps until heads are fused"
    )
    p.add_argument("--fusion-schedule", default="linear", help="linear or cosine")
    p.add_argument(
        "--granularity",
        default="subspace",
        help="dha fusion weights: subspace (shared head + maps, default) or head (scalars)",
    )
    p.add_argument(
        "--calibration-batches", type=int, default=4, help="training batches for the analysis"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(fn=cmd_convert_dha)
    p = sub.add_parser("eval", help="evaluate a run: one table of metrics (and the elastic grid)")
    p.add_argument(
        "--checkpoint", required=True, help="run, checkpoint or exported-model directory"
    )
    p.add_argument(
        "--elastic-grid",
        action="store_true",
        help="also measure a grid of sliced sub-models (params, metrics, decode speed)",
    )
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        help="with --elastic-grid: another run to add to the grid (e.g. a sub-model shape trained "
        "from scratch)",
    )
    p.add_argument("--max-batches", type=int, default=0, help="validation batches (0 = all)")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser(
        "routing-report", help="expert usage, top-25%% IoU and routing entropy per source"
    )
    p.add_argument(
        "--checkpoint", required=True, help="run, checkpoint or exported-model directory"
    )
    p.add_argument("--out", default="", help="output directory (default: <run>/routing_report)")
    p.add_argument("--max-batches", type=int, default=4, help="held-out batches per source")
    p.set_defaults(fn=cmd_routing_report)
    p = sub.add_parser(
        "convert-moue",
        help="convert a standard MoE run to a Mixture of Universal Experts model (one pool: the "
        "union of the layers' experts; same logits at step 0)",
    )
    p.add_argument("--checkpoint", required=True, help="run, checkpoint or exported-model dir")
    p.add_argument("--out", required=True, help="output directory (train.init_from of its config)")
    p.add_argument(
        "--window", type=int, default=0, help="experts each layer reaches (0 = 2 x experts/layer)"
    )
    p.add_argument("--trajectory-dim", type=int, default=16, help="router trajectory state width")
    p.add_argument(
        "--closed-offset",
        type=float,
        default=30.0,
        help="initial negative offset of the borrowed window slots (they start closed)",
    )
    p.add_argument("--open-decay", type=float, default=0.9, help="offset factor per optimizer step")
    p.add_argument("--seed", type=int, default=0, help="seed of the trajectory parameters")
    p.set_defaults(fn=cmd_convert_moue)
    p = sub.add_parser(
        "generate",
        help="images (PNG), clips (GIF) from captions; answers about an "
        "image; speech (WAV) from text; transcripts of a WAV",
    )
    from . import generate

    generate.add_arguments(p)
    p.set_defaults(fn=cmd_generate)

    def threads(text: str) -> int:
        n = int(text)
        if n < 0:
            raise argparse.ArgumentTypeError(
                f"{n} is not a thread count: give 0 (all cores) or more"
            )
        return n

    for name in ("export", "convert-dha", "eval", "routing-report", "generate"):
        sub.choices[name].add_argument(
            "--threads",
            type=threads,
            default=0,
            help="CPU threads (0 = all cores), as train.threads",
        )
    sub.choices["convert-moue"].add_argument(
        "--threads", type=threads, default=0, help="CPU threads (0 = all cores)"
    )
    return parser


def _written_file(exc: BaseException) -> str | None:
    """The file a failed write names, if any exception of the chain names one."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.filename:
            return str(exc.filename)
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except C.ConfigError as e:
        print(f"ernie5: config error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except UserError as e:
        # bad checkpoint, impossible export, missing tool: one line, no traceback
        print(f"ernie5: {e}", file=sys.stderr)
        return USAGE_ERROR
    except Exception as e:
        # A full disk (or quota, or file-size limit) in any writer, ours or a library's: the
        # files already written are intact (every writer writes a temporary file and renames it).
        from .io import disk_full_message, no_space

        reason = no_space(e)
        if reason is None:
            raise
        print(f"ernie5: {disk_full_message(_written_file(e), reason)}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
