"""Frozen configuration: dataclasses, YAML recipes with `base:` inheritance, dotted overrides.

A recipe is a YAML mapping whose top-level keys are the sections of `Config` (model, data, train,
parallel, elastic) plus an optional `base:` path (relative to the recipe) that it is merged over.
Overrides on the command line are `section.key=value` with the value parsed as YAML.

Every problem is reported as one `ConfigError` naming the key, the bad value and what is allowed;
the CLI turns it into a one-line message and exit code 2 before any work starts. This module does not
import paddle so that entry points can set the thread count before paddle is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the key, the value and what is allowed."""


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    num_heads: int = 4
    num_kv_heads: int = 2  # GQA: num_heads must be a multiple of it
    head_dim: int = 32
    rope_base: float = 1e6  # ERNIE5.md
    # Uni-RoPE: share of rotary frequency pairs given to the (t, h, w) axes. Not disclosed; we follow
    # the usual multimodal-RoPE split that gives time a quarter and the two spatial axes the rest.
    rope_sections: tuple[float, float, float] = (0.25, 0.375, 0.375)
    # auto: Paddle's flashmask_attention on a GPU build with fp16/bf16, the CPU FlashMask op otherwise.
    backend: str = "auto"

    def validate(self, at: str) -> None:
        _check(at, "num_heads", self.num_heads, self.num_heads >= 1, ">= 1")
        _check(at, "num_kv_heads", self.num_kv_heads,
               self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0,
               f"a divisor of num_heads={self.num_heads}")
        _check(at, "head_dim", self.head_dim, self.head_dim >= 2 and self.head_dim % 2 == 0,
               "an even number >= 2")
        _check(at, "rope_base", self.rope_base, self.rope_base > 1, "> 1")
        _check(at, "rope_sections", self.rope_sections,
               len(self.rope_sections) == 3 and all(s >= 0 for s in self.rope_sections)
               and abs(sum(self.rope_sections) - 1) < 1e-6, "three non-negative shares summing to 1")
        _check(at, "backend", self.backend, self.backend in ("auto", "cpu", "reference", "paddle"),
               "one of auto, cpu, reference, paddle")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    num_experts: int = 32  # ONE pool shared by every modality (ERNIE5.md)
    top_k: int = 4
    expert_hidden: int = 128  # fine-grained SwiGLU experts
    num_shared_experts: int = 1
    shared_expert_hidden: int = 128
    first_dense_layers: int = 0  # layers before this index use a dense SwiGLU instead of MoE
    # Width of those dense SwiGLUs (and of the MTP block's); 0 = top_k * expert_hidden + shared width,
    # the activated width of an MoE layer.
    dense_hidden: int = 0
    score_func: str = "softmax"  # router scores; top-k weights are renormalised to sum to 1
    bias_update_rate: float = 1e-3  # aux-free balancing; the paper uses 1e-4 at scale
    aux_loss_weight: float = 0.0  # optional sequence-level balance loss
    z_loss_weight: float = 0.0  # optional router z-loss
    capacity_factor: float = 0.0  # 0 = dropless (the default and the paper's choice)

    def dense_width(self) -> int:
        return self.dense_hidden or (self.top_k * self.expert_hidden
                                     + self.num_shared_experts * self.shared_expert_hidden)

    def validate(self, at: str) -> None:
        _check(at, "num_experts", self.num_experts, self.num_experts >= 1, ">= 1")
        _check(at, "top_k", self.top_k, 1 <= self.top_k <= self.num_experts,
               f"1 <= top_k <= num_experts={self.num_experts}")
        _check(at, "expert_hidden", self.expert_hidden, self.expert_hidden >= 1, ">= 1")
        _check(at, "num_shared_experts", self.num_shared_experts, self.num_shared_experts >= 0, ">= 0")
        _check(at, "shared_expert_hidden", self.shared_expert_hidden,
               self.shared_expert_hidden >= 1, ">= 1")
        _check(at, "first_dense_layers", self.first_dense_layers, self.first_dense_layers >= 0, ">= 0")
        _check(at, "dense_hidden", self.dense_hidden, self.dense_hidden >= 0, ">= 0 (0 = derived)")
        _check(at, "score_func", self.score_func, self.score_func in ("softmax", "sigmoid"),
               "softmax or sigmoid")
        _check(at, "bias_update_rate", self.bias_update_rate, self.bias_update_rate >= 0, ">= 0")
        _check(at, "aux_loss_weight", self.aux_loss_weight, self.aux_loss_weight >= 0, ">= 0")
        _check(at, "z_loss_weight", self.z_loss_weight, self.z_loss_weight >= 0, ">= 0")
        _check(at, "capacity_factor", self.capacity_factor,
               self.capacity_factor == 0 or self.capacity_factor >= 1, "0 (dropless) or >= 1")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int = 4096  # text BPE vocabulary; the tokenizer is trained to this size
    hidden_size: int = 128
    num_layers: int = 4
    max_seq_len: int = 256
    rms_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = False
    num_mtp_modules: int = 1  # DeepSeek-V3 style multi-token prediction depth
    mtp_loss_weight: float = 0.3  # ERNIE5.md: 0.3 in the first stage
    modalities: tuple[str, ...] = ("text",)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def validate(self, at: str) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "max_seq_len"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(at, "num_mtp_modules", self.num_mtp_modules, self.num_mtp_modules in (0, 1), "0 or 1")
        _check(at, "mtp_loss_weight", self.mtp_loss_weight, self.mtp_loss_weight >= 0, ">= 0")
        _check(at, "modalities", self.modalities,
               len(self.modalities) > 0 and set(self.modalities) <= set(MODALITIES),
               f"a non-empty subset of {list(MODALITIES)}")
        _check(at, "moe.first_dense_layers", self.moe.first_dense_layers,
               self.moe.first_dense_layers <= self.num_layers, f"<= num_layers={self.num_layers}")
        self.attention.validate(f"{at}.attention")
        self.moe.validate(f"{at}.moe")


MODALITIES = ("text", "image", "video", "audio")
TASKS = ("pretrain", "visual_tokenizer", "vision_judge", "audio_codec", "speech_judge")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    seq_len: int = 256
    bpe_dropout: float = 0.0  # BPE-dropout probability during training (0 = off)
    val_fraction: float = 0.05
    cache_dir: str = ".cache/paddle_ernie5"  # tokenizer models and built datasets
    eval_batches: int = 0  # 0 = the whole validation split

    def validate(self, at: str) -> None:
        _check(at, "seq_len", self.seq_len, self.seq_len >= 8, ">= 8")
        _check(at, "bpe_dropout", self.bpe_dropout, 0 <= self.bpe_dropout < 1, "0 <= p < 1")
        _check(at, "val_fraction", self.val_fraction, 0 < self.val_fraction < 0.5, "0 < f < 0.5")
        _check(at, "eval_batches", self.eval_batches, self.eval_batches >= 0, ">= 0")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    run_dir: str = "runs/pretrain_tiny"
    max_steps: int = 600
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    schedule: str = "wsd"  # wsd (warmup-stable-decay, ERNIE5.md 8K stage) | cosine
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # WSD: share of steps spent decaying to min_lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm clipping; 0 disables
    seed: int = 1234
    threads: int = 0  # intra-op CPU threads; 0 = all cores
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 200
    keep_last: int = 2
    resume: str = "auto"  # auto: continue from the newest complete checkpoint | never
    # Start from these model weights (a run dir, a checkpoint dir or an exported model) when the run
    # has no checkpoint of its own yet; optimizer and data start fresh. "" = random initialisation.
    init_from: str = ""
    visualdl: bool = True
    progress: bool = True

    def validate(self, at: str) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "eval_every",
                     "save_every", "keep_last"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(at, "lr", self.lr, self.lr > 0, "> 0")
        _check(at, "min_lr", self.min_lr, 0 <= self.min_lr <= self.lr, f"0 <= min_lr <= lr={self.lr}")
        _check(at, "schedule", self.schedule, self.schedule in ("wsd", "cosine"), "wsd or cosine")
        _check(at, "warmup_steps", self.warmup_steps, 0 <= self.warmup_steps <= self.max_steps,
               f"0 <= warmup_steps <= max_steps={self.max_steps}")
        _check(at, "decay_fraction", self.decay_fraction, 0 <= self.decay_fraction <= 1, "0..1")
        _check(at, "weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        _check(at, "beta1", self.beta1, 0 <= self.beta1 < 1, "0 <= beta1 < 1")
        _check(at, "beta2", self.beta2, 0 <= self.beta2 < 1, "0 <= beta2 < 1")
        _check(at, "eps", self.eps, self.eps > 0, "> 0")
        _check(at, "clip_norm", self.clip_norm, self.clip_norm >= 0, ">= 0 (0 disables)")
        _check(at, "threads", self.threads, self.threads >= 0, ">= 0 (0 = all cores)")
        _check(at, "resume", self.resume, self.resume in ("auto", "never"), "auto or never")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    dp: int = 1
    sharding: int = 1
    sharding_stage: int = 1
    ep: int = 1
    pp: int = 1
    mp: int = 1
    # Rank layout, slowest axis first. Expert-parallel ranks split Fleet's data axis, so ep comes
    # directly after dp (parallel/topology.py).
    order: tuple[str, ...] = ("dp", "ep", "pp", "sharding", "mp")
    # auto: all-to-all on a GPU build (NCCL), all-gather otherwise (works on gloo).
    dispatcher: str = "auto"  # auto | local | allgather | alltoall
    # Fleet pipeline schedule on GPUs (parallel/pipeline.py); micro-batches per step = train.grad_accum.
    pp_schedule: str = "1F1B"  # 1F1B | FThenB | VPP
    pp_chunks: int = 1  # virtual stages per rank (VPP); 1 otherwise

    def validate(self, at: str) -> None:
        for name in ("dp", "sharding", "ep", "pp", "mp"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(at, "sharding_stage", self.sharding_stage, self.sharding_stage in (1, 2, 3), "1, 2 or 3")
        _check(at, "order", self.order,
               sorted(self.order) == sorted(("dp", "pp", "sharding", "ep", "mp"))
               and self.order.index("ep") == self.order.index("dp") + 1,
               "a permutation of dp, pp, sharding, ep, mp with ep directly after dp")
        _check(at, "dispatcher", self.dispatcher,
               self.dispatcher in ("auto", "local", "allgather", "alltoall"),
               "one of auto, local, allgather, alltoall")
        _check(at, "pp_schedule", self.pp_schedule, self.pp_schedule in ("1F1B", "FThenB", "VPP"),
               "one of 1F1B, FThenB, VPP")
        _check(at, "pp_chunks", self.pp_chunks,
               self.pp_chunks >= 1 and (self.pp_chunks == 1 or self.pp_schedule == "VPP"),
               ">= 1, and > 1 only with pp_schedule=VPP")


@dataclass(frozen=True, kw_only=True)
class ElasticConfig:
    """Once-for-all sampling of sub-models (depth, expert width, top-k), one draw per micro-batch.

    Each axis independently keeps the full setting with its `*_full_prob` (ERNIE5.md: 0.75-0.8),
    otherwise draws uniformly: a layer count in [min_layers, L-1], an expert-subset size in
    [min_experts, E-1], a top-k in [1, k-1]. Which layers and experts: `depth_rule` and `width_rule`."""

    enabled: bool = False
    depth_full_prob: float = 0.75
    min_layers: int = 1
    # even: keep n layers evenly spaced over the depth, first and last included; prefix: the first n.
    depth_rule: str = "even"
    width_full_prob: float = 0.8
    min_experts: int = 0  # smallest expert subset; 0 = model.moe.top_k
    # random: a uniformly random subset each draw (so any subset can be exported later); prefix: 0..n-1.
    width_rule: str = "random"
    topk_full_prob: float = 0.8

    def validate(self, at: str) -> None:
        for name in ("depth_full_prob", "width_full_prob", "topk_full_prob"):
            _check(at, name, getattr(self, name), 0 <= getattr(self, name) <= 1, "0..1")
        _check(at, "min_layers", self.min_layers, self.min_layers >= 1, ">= 1")
        _check(at, "min_experts", self.min_experts, self.min_experts >= 0, ">= 0 (0 = top_k)")
        _check(at, "depth_rule", self.depth_rule, self.depth_rule in ("even", "prefix"), "even or prefix")
        _check(at, "width_rule", self.width_rule, self.width_rule in ("random", "prefix"),
               "random or prefix")


@dataclass(frozen=True, kw_only=True)
class Config:
    name: str = "pretrain_tiny"
    # What `ernie5 train` runs: the backbone, or one of the separately trained components
    # (train/tasks.py maps each name to its trainer).
    task: str = "pretrain"
    # large: the recipe only sizes a model (config + parameter count, the planner); never allocated.
    build_only: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)

    def validate(self) -> "Config":
        _check("config", "task", self.task, self.task in TASKS, f"one of {', '.join(TASKS)}")
        self.model.validate("model")
        self.data.validate("data")
        self.train.validate("train")
        self.parallel.validate("parallel")
        self.elastic.validate("elastic")
        _check("data", "seq_len", self.data.seq_len, self.data.seq_len <= self.model.max_seq_len,
               f"<= model.max_seq_len={self.model.max_seq_len}")
        _check("parallel", "ep", self.parallel.ep, self.model.moe.num_experts % self.parallel.ep == 0,
               f"a divisor of model.moe.num_experts={self.model.moe.num_experts}")
        data_ranks = self.parallel.dp * self.parallel.ep * self.parallel.sharding
        _check("train", "batch_size", self.train.batch_size, self.train.batch_size % data_ranks == 0,
               f"a multiple of parallel.dp * ep * sharding = {data_ranks} (batch_size is the global "
               "batch; each rank takes an equal slice)")
        _check("elastic", "min_layers", self.elastic.min_layers,
               self.elastic.min_layers <= self.model.num_layers,
               f"<= model.num_layers={self.model.num_layers}")
        _check("elastic", "min_experts", self.elastic.min_experts,
               self.elastic.min_experts == 0
               or self.model.moe.top_k <= self.elastic.min_experts <= self.model.moe.num_experts,
               f"0 or model.moe.top_k={self.model.moe.top_k} <= min_experts <= "
               f"model.moe.num_experts={self.model.moe.num_experts}")
        return self

    def to_dict(self) -> dict:
        return to_plain(self)


def _check(at: str, key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{at}.{key}={value!r} is invalid: allowed {allowed}")


def to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain mappings, with type checking
# ---------------------------------------------------------------------------------------------


def from_dict(cls: type, data: dict, at: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{at or 'recipe'} must be a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{at}.{key}" if at else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {'.'.join(filter(None, [at, close[0]]))}?)" if close else ""
            raise ConfigError(f"unknown key {path!r}{hint}; known keys here: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, path) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{path}={value!r} is invalid: expected a list of {len(args)} values")
        return tuple(_coerce(a, v, path) for a, v in zip(args, value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected a string")
        return value
    raise TypeError(f"unsupported config field type {tp} at {path}")


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"recipe {path!r} does not exist; recipes live in recipes/*.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path!r} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path!r} must be a YAML mapping of sections")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_recipe_dict(path: str, _seen: tuple[str, ...] = ()) -> dict:
    """The recipe at `path` merged over its `base:` chain (paths relative to each recipe)."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"recipe {path!r} inherits from itself through base:")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"base={base!r} in {path!r} must be a path to another recipe")
    return _merge(load_recipe_dict(os.path.join(os.path.dirname(path), base), _seen + (path,)), data)


def parse_overrides(overrides: list[str]) -> dict:
    """['train.max_steps=50', 'model.moe.top_k=2'] -> nested dict with YAML-parsed values."""
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is malformed: expected section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return out


def load_config(path: str, overrides: list[str] | None = None) -> Config:
    """Resolve a recipe plus dotted overrides into a validated, frozen `Config`."""
    data = _merge(load_recipe_dict(path), parse_overrides(overrides or []))
    data.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return from_dict(Config, data).validate()


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace that re-validates a top-level Config."""
    new = dataclasses.replace(cfg, **changes)
    return new.validate() if isinstance(new, Config) else new


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config (YAML) next to a run; `load_config` reads it back unchanged."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)


def config_hash(cfg: Config) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
