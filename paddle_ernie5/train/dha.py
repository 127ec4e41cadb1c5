"""`ernie5 convert-dha`: turn a trained checkpoint into Decoupled-Head Attention (DHA; Chen et al.,
"DHA: Learning Decoupled-Head Attention from Transformer Checkpoints via Adaptive Heads Fusion",
2024), and merge it once the heads are fused.

    source run ─ calibration batches (training split) ─ per layer and kind (key, value): the
      outputs x W_j of every source head j ─ Gram matrix ─ cost of fusing a group into its mean
    ─ counts per layer and kind under the budget (greedy: the largest cost drop per added head)
    ─ an order of the source heads whose consecutive runs are the groups (query heads and the
      output projection follow their heads: the function is unchanged)
    ─ out dir: the model with attention.fusion set (model/attention.py HeadFusion at identity:
      the same logits as the source), config.yaml, dha.json (the analysis)
    continued training (`ernie5 train recipes/dha_tiny.yaml`) moves each head to its group's
      shared head over attention.fusion.steps
    `convert-dha` of that run ─ merge ─ the plain model with k_heads / v_heads

Budget: `kv_budget` is the share of the multi-head attention KV cache, as in the paper (its
checkpoints are MHA: "75% of the KV cache saved" is a budget of 0.25): the layers keep
round(kv_budget * 2 * H * L) key plus value heads in all. Every layer keeps at least one key and
one value head, so the smallest budget is 1 / H; a count always divides the layer's source heads.

Similarity (not disclosed by the paper, which searches the grouping with learned fusion weights
under an augmented Lagrangian): head j's outputs Y_j = X W_j on the calibration tokens (keys before
RoPE); a group g fused into its mean loses sum_{j in g} |Y_j - mean_g Y|^2, taken relative to
sum_j |Y_j|^2 of the layer and kind, which makes key and value costs of all layers comparable.
Groups are equal-sized runs of an order of the source heads (the op's layout: query head h reads
head h // (H / K)); one order serves keys and values, chosen among all orders for up to 8 source
heads (the sum of both costs), the source order otherwise.

`method="gqa"`: the baseline, the same continued training from a GQA mean-pooling conversion:
budget * H heads of each kind in every layer, groups of consecutive source heads, and fusion
weights fixed at identity (attention.fusion.weights mean), so each group ends as its plain mean.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import numpy as np

from ..config.model import HeadFusionConfig, ModelConfig
from ..errors import UserError

METHODS = ("dha", "gqa")
MAX_EXHAUSTIVE = 8  # source heads per layer up to which every order is tried


class DHAError(UserError, ValueError):
    """A conversion request this checkpoint cannot satisfy."""


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One layer's conversion: target key/value heads and the order of its source heads."""

    k_heads: int
    v_heads: int
    order: tuple[int, ...]  # new source-head slot -> old source head
    k_cost: float  # relative loss of fusing each key group into its mean
    v_cost: float


# ----------------------------------------------------------------------------------- checks
def check_budget(budget: float, cfg: ModelConfig, method: str) -> int:
    """The key + value heads the budget allows over all layers; DHAError for a bad request."""
    a, layers = cfg.attention, cfg.num_layers
    if method not in METHODS:
        raise DHAError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise DHAError(
            f"--kv-budget {budget}: the share of the multi-head KV cache to keep, in (0, 1]"
        )
    if a.fusion.active:
        raise DHAError("the checkpoint is being fused already; merge it first (convert-dha on it)")
    h = a.num_heads
    slots = round(budget * 2 * h * layers)
    source = a.kv_cache_heads(layers)
    if slots < 2 * layers:
        raise DHAError(
            f"--kv-budget {budget}: every layer keeps at least one key and one value head, so "
            f"the smallest budget of this model (num_heads={h}) is 1/{h} = {1 / h:.4g}"
        )
    if slots >= source:
        raise DHAError(
            f"--kv-budget {budget} keeps {slots} key + value heads, the source has {source} "
            f"({source / (2 * h * layers):.4g} of multi-head attention): nothing to fuse"
        )
    if method == "gqa":
        per = budget * h
        for i in range(layers):
            src = a.computed_heads(i)
            if per != int(per) or any(s % int(per) for s in src):
                raise DHAError(
                    f"--method gqa keeps kv-budget x num_heads = {per:g} heads of each kind in "
                    f"every layer; that must be a whole divisor of the source's heads {src} "
                    f"(layer {i})"
                )
    return slots


# ------------------------------------------------------------------------------- similarity
def input_covariances(model, batches) -> list[np.ndarray]:
    """Per backbone layer, X^T X [M, M] (float64) of its attention's normed input over the tokens of
    `batches`: every statistic of the head outputs X W below derives from it."""
    import paddle

    covs: dict[int, np.ndarray] = {}
    hooks = []
    for i, block in enumerate(model.blocks):

        def grab(layer, args, i=i):
            x = args[0].reshape([-1, args[0].shape[-1]]).numpy().astype(np.float64)
            covs[i] = covs.get(i, 0.0) + x.T @ x

        hooks.append(block.attn.register_forward_pre_hook(grab))
    model.eval()
    try:
        with paddle.no_grad():
            for batch in batches:
                model(batch, with_mtp=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [covs[i] for i in range(len(model.blocks))]


def _kind_weights(weight: np.ndarray, a, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(key heads [M, Sk, D], value heads [M, Sv, D]) of a layer's qkv weight [M, (H+Sk+Sv) D]."""
    h, d = a.num_heads, a.head_dim
    kh, vh = a.computed_heads(layer)
    w = weight.astype(np.float64)
    k = w[:, h * d : (h + kh) * d].reshape(len(w), kh, d)
    return k, w[:, (h + kh) * d :].reshape(len(w), vh, d)


def head_grams(covs, weights, a) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, the Gram matrices [S, S] of the key and of the value heads' outputs X W_j."""
    grams = []
    for i, (cov, weight) in enumerate(zip(covs, weights)):
        grams.append(
            tuple(np.einsum("mid,mn,njd->ij", w, cov, w) for w in _kind_weights(weight, a, i))
        )
    return grams


def group_cost(gram: np.ndarray, order, size: int) -> float:
    """Relative loss of fusing consecutive runs of `size` heads of `order` into their means."""
    order = np.asarray(order)
    lost = 0.0
    for g in order.reshape(-1, size):
        sub = gram[np.ix_(g, g)]
        lost += np.trace(sub) - sub.sum() / size
    return float(lost / max(np.trace(gram), 1e-30))


def _orders(n: int):
    return itertools.permutations(range(n)) if n <= MAX_EXHAUSTIVE else [tuple(range(n))]


def best_cost(gram: np.ndarray, groups: int) -> float:
    """The smallest group_cost over the orders tried, with `groups` groups."""
    n = len(gram)
    return min(group_cost(gram, o, n // groups) for o in _orders(n))


def _divisors(n: int) -> list[int]:
    return [t for t in range(1, n + 1) if n % t == 0]


def allocate(grams, slots: int) -> list[list[int]]:
    """Per layer [key heads, value heads]: start at 1 and 1, then repeatedly raise the count whose
    next divisor of the source heads lowers its fusion cost the most per added head, while the
    total stays within `slots` (a head that lowers no cost is not spent)."""
    counts = [[1, 1] for _ in grams]
    cost = {}

    def c(i, kind, t):
        if (i, kind, t) not in cost:
            cost[i, kind, t] = best_cost(grams[i][kind], t)
        return cost[i, kind, t]

    spare = slots - 2 * len(grams)
    while True:
        best = None
        for i, g in enumerate(grams):
            for kind in (0, 1):
                t = counts[i][kind]
                bigger = [u for u in _divisors(len(g[kind])) if u > t]
                if not bigger or bigger[0] - t > spare:
                    continue
                gain = (c(i, kind, t) - c(i, kind, bigger[0])) / (bigger[0] - t)
                if gain > 1e-9 and (best is None or gain > best[0]):
                    best = (gain, i, kind, bigger[0])
        if best is None:
            return counts
        _, i, kind, t = best
        spare -= t - counts[i][kind]
        counts[i][kind] = t


def plan_layers(cfg: ModelConfig, grams, budget: float, method: str) -> list[LayerPlan]:
    """The conversion of every layer (see the module docstring)."""
    slots = check_budget(budget, cfg, method)
    a = cfg.attention
    if method == "gqa":
        per = round(budget * a.num_heads)
        counts = [[per, per] for _ in grams]
    else:
        counts = allocate(grams, slots)
    plans = []
    for (gk, gv), (tk, tv) in zip(grams, counts):
        sk, sv = len(gk), len(gv)
        if method == "gqa" or sk != sv:
            # GQA keeps the source order; so does a layer whose source key and value head counts
            # differ (one order of the query heads cannot regroup both)
            order = tuple(range(sk))
        else:
            order = min(
                _orders(sk),
                key=lambda o: group_cost(gk, o, sk // tk) + group_cost(gv, o, sv // tv),
            )
        v_order = order if sk == sv else tuple(range(sv))
        plans.append(
            LayerPlan(
                tk,
                tv,
                tuple(order),
                group_cost(gk, order, sk // tk),
                group_cost(gv, v_order, sv // tv),
            )
        )
    return plans


# ---------------------------------------------------------------------------------- weights
def fusion_config(cfg: ModelConfig, plans: list[LayerPlan], fusion: HeadFusionConfig):
    """The model config of the checkpoint being fused: targets in k_heads / v_heads, the source's
    heads in attention.fusion."""
    a = cfg.attention
    src = [a.computed_heads(i) for i in range(cfg.num_layers)]
    fusion = dataclasses.replace(
        fusion, from_k=tuple(s[0] for s in src), from_v=tuple(s[1] for s in src)
    )
    att = dataclasses.replace(
        a,
        k_heads=tuple(p.k_heads for p in plans),
        v_heads=tuple(p.v_heads for p in plans),
        fusion=fusion,
    )
    new = dataclasses.replace(cfg, attention=att)
    new.validate("model")
    return new


def permute_heads(state: dict, cfg: ModelConfig, plans: list[LayerPlan]) -> dict:
    """The source weights with every layer's source heads in its plan's order: q heads and the
    output projection's rows move with their key/value head (the model computes the same
    function)."""
    a = cfg.attention
    h, d = a.num_heads, a.head_dim
    out = dict(state)
    for i, plan in enumerate(plans):
        kh, vh = a.computed_heads(i)
        if list(plan.order) == list(range(kh)) or kh != vh:
            continue
        qkv, o = state[f"blocks.{i}.attn.qkv.weight"], state[f"blocks.{i}.attn.out.weight"]
        per = h // kh  # query heads per source head
        q_heads = [old * per + r for old in plan.order for r in range(per)]
        q = qkv[:, : h * d].reshape(-1, h, d)[:, q_heads]
        k = qkv[:, h * d : (h + kh) * d].reshape(-1, kh, d)[:, list(plan.order)]
        v = qkv[:, (h + kh) * d :].reshape(-1, vh, d)[:, list(plan.order)]
        m = qkv.shape[0]
        out[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(
            [q.reshape(m, -1), k.reshape(m, -1), v.reshape(m, -1)], axis=1
        )
        out[f"blocks.{i}.attn.out.weight"] = o.reshape(h, d, -1)[q_heads].reshape(h * d, -1)
    return out


def subspace_init(cov: np.ndarray, qkv: np.ndarray, a, layer: int) -> dict[str, np.ndarray]:
    """HeadFusion's subspace maps of one layer from the principal components of its heads' outputs
    on the calibration tokens (X^T X = `cov`; `qkv` the layer's source weight, heads in group
    order). Values: per group, the top D eigenvectors U [G D, D] of the covariance of the G heads'
    stacked outputs; shared head = sum_i W_i U_i, head j rebuilt with N_j = U_j^T (the best rank-D
    fit). Keys: per group and RoPE pair p, z_i = the pair as a complex number; u = the top right
    singular vector of [z_1 .. z_G] (complex, unit): shared z = sum_i u_i z_i, head j rebuilt with
    conj(u_j) (the best fit by maps that commute with RoPE)."""
    keys, values = _kind_weights(qkv, a, layer)
    d, p = a.head_dim, a.head_dim // 2
    out = {}
    t = a.key_heads(layer)
    g = keys.shape[1] // t
    c = np.zeros([t, g, p, 2])
    n = np.zeros([t, g, p, 2])
    for grp in range(t):
        w = keys[:, grp * g : (grp + 1) * g]  # [M, G, D]
        wz = w[..., :p] + 1j * w[..., p:]  # [M, G, P]
        for pair in range(p):
            gram = wz[:, :, pair].conj().T @ cov @ wz[:, :, pair]  # [G, G] Hermitian
            u = np.linalg.eigh(gram)[1][:, -1]
            c[grp, :, pair] = np.stack([u.real, u.imag], axis=-1)
            n[grp, :, pair] = np.stack([u.real, -u.imag], axis=-1)
    out["c_k"], out["n_k"] = c, n
    t = a.value_heads(layer)
    g = values.shape[1] // t
    c = np.zeros([t, g, d, d])
    n = np.zeros([t, g, d, d])
    for grp in range(t):
        w = values[:, grp * g : (grp + 1) * g].reshape(len(values), g * d)
        u = np.linalg.eigh(w.T @ cov @ w)[1][:, ::-1][:, :d]  # [G D, D], largest first
        c[grp] = u.reshape(g, d, d)
        n[grp] = u.reshape(g, d, d).transpose(0, 2, 1)
    out["c_v"], out["n_v"] = c, n
    return out


def merged_state(model) -> tuple[dict, ModelConfig]:
    """(state, config) of the plain DHA model a fusing model ends at (lam = 1): each group's shared
    head; with granularity subspace each head's rebuilding map folds into the query projection
    (keys: per RoPE pair, conj(N) on the query pair) and into the output projection (values:
    N times the head's rows), so the merged model computes what the fused one does."""
    import paddle

    cfg = model.cfg
    a = cfg.attention
    h, d, p = a.num_heads, a.head_dim, a.head_dim // 2
    subspace = a.fusion.granularity == "subspace"
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    for i, block in enumerate(model.blocks):
        fusion = block.attn.fusion
        w = block.attn.qkv.weight
        m = w.shape[0]
        q = w.numpy()[:, : h * d].reshape(m, h, d)
        out = state[f"blocks.{i}.attn.out.weight"].reshape(h, d, -1)
        parts = []
        start = h * d
        for kind, src, tgt in zip("kv", fusion.sources, fusion.targets):
            heads = w[:, start : start + src * d].reshape([m, tgt, src // tgt, d])
            with paddle.no_grad():
                parts.append(fusion.shared(kind, heads).numpy().reshape(m, tgt * d))
            start += src * d
            if not subspace:
                continue
            n = getattr(fusion, f"n_{kind}").numpy()
            n = n.reshape(src, *n.shape[2:])  # per source head: [P, 2] or [D, D]
            for head in range(h):
                j = head // (h // src)  # the source head (slot) this query head reads
                if kind == "k":  # z_q' = conj(n_j) z_q per pair
                    n_re, n_im = n[j, :, 0], n[j, :, 1]
                    re, im = q[:, head, :p].copy(), q[:, head, p:].copy()
                    q[:, head, :p] = re * n_re + im * n_im
                    q[:, head, p:] = im * n_re - re * n_im
                else:
                    out[head] = n[j] @ out[head]
        state[f"blocks.{i}.attn.qkv.weight"] = np.concatenate([q.reshape(m, h * d), *parts], axis=1)
        state[f"blocks.{i}.attn.out.weight"] = out.reshape(h * d, -1)
        for key in [k for k in state if k.startswith(f"blocks.{i}.attn.fusion.")]:
            del state[key]
    att = dataclasses.replace(a, fusion=HeadFusionConfig())
    new = dataclasses.replace(cfg, attention=att)
    new.validate("model")
    return state, new


def fusion_progress(model) -> tuple[int, int]:
    """(optimizer steps seen, attention.fusion.steps) of a fusing model."""
    first = model.blocks[0].attn.fusion
    return int(first.step.numpy()[0]), model.cfg.attention.fusion.steps


# ------------------------------------------------------------------------------------- runs
def _load(path: str, log):
    from .. import config as C
    from ..io import checkpoint
    from ..model.model import Ernie5Model

    cfg_path, source = checkpoint.find_run(path)
    cfg = C.load_config(cfg_path)
    if not isinstance(cfg, C.Config):
        raise DHAError(f"{path} is a {cfg.component} run, not a backbone")
    model = Ernie5Model(cfg.model)
    checkpoint.set_weights(
        model, checkpoint.load_model_weights(source, warn=log), f"the weights in {source}"
    )
    model.eval()
    return cfg, model, source


def calibration_batches(cfg, count: int) -> list[dict]:
    """The first `count` batches of the run's training stream (the validation split stays
    held out)."""
    from ..data.loader import text_data_for
    from ..model.inputs import to_model_batch

    _, loader, _ = text_data_for(cfg)
    return [to_model_batch(loader.next_batch()) for _ in range(count)]


def _write(out_dir: str, cfg, model_cfg: ModelConfig, state: dict, report: dict, name: str):
    from safetensors.numpy import save_file

    from .. import config as C

    new_cfg = C.replace(
        cfg,
        name=name,
        model=model_cfg,
        train=dataclasses.replace(
            cfg.train, run_dir=os.path.join(out_dir, "run"), init_from=out_dir
        ),
    )
    os.makedirs(out_dir, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in state.items()},
        os.path.join(out_dir, "model.safetensors"),
    )
    C.save_config(new_cfg, os.path.join(out_dir, "config.yaml"))
    with open(os.path.join(out_dir, "dha.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)


def _max_logit_gap(a_model, b_model, batch) -> float:
    import paddle

    with paddle.no_grad():
        a = a_model(batch, with_mtp=False).logits.numpy()
        b = b_model(batch, with_mtp=False).logits.numpy()
    return float(np.abs(a - b).max())


def convert(
    path: str,
    budget: float,
    out_dir: str,
    method: str = "dha",
    fusion: HeadFusionConfig | None = None,
    calibration: int = 4,
    log=print,
) -> dict:
    """Convert the run at `path` for fusion under `budget`; writes `out_dir` (model.safetensors,
    config.yaml, dha.json) and returns the report. The written model gives the source's logits
    (checked on a calibration batch)."""
    from ..io import checkpoint
    from ..model.model import Ernie5Model

    cfg, source_model, source = _load(path, log)
    check_budget(budget, cfg.model, method)
    fusion = fusion or HeadFusionConfig()
    if method == "gqa":
        fusion = dataclasses.replace(fusion, weights="mean", granularity="head")
    batches = calibration_batches(cfg, calibration)
    covs = input_covariances(source_model, batches)
    weights = [b.attn.qkv.weight.numpy() for b in source_model.blocks]
    grams = head_grams(covs, weights, cfg.model.attention)
    plans = plan_layers(cfg.model, grams, budget, method)
    new_model_cfg = fusion_config(cfg.model, plans, fusion)
    model = Ernie5Model(new_model_cfg)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    source_state = permute_heads(
        {k: v.numpy() for k, v in source_model.state_dict().items()}, cfg.model, plans
    )
    state.update({k: v for k, v in source_state.items() if k in state})
    if fusion.granularity == "subspace":
        for i in range(cfg.model.num_layers):
            qkv = source_state[f"blocks.{i}.attn.qkv.weight"]
            for name, value in subspace_init(covs[i], qkv, new_model_cfg.attention, i).items():
                state[f"blocks.{i}.attn.fusion.{name}"] = value.astype(np.float32)
    checkpoint.set_weights(model, state, "the converted weights")
    model.eval()
    gap = _max_logit_gap(source_model, model, batches[0])
    a = new_model_cfg.attention
    layers = cfg.model.num_layers
    kept = sum(p.k_heads + p.v_heads for p in plans)
    report = {
        "source": os.path.abspath(source),
        "method": method,
        "kv_budget": budget,
        "kv_heads_kept": kept,
        "kv_share_of_mha": kept / (2 * a.num_heads * layers),
        "kv_share_of_source": kept / cfg.model.attention.kv_cache_heads(layers),
        "layers": [dataclasses.asdict(p) for p in plans],
        "max_logit_gap_at_step0": gap,
        "calibration_batches": calibration,
    }
    _write(out_dir, cfg, new_model_cfg, state, report, f"{cfg.name}_{method}{budget:g}")
    log(
        f"converted {source} ({method}, kv budget {budget:g}): k_heads {list(a.k_heads)}, "
        f"v_heads {list(a.v_heads)}; {kept} of {2 * a.num_heads * layers} multi-head KV heads "
        f"({report['kv_share_of_mha']:.1%}; {report['kv_share_of_source']:.1%} of the source); "
        f"logits at fusion step 0 within {gap:.2e} of the source. Wrote {out_dir}; continue "
        f"training it (e.g. `ernie5 train recipes/dha_tiny.yaml` or "
        f"`ernie5 train {os.path.join(out_dir, 'config.yaml')}`), then run convert-dha on that "
        "run to merge the fused heads."
    )
    return report


def merge(path: str, out_dir: str, log=print) -> dict:
    """Merge a fusing run at `path` into the plain DHA model (k_heads / v_heads) in `out_dir`.
    Before the end of the schedule the heads are merged at its fused end anyway, with a note."""
    from ..io import checkpoint
    from ..model.model import Ernie5Model

    cfg, model, source = _load(path, log)
    if not cfg.model.attention.fusion.active:
        raise DHAError(f"{path} has no fusion in progress; convert it with --kv-budget first")
    seen, steps = fusion_progress(model)
    if seen < steps:
        log(
            f"note: the fusion schedule is at {seen} of {steps} steps; merging at its end "
            "(every head at its group's shared head) changes the model's outputs"
        )
    state, new_model_cfg = merged_state(model)
    merged = Ernie5Model(new_model_cfg)
    checkpoint.set_weights(merged, state, "the merged weights")
    merged.eval()
    batch = calibration_batches(cfg, 1)[0]
    gap = _max_logit_gap(model, merged, batch) if seen >= steps else float("nan")
    a = new_model_cfg.attention
    layers = new_model_cfg.num_layers
    report = {
        "source": os.path.abspath(source),
        "merged_at": [seen, steps],
        "k_heads": list(a.k_heads),
        "v_heads": list(a.v_heads),
        "kv_share_of_mha": a.kv_cache_heads(layers) / (2 * a.num_heads * layers),
        "max_logit_gap_to_fused": gap,
    }
    _write(out_dir, cfg, new_model_cfg, state, report, f"{cfg.name}_merged")
    log(
        f"merged {source}: k_heads {list(a.k_heads)}, v_heads {list(a.v_heads)} "
        f"({report['kv_share_of_mha']:.1%} of the multi-head KV cache); logits within {gap:.2e} "
        f"of the fused model. Wrote {out_dir}"
    )
    return report


def is_fusing(path: str) -> bool:
    """True when the run at `path` has a fusion in progress (its config's attention.fusion)."""
    from .. import config as C
    from ..io import checkpoint

    cfg = C.load_config(checkpoint.find_run(path)[0])
    return isinstance(cfg, C.Config) and cfg.model.attention.fusion.active
