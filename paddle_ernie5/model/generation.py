"""Autoregressive sampling with a key/value cache.

Legend: B batch (rows decode in lock-step), P prompt length, N new tokens, L = P + N positions a
call runs at most, V vocabulary, keys [B, S, Hk, D], values [B, S, Hv, D] (Hk != Hv in a
Decoupled-Head Attention layer, model/attention.py).

    prompt_BP --prefill--> logits of the last position, cache holds P positions
    repeat N times: choose token -> forward that one token (cache grows by 1) -> next logits

Each row is one document, so attention needs only the causal mask (bottom-right aligned against
the cache); prompts of one call share a length (RL groups repeat one prompt). A multimodal prompt
(an image and a question, packed as training packs it) brings its own Uni-RoPE positions and
block-bidirectional FlashMask layout for the prefill; the sampled tokens are causal text whose
positions continue from the prompt's last position + 1, not from the row index (an image's
positions follow its extent, not its token count). Per-token log-probabilities of the sampled
tokens are returned with them (RL uses them as rollout log-probs). With `record_routing`, the
experts every MoE layer chose at every position that was run (the prompt and all sampled tokens but
the last) are returned too, for router replay in the RL training forward.

On a small model a decode step is dominated by fixed per-token costs, so the loop keeps them few:
keys and values are written in place into buffers sized for the whole call (`StaticKVCache`; its
`attend` is a decode step's attention reading them in place); the RoPE tables and positions of
every decode step are computed once, before the loop; the next token is chosen on the host in one
pass over the last position's logits (`_choose`), and router choices stay tensors until the end.
`generate(..., static_cache=False)` runs the plain loop (`_generate_reference`: a growing cache,
per-step tables, Paddle's log_softmax), the reference the fast loop is tested against: both give
the same tokens for the same seed, and log-probs that agree to float32 rounding.

KV-cache eviction (`eviction=`, the `generate` settings: NACL or a baseline, model/kv_eviction.py)
runs once per layer at the end of the prefill, in both loops: each layer's cache keeps its chosen
keys and values and frees the rest; decode steps attend over what is kept, at their true positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F

from ..config.generate import GenerateConfig
from .kv_eviction import KVEviction, gather_kept
from .rope import rope_cos_sin
from .view import FULL_VIEW, ElasticView


class LayerCache:
    """Keys and values of one layer, grown by concatenation (samplers whose length is not known up
    front: model/vision_sampling.py, model/audio.py; the reference loop)."""

    def __init__(self, eviction: KVEviction | None = None, index: int = 0):
        self.k = None
        self.v = None
        self.eviction = eviction
        self.index = index  # the layer's index (seeds its random eviction)
        self.evicted = False
        self.kept_positions = None  # [B, E, N] prompt positions an eviction group kept

    def append(self, k_BSKD, v_BSKD):
        if self.k is not None:
            k_BSKD = paddle.concat([self.k, k_BSKD], axis=1)
            v_BSKD = paddle.concat([self.v, v_BSKD], axis=1)
        self.k, self.v = k_BSKD, v_BSKD
        return k_BSKD, v_BSKD

    def end_prefill(self, q_BSHD, softmax_scale: float) -> None:
        """After attention of S positions: if they filled the empty cache (the prefill), run the
        eviction once (see _evict_once)."""
        if _evict_once(self, q_BSHD, self.k, softmax_scale, self.v.shape[2]):
            return
        keep = self.kept_positions
        t = [0, 2, 1, 3]
        self.k = gather_kept(self.k.transpose(t), keep).transpose(t)
        self.v = gather_kept(self.v.transpose(t), keep).transpose(t)


def _evict_once(cache, q_BSHD, k_BSKD, softmax_scale: float, v_heads: int) -> bool:
    """True when `cache` keeps everything: no eviction, not the prefill (the S rows of q did not
    fill an empty cache), already evicted, or a budget that keeps all; else sets
    cache.kept_positions [B, E, N] to the positions to keep (E eviction groups: kv_eviction.py)."""
    if cache.eviction is None or cache.evicted or k_BSKD.shape[1] != q_BSHD.shape[1]:
        return True
    cache.evicted = True
    # Differing key and value heads: one kept set per eviction group (kv_eviction.py).
    groups = {} if v_heads == k_BSKD.shape[2] else {"v_heads": v_heads}
    keep = cache.eviction.keep_indices(cache.index, q_BSHD, k_BSKD, softmax_scale, **groups)
    cache.kept_positions = keep
    return keep is None


class KVCache:
    def __init__(self, eviction: KVEviction | None = None):
        self._layers: dict[int, LayerCache] = {}
        self.eviction = eviction

    def layer(self, index: int) -> LayerCache:
        return self._layers.setdefault(index, LayerCache(self.eviction, index))

    def length(self) -> int:
        first = next(iter(self._layers.values()), None)
        return 0 if first is None or first.k is None else first.k.shape[1]


class StaticLayerCache:
    """Keys and values of one layer in buffers allocated once for the call's L positions and
    written in place.

    Two layouts, each filled only when a reader needs it (Paddle copies a transposed view slowly,
    so neither is derived from the other per step):
      `append` (any number of new positions) returns the filled prefix as [B, S, Hk, D], the layout
        attention takes, from [B, L, Hk, D] buffers (the prefix is one slice copy away);
      `attend` (one new position per row) reads [B, Hk, L, D] buffers in place, each (row, kv head)
        one contiguous [L, D] matrix, with the columns past the filled length masked.
    A layout behind the other (the prefill appends, the decode steps attend) catches up once.
    An eviction at the end of the prefill (`end_prefill`) moves the kept N of the P prompt
    positions into [B, Hk, N + L - P, D] buffers and frees the others."""

    def __init__(self, owner: StaticKVCache, index: int = 0):
        self.owner = owner
        self.index = index  # the layer's index (seeds its random eviction)
        self.capacity = owner.capacity
        self.eviction = owner.eviction
        self.evicted = False
        self.kept_positions = None  # [B, E, N] prompt positions an eviction group kept
        self.length = 0
        self._bufs: dict[str, list] = {}  # "seq" | "head" -> [k, v, positions filled]

    def _fill(self, layout: str, k_BSKD, v_BSKD):
        """Write the new positions into `layout`, first catching up on positions the other layout
        holds."""
        s = k_BSKD.shape[1]
        cap = self.capacity
        if self.length + s > cap:
            raise ValueError(f"the KV cache holds {cap} positions; {self.length} + {s} do not fit")
        if layout not in self._bufs:

            def zeros(x_BSKD):
                b, _, heads, d = x_BSKD.shape
                shape = [b, cap, heads, d] if layout == "seq" else [b, heads, cap, d]
                return paddle.zeros(shape, x_BSKD.dtype)

            self._bufs[layout] = [zeros(k_BSKD), zeros(v_BSKD), 0]
        buf = self._bufs[layout]
        if buf[2] < self.length:
            other_k, other_v, _ = self._bufs["head" if layout == "seq" else "seq"]
            for i, t in ((0, other_k), (1, other_v)):
                self._put(layout, buf[i], self._take(layout, t, buf[2], self.length), buf[2])
        for i, t in ((0, k_BSKD), (1, v_BSKD)):
            self._put(layout, buf[i], t, self.length)
        self.length += s
        buf[2] = self.length
        return buf

    @staticmethod
    def _take(layout: str, other, lo: int, hi: int):
        """Positions [lo, hi) of the other layout's buffer, as [B, S, Hk, D]."""
        return other[:, :, lo:hi].transpose([0, 2, 1, 3]) if layout == "seq" else other[:, lo:hi]

    @staticmethod
    def _put(layout: str, buf, x_BSKD, at: int):
        s = x_BSKD.shape[1]
        if layout == "seq":
            buf[:, at : at + s] = x_BSKD
        elif s == 1:  # swapping a unit axis moves no data
            buf[:, :, at : at + 1] = x_BSKD.reshape([x_BSKD.shape[0], x_BSKD.shape[2], 1, -1])
        else:
            buf[:, :, at : at + s] = x_BSKD.transpose([0, 2, 1, 3])

    def append(self, k_BSKD, v_BSKD):
        k, v, n = self._fill("seq", k_BSKD, v_BSKD)
        return k[:, :n], v[:, :n]

    def end_prefill(self, q_BSHD, softmax_scale: float) -> None:
        """After attention of S positions: if they filled the empty cache (the prefill), run the
        eviction once; the kept keys and values move into head-major buffers sized for them and
        the positions still to come."""
        k, v, n = self._bufs["seq"]
        if _evict_once(self, q_BSHD, k[:, :n], softmax_scale, v.shape[2]):
            return
        keep = self.kept_positions
        kept = keep.shape[-1]
        self.capacity -= n - kept
        bufs = []
        for t in (k, v):
            x_BKND = gather_kept(t[:, :n].transpose([0, 2, 1, 3]), keep)
            b, hk, _, d = x_BKND.shape
            buf = paddle.zeros([b, hk, self.capacity, d], t.dtype)
            buf[:, :, :kept] = x_BKND
            bufs.append(buf)
        self._bufs = {"head": [bufs[0], bufs[1], kept]}
        self.length = kept

    def attend(self, q_BSHD, k_BSKD, v_BSKD, softmax_scale: float):
        """Causal attention of one new position per row (S = 1) over the cache after appending its
        key and value: q [B, 1, H, D] -> [B, 1, H, D], query head h reading key head h // (H / Hk)
        and value head h // (H / Hv) (the weights of the H heads regrouped by value head).
        Masked columns get weight exp(-inf), which Paddle's CPU softmax makes ~1e-29 rather than 0;
        their values are zeros, and L such weights change the normaliser far below float32
        resolution."""
        b, s, h, d = q_BSHD.shape
        if s != 1:
            raise ValueError(f"attend serves one new position per row, got {s}")
        k_BKLD, v_BKLD, n = self._fill("head", k_BSKD, v_BSKD)
        hk, hv = k_BKLD.shape[1], v_BKLD.shape[1]
        scores_BKGL = paddle.matmul(q_BSHD.reshape([b, hk, h // hk, d]), k_BKLD, transpose_y=True)
        scores_BKGL = scores_BKGL * softmax_scale + self.owner.column_mask(n, self.capacity)
        probs = F.softmax(scores_BKGL, axis=-1)
        if hv != hk:
            probs = probs.reshape([b, hv, h // hv, -1])
        o_BKGD = paddle.matmul(probs, v_BKLD)
        return o_BKGD.reshape([b, 1, h, d])


class StaticKVCache:
    """`KVCache` over `StaticLayerCache`s of one capacity (a layer allocates at its first write, so
    an elastic view's skipped layers cost nothing)."""

    def __init__(self, capacity: int, eviction: KVEviction | None = None):
        self.capacity = capacity
        self.eviction = eviction
        self._layers: dict[int, StaticLayerCache] = {}
        self._mask = (-1, -1, None)

    def layer(self, index: int) -> StaticLayerCache:
        return self._layers.setdefault(index, StaticLayerCache(self, index))

    def length(self) -> int:
        first = next(iter(self._layers.values()), None)
        return 0 if first is None else first.length

    def column_mask(self, filled: int, capacity: int | None = None):
        """[capacity] float32 (default: the cache's): 0 for the first `filled` columns, -inf after
        (built once per length and shared by the layers)."""
        capacity = self.capacity if capacity is None else capacity
        if self._mask[:2] != (filled, capacity):
            row = np.where(np.arange(capacity) < filled, 0.0, -np.inf).astype(np.float32)
            self._mask = (filled, capacity, paddle.to_tensor(row))
        return self._mask[2]


@dataclass
class Sample:
    tokens: np.ndarray  # [B, N] sampled ids (after a row's stop token: pad_id)
    # [B, N] log-prob of each sampled token (temperature-scaled; greedy: T = 1)
    logprobs: np.ndarray
    lengths: np.ndarray  # [B] new tokens up to and including the stop token
    # layer -> [B, P + N - 1, K] expert ids per position run (record_routing=True), else None
    routing: dict[int, np.ndarray] | None = None


class _Tokens:
    """The sampled tokens and their log-probs, step by step: a row that has sampled stop_id
    continues with pad_id (log-prob 0); its length counts the stop token. Once every row has
    stopped, the arrays are cut after that step and `finished` is set."""

    def __init__(self, b: int, n: int, pad_id: int, stop_id: int | None):
        self.tokens = np.full([b, n], pad_id, dtype=np.int64)
        self.logprobs = np.zeros([b, n], dtype=np.float32)
        self.lengths = np.full([b], n, dtype=np.int64)
        self.done = np.zeros([b], dtype=bool)
        self.pad_id, self.stop_id = pad_id, stop_id
        self.finished = False

    def add(self, t: int, nxt_B: np.ndarray, logp_B: np.ndarray) -> np.ndarray:
        """Record step t (tokens nxt_B with log-probs logp_B); returns the tokens to feed next."""
        nxt = np.where(self.done, self.pad_id, nxt_B)
        self.tokens[:, t] = nxt
        self.logprobs[:, t] = np.where(self.done, 0.0, logp_B)
        if self.stop_id is not None:
            newly = (~self.done) & (nxt == self.stop_id)
            self.lengths[newly] = t + 1
            self.done |= newly
            if self.done.all():
                self.tokens, self.logprobs = self.tokens[:, : t + 1], self.logprobs[:, : t + 1]
                self.finished = True
        return nxt


def _text_batch(ids_BS, start) -> dict:
    """Causal text at positions start, start + 1, ... (t = h = w); `start` an int or one per row
    [B]."""
    b, s = ids_BS.shape
    if np.ndim(start) == 0:
        pos = paddle.arange(start, start + s, dtype="int64").reshape([1, 1, s]).expand([b, 3, s])
    else:
        rows = np.asarray(start, np.int64)[:, None] + np.arange(s)
        pos = paddle.to_tensor(rows).unsqueeze(1).expand([b, 3, s])
    return {
        "input_ids": ids_BS,
        "token_types": paddle.zeros([b, s], dtype="int64"),
        "positions": pos,
        "startend_row_indices": None,
    }


def _tensor(v):
    """A prompt extra as a model input: floats float32, int32 kept (FlashMask indices), other
    integer arrays int64; flags such as mask_causal as they are."""
    if not isinstance(v, np.ndarray):
        return v
    if np.issubdtype(v.dtype, np.floating):
        return paddle.to_tensor(v, dtype="float32")
    return paddle.to_tensor(v, dtype="int32" if v.dtype == np.int32 else "int64")


def _prompt_shift(prompt_extras, p: int):
    """Decode step i runs at position P + shift + i: the prompt's last position + 1 + i (an int,
    or one per row for a packed prompt)."""
    given = (prompt_extras or {}).get("positions")
    return 0 if given is None else np.asarray(given)[:, :, -1].max(axis=1) + 1 - p


# ------------------------------------------------------------------------------------ choosing
# The reference scores the last position with Paddle's log_softmax, whose CPU kernel recomputes the
# row sum for every output element (O(V^2) per row: milliseconds for V = 2048). The fast path
# computes the same formula on the host in O(V). Its log-probs differ from Paddle's only by the
# last bits of the log-normaliser, a shift shared by a whole row, and by the rounding of each
# value; only a choice closer than that rounding could differ, so a step where some row's winner
# leads by less than a safe margin is chosen again from the reference's numbers: the tokens are
# always the reference's.
_MARGIN = 1e-6  # relative to the log-probs compared; > 8 float32 ulps of each


def _reference_log_probs(logits_BV, temperature: float, top_k: int) -> np.ndarray:
    """Log-probs [B, V] of the distribution sampled from (greedy: the model's own, T = 1)."""
    logp = F.log_softmax(logits_BV.astype("float32") / (temperature or 1.0), axis=-1).numpy()
    if top_k > 0:
        kth = np.sort(logp, axis=-1)[:, -top_k][:, None]
        logp = np.where(logp >= kth, logp, -np.inf)
        logp = logp - np.logaddexp.reduce(logp, axis=-1, keepdims=True)
    return logp


def _gumbel(rng, shape) -> np.ndarray:
    return -np.log(-np.log(rng.random(shape) + 1e-20) + 1e-20)


def _log_sum_exp(x_BV: np.ndarray) -> np.ndarray:
    """[B, 1] float32 log(sum(exp(x))) with the sum in float64 (x holds its row maximum 0)."""
    return np.log(np.exp(x_BV).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)


def _top_k(logp_BV: np.ndarray, k: int):
    """(log-probs renormalised over each row's top k, -inf elsewhere; how far the k-th value
    leads the next beyond the rounding margin, +inf when every value is kept). Ties at the k-th
    value are all kept, as in the reference."""
    if k >= logp_BV.shape[1]:
        return logp_BV - _log_sum_exp(logp_BV), np.full(len(logp_BV), np.inf)
    part = np.partition(logp_BV, [-k - 1, -k], axis=-1)
    kth, below = part[:, -k], part[:, -k - 1]
    boundary = kth - below - _MARGIN * (np.abs(kth) + np.abs(below) + 1.0)
    kept = np.where(logp_BV >= kth[:, None], logp_BV, -np.inf)
    top = kept.max(axis=-1, keepdims=True)
    return kept - (top + _log_sum_exp(kept - top)), boundary


def _top2(scores_BV: np.ndarray):
    """(argmax [B], index of the runner-up [B]); `scores_BV` is left as it was."""
    rows = np.arange(len(scores_BV))
    pick = scores_BV.argmax(axis=-1)
    best = scores_BV[rows, pick]
    scores_BV[rows, pick] = -np.inf
    second = scores_BV.argmax(axis=-1)
    scores_BV[rows, pick] = best
    return pick, second


def _choose(logits_BV, temperature: float, top_k: int, rng):
    """(ids [B], their log-probs [B] float32): greedy (temperature 0) or a Gumbel-max sample of the
    temperature-scaled, top-k-restricted distribution. Draws from `rng` exactly what the reference
    loop draws.

    Scores are compared before the log-normaliser is subtracted (a shift of the whole row), except
    under top-k, where the renormalised log-probs are compared."""
    x = (logits_BV if logits_BV.dtype == paddle.float32 else logits_BV.astype("float32")).numpy()
    z = x if temperature in (0, 1) else x / np.float32(temperature)
    # Paddle's CPU log_softmax clips shifted logits at -64; no choice can fall there.
    shifted = np.maximum(z - z.max(axis=-1, keepdims=True), np.float32(-64.0))
    lse = _log_sum_exp(shifted)
    base, boundary = shifted, np.full(len(x), np.inf)
    if top_k > 0:
        base, boundary = _top_k(shifted - lse, top_k)
        lse = np.zeros_like(lse)
    noise = None if temperature == 0 else _gumbel(rng, base.shape)
    scores = base if noise is None else base + noise
    pick, second = _top2(scores)
    rows = np.arange(len(pick))
    logp, logp_second = base[rows, pick] - lse[:, 0], base[rows, second] - lse[:, 0]
    runner_up = scores[rows, second]
    finite = np.isfinite(runner_up)  # -inf: the pick is the only value top-k kept
    size = np.abs(logp) + np.where(finite, np.abs(logp_second), 0.0) + 1.0
    lead = np.where(finite, scores[rows, pick] - np.where(finite, runner_up, 0.0), np.inf)
    lead = lead - _MARGIN * size
    if (np.minimum(boundary, lead) <= 0).any():
        ref = _reference_log_probs(logits_BV, temperature, top_k)
        pick = (ref if noise is None else ref + noise).argmax(axis=-1)
        logp = ref[rows, pick]
    return pick, logp.astype(np.float32)


# ----------------------------------------------------------------------------------- generate
def _decode_inputs(model, shift, p: int, steps: int, b: int):
    """Per decode step i: (positions [B, 3, 1], RoPE tables (cos, sin) [B, 1, 1, D] or None). The
    tables of all steps come from one `rope_cos_sin` call. cos/sin are elementwise, and Paddle
    evaluates a SIMD vector's lanes alike but a tail shorter than a vector with the scalar libm
    (whose last bit can differ): when one step's B x D angles fill whole vectors (up to 16 lanes)
    the tables equal the per-step ones bit for bit; otherwise None (the model computes them per
    step, as the reference does)."""
    start = np.broadcast_to(np.asarray(shift, np.int64) + p, [b])
    pos_NB = start[None, :] + np.arange(max(steps, 1), dtype=np.int64)[:, None]
    pos_NB31 = np.ascontiguousarray(
        np.broadcast_to(pos_NB[:, :, None, None], [len(pos_NB), b, 3, 1])
    )
    positions = paddle.to_tensor(pos_NB31)
    att = model.cfg.attention
    if b * att.head_dim % 16:
        return [(positions[i], None) for i in range(steps)]
    cos, sin = rope_cos_sin(
        positions.reshape([-1, 3, 1]), att.head_dim, att.rope_base, att.rope_sections
    )
    cos = cos.reshape([len(pos_NB), b, 1, 1, att.head_dim])
    sin = sin.reshape([len(pos_NB), b, 1, 1, att.head_dim])
    return [(positions[i], (cos[i], sin[i])) for i in range(steps)]


@paddle.no_grad()
def generate(
    model,
    prompt_BP: np.ndarray,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    stop_id: int | None = None,
    pad_id: int = 0,
    seed: int = 0,
    view: ElasticView = FULL_VIEW,
    record_routing: bool = False,
    prompt_extras: dict[str, np.ndarray] | None = None,
    static_cache: bool = True,
    eviction: GenerateConfig | None = None,
) -> Sample:
    """Sample continuations of equal-length prompts. temperature 0 = greedy. `prompt_extras`: more
    batch entries for the prompt only (token_types and the codes of a spoken prompt, say; for a
    packed multimodal prompt also positions [B, 3, P], startend_row_indices and mask_causal); the
    sampled tokens are text at positions last prompt position + 1, + 2, ... `static_cache=False`:
    the reference loop (same tokens, slower). `eviction`: the KV-cache eviction at the end of the
    prefill (kv_budget 1, the default, keeps everything)."""
    evictor = None if eviction is None else KVEviction(eviction)
    if not static_cache:
        return _generate_reference(
            model,
            prompt_BP,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            stop_id=stop_id,
            pad_id=pad_id,
            seed=seed,
            view=view,
            record_routing=record_routing,
            prompt_extras=prompt_extras,
            evictor=evictor,
        )
    model.eval()
    rng = np.random.default_rng(seed)
    prompt = paddle.to_tensor(np.asarray(prompt_BP, dtype=np.int64))
    b, p = prompt.shape
    cache = StaticKVCache(p + max(max_new_tokens - 1, 0), evictor)
    routes: dict[int, list] = {}

    def forward(batch):
        out = model(batch, view, with_mtp=False, cache=cache)
        if record_routing:
            for i, stats in out.router_stats.items():
                routes.setdefault(i, []).append(stats.topk_ids_TK)
        return out.logits[:, -1]

    shift = _prompt_shift(prompt_extras, p)
    batch = _text_batch(prompt, shift)
    batch.update({k: _tensor(v) for k, v in (prompt_extras or {}).items()})
    logits = forward(batch)
    steps = _decode_inputs(model, shift, p, max_new_tokens - 1, b)
    types = paddle.zeros([b, 1], dtype="int64")
    sampled = _Tokens(b, max_new_tokens, pad_id, stop_id)
    for t in range(max_new_tokens):
        nxt, logp = _choose(logits, temperature, top_k, rng)
        nxt = sampled.add(t, nxt, logp)
        if sampled.finished:
            break
        if t + 1 < max_new_tokens:  # the last sampled token is never run
            positions, tables = steps[t]
            batch = {
                "input_ids": paddle.to_tensor(nxt.reshape(b, 1)),
                "token_types": types,
                "positions": positions,
                "startend_row_indices": None,
            }
            if tables is not None:
                batch["rope_cos_sin"] = tables
            logits = forward(batch)
    routing = None
    if record_routing:
        routing = {
            i: np.concatenate([r.numpy().reshape(b, -1, r.shape[-1]) for r in rs], axis=1)
            for i, rs in routes.items()
        }
    return Sample(sampled.tokens, sampled.logprobs, sampled.lengths, routing)


def _generate_reference(
    model,
    prompt_BP,
    max_new_tokens,
    *,
    temperature,
    top_k,
    stop_id,
    pad_id,
    seed,
    view,
    record_routing,
    prompt_extras,
    evictor=None,
) -> Sample:
    """The plain loop: a cache grown by concatenation, the model's own per-step RoPE tables,
    log-probs from Paddle's log_softmax and host syncs per step for the router's choices."""
    model.eval()
    rng = np.random.default_rng(seed)
    prompt = paddle.to_tensor(np.asarray(prompt_BP, dtype=np.int64))
    b, p = prompt.shape
    cache = KVCache(evictor)
    routes: dict[int, list[np.ndarray]] = {}
    shift = _prompt_shift(prompt_extras, p)
    seen = [0]  # positions run so far (the cache may hold fewer after an eviction)

    def forward(ids_BS, extras=None):
        batch = _text_batch(ids_BS, seen[0] + shift)
        seen[0] += ids_BS.shape[1]
        batch.update({k: _tensor(v) for k, v in (extras or {}).items()})
        out = model(batch, view, with_mtp=False, cache=cache)
        if record_routing:
            for i, stats in out.router_stats.items():
                routes.setdefault(i, []).append(
                    stats.topk_ids_TK.numpy().reshape(b, ids_BS.shape[1], -1)
                )
        return out.logits[:, -1]

    logits = forward(prompt, prompt_extras)
    sampled = _Tokens(b, max_new_tokens, pad_id, stop_id)
    for t in range(max_new_tokens):
        logp = _reference_log_probs(logits, temperature, top_k)
        if temperature == 0:
            nxt = logp.argmax(-1)
        else:
            nxt = (logp + _gumbel(rng, logp.shape)).argmax(-1)
        nxt = sampled.add(t, nxt, logp[np.arange(b), nxt])
        if sampled.finished:
            break
        if t + 1 < max_new_tokens:  # the last sampled token is never run
            logits = forward(paddle.to_tensor(nxt.reshape(b, 1)))
    routing = {i: np.concatenate(r, axis=1) for i, r in routes.items()} if record_routing else None
    return Sample(sampled.tokens, sampled.logprobs, sampled.lengths, routing)
