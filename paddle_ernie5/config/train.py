"""The `train` section.

`LoopConfig` holds what every training loop reads: run directory, steps, batch, optimizer,
learning-rate schedule, global-norm clipping, seed, threads, logging and checkpoint cadence. The
separately trained components (tokenizers, codecs, judges, the merger) read only these.
`TrainConfig` extends it with what only the backbone trainers (components pretrain, sft, rl) read:
gradient accumulation, AdaGC, SimReg, evaluation cadence, resume, initial weights and precision.
The attribute names are the same in both, so a loop written against one reads the other unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._check import _check, to_plain

PRECISIONS = ("fp32", "bf16", "fp16")


# Settings a resumed run may change freely: where and how often it writes and reports, how many
# threads and processes compute it, where caches live. Every other field of a recipe is recorded in
# each checkpoint and compared on resume (train.on_config_change).
RESUME_FREE = (
    "name",
    "build_only",
    "train.run_dir",
    "train.threads",
    "train.log_every",
    "train.save_every",
    "train.keep_last",
    "train.visualdl",
    "train.progress",
    "train.resume",
    "train.on_config_change",
    "train.init_from",
    "train.eval_every",
    "data.cache_dir",
    "data.eval_batches",
    "parallel",
    "generate",  # sampling settings: they do not change training
)


def flat_settings(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A config (or plain dict) as {dotted key: plain value}."""
    tree = to_plain(tree)
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flat_settings(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def resume_settings(cfg: Any) -> dict[str, Any]:
    """The settings of a recipe a checkpoint records and a resumed run must match (or, with
    train.on_config_change=warn, is told about): every field but those under RESUME_FREE."""
    return {
        k: v
        for k, v in flat_settings(cfg).items()
        if not any(k == f or k.startswith(f + ".") for f in RESUME_FREE)
    }


@dataclass(frozen=True, kw_only=True)
class LoopClipConfig:
    """Gradient clipping of a component loop: the global norm at train.clip_norm, always. `mode`
    is there so a recipe may say so (train.clip.mode: global); only the backbone trainer implements
    adagc."""

    mode: str = "global"

    def validate(self, at: str) -> None:
        _check(
            at,
            "mode",
            self.mode,
            self.mode == "global",
            "global (component loops clip by the global norm; only the pretraining trainer "
            "implements adagc)",
        )


@dataclass(frozen=True, kw_only=True)
class ClipConfig(LoopClipConfig):
    """Gradient clipping, applied once per optimizer step to the accumulated, reduced gradients.

    global: scale all gradients so their global L2 norm is at most train.clip_norm.
    adagc: AdaGC (arXiv 2502.11034), per-tensor clipping against an EMA of each tensor's own clipped
    norms: h = min(1, lambda_rel * gamma / ||g||), gamma <- beta * gamma + (1 - beta) * ||h g||. For
    the first `warmup_steps` steps it clips globally at lambda_abs while gamma tracks each tensor's
    running minimum clipped norm. The defaults (beta 0.98, lambda_rel 1.05, lambda_abs = the global
    clip value, 100 warm-up steps) are the settings published with the paper. Tensors without a
    gradient in a step (layers an elastic view skipped) keep their state."""

    mode: str = "global"  # global | adagc
    beta: float = 0.98
    lambda_rel: float = 1.05
    lambda_abs: float = 0.0  # warm-up global threshold; 0 = train.clip_norm
    warmup_steps: int = 100

    def validate(self, at: str) -> None:
        _check(at, "mode", self.mode, self.mode in ("global", "adagc"), "global or adagc")
        _check(at, "beta", self.beta, 0 <= self.beta < 1, "0 <= beta < 1")
        _check(at, "lambda_rel", self.lambda_rel, self.lambda_rel > 0, "> 0")
        _check(
            at, "lambda_abs", self.lambda_abs, self.lambda_abs >= 0, ">= 0 (0 = train.clip_norm)"
        )
        _check(at, "warmup_steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0")


@dataclass(frozen=True, kw_only=True)
class SimRegConfig:
    """SimReg: a supervised-contrastive loss on the final hidden states added to the objective,
    total = CE + weight * L_sim. Within one document, positions whose next-token labels agree are
    positives and the others negatives; up to `max_anchors` anchors per sequence are sampled (seeded
    by train.seed and the step, so resumed runs draw the same ones). Weight and temperature are our
    choice."""

    enabled: bool = False
    # At initialisation of the tiny recipe the SimReg gradient (temperature 0.1) is ~5x the CE one,
    # so a weight of 0.05 keeps it at about a quarter of the objective's gradient under one clipping
    # budget.
    weight: float = 0.05
    temperature: float = 0.1  # cosine similarities are divided by it (the usual SupCon value)
    max_anchors: int = 64  # anchors per sequence; cost is O(seq_len * max_anchors) per sequence

    def validate(self, at: str) -> None:
        _check(at, "weight", self.weight, self.weight >= 0, ">= 0")
        _check(at, "temperature", self.temperature, self.temperature > 0, "> 0")
        _check(at, "max_anchors", self.max_anchors, self.max_anchors >= 1, ">= 1")


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """`train:` of a component recipe: what the component training loops, the shared optimizer
    and the learning-rate schedule read."""

    run_dir: str = "runs/pretrain_tiny"
    max_steps: int = 600
    batch_size: int = 8  # sequences (or examples) per step
    lr: float = 3e-3
    min_lr: float = 3e-4
    schedule: str = "wsd"  # wsd (warmup-stable-decay, ERNIE5.md 8K stage) | cosine
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # WSD: share of steps spent decaying to min_lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm clipping threshold (clip.mode=global); 0 disables
    clip: LoopClipConfig = field(default_factory=LoopClipConfig)
    seed: int = 1234
    threads: int = 0  # intra-op CPU threads; 0 = all cores
    log_every: int = 10
    save_every: int = 200  # checkpoint every n steps (and after the last)
    keep_last: int = 2  # checkpoints kept
    # Resuming with settings other than those the checkpoint was written with (schedule, max_steps,
    # batch, seed, ...: every field but those in RESUME_FREE): refuse (exit 2, listing them) or warn
    # (list them and continue on the new settings). A change of parameter shapes always refuses.
    on_config_change: str = "refuse"  # refuse | warn
    visualdl: bool = True
    progress: bool = True

    def validate(self, at: str) -> None:
        for name in ("max_steps", "batch_size", "log_every", "save_every", "keep_last"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(at, "lr", self.lr, self.lr > 0, "> 0")
        _check(
            at, "min_lr", self.min_lr, 0 <= self.min_lr <= self.lr, f"0 <= min_lr <= lr={self.lr}"
        )
        _check(at, "schedule", self.schedule, self.schedule in ("wsd", "cosine"), "wsd or cosine")
        _check(
            at,
            "warmup_steps",
            self.warmup_steps,
            0 <= self.warmup_steps <= self.max_steps,
            f"0 <= warmup_steps <= max_steps={self.max_steps}",
        )
        _check(at, "decay_fraction", self.decay_fraction, 0 <= self.decay_fraction <= 1, "0..1")
        _check(at, "weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        _check(at, "beta1", self.beta1, 0 <= self.beta1 < 1, "0 <= beta1 < 1")
        _check(at, "beta2", self.beta2, 0 <= self.beta2 < 1, "0 <= beta2 < 1")
        _check(at, "eps", self.eps, self.eps > 0, "> 0")
        _check(at, "clip_norm", self.clip_norm, self.clip_norm >= 0, ">= 0 (0 disables)")
        _check(at, "threads", self.threads, self.threads >= 0, ">= 0 (0 = all cores)")
        _check(
            at,
            "on_config_change",
            self.on_config_change,
            self.on_config_change in ("refuse", "warn"),
            "refuse or warn",
        )
        self.clip.validate(f"{at}.clip")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(LoopConfig):
    """`train:` of a backbone recipe (components pretrain, sft, rl): the loop settings plus what
    only the backbone trainers read."""

    grad_accum: int = 1  # micro-batches per optimizer step
    clip: ClipConfig = field(default_factory=ClipConfig)
    simreg: SimRegConfig = field(default_factory=SimRegConfig)
    eval_every: int = 200
    resume: str = "auto"  # auto: continue from the newest complete checkpoint | never
    # Start from these model weights (a run dir, a checkpoint dir or an exported model) when the run
    # has no checkpoint of its own yet; optimizer and data start fresh. "" = random initialisation.
    init_from: str = ""
    # Numerics of the forward and backward (train/precision.py); weights, gradients and Adam state
    # stay float32 in every mode. fp32: plain float32. bf16: on a GPU, paddle.amp.auto_cast O1 in
    # bfloat16; on the CPU (no bfloat16 matmul kernel; CPU auto_cast keeps float32) an emulation
    # that rounds weights and activations to bfloat16 around float32 math
    # (model/bf16_emulation.py). fp16: GPU only, auto_cast O1 in float16 with GradScaler loss
    # scaling, one process; a CPU device is a ConfigError at start.
    precision: str = "fp32"
    # AdamW (and the global-norm clip's sum of squares) in one C++ pass over every parameter
    # (custom_ops/adamw, paddle_ernie5/optim/fused_adamw.py) on the CPU; false: Paddle's AdamW, one
    # kernel launch per parameter. Same update to float32 rounding.
    fused_optimizer: bool = True

    def validate(self, at: str) -> None:
        for name in ("grad_accum", "eval_every"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(at, "resume", self.resume, self.resume in ("auto", "never"), "auto or never")
        _check(
            at,
            "precision",
            self.precision,
            self.precision in PRECISIONS,
            "fp32, bf16 or fp16 (fp16 needs a GPU)",
        )
        super().validate(at)
        self.simreg.validate(f"{at}.simreg")
