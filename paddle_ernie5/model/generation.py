"""Autoregressive sampling with a key/value cache.

Legend: B batch (rows decode in lock-step), P prompt length, N new tokens, K/V [B, S, Hk, D].

    prompt_BP --prefill--> logits of the last position, cache holds P positions
    repeat N times: sample token -> forward that one token (cache grows by 1) -> next logits

Each row is one document, so attention needs only the causal mask (bottom-right aligned against
the cache); prompts of one call share a length (RL groups repeat one prompt). A multimodal prompt
(an image and a question, packed as training packs it) brings its own Uni-RoPE positions and
block-bidirectional FlashMask layout for the prefill; the sampled tokens are causal text whose
positions continue from the prompt's last position + 1, not from the row index (an image's
positions follow its extent, not its token count). Per-token log-probabilities of the sampled
tokens are returned with them (RL uses them as rollout log-probs). With `record_routing`, the
experts every MoE layer chose at every position that was run (the prompt and all sampled tokens but
the last) are returned too, for router replay in the RL training forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F

from .view import FULL_VIEW, ElasticView


class LayerCache:
    def __init__(self):
        self.k = None
        self.v = None

    def append(self, k_BSKD, v_BSKD):
        if self.k is not None:
            k_BSKD = paddle.concat([self.k, k_BSKD], axis=1)
            v_BSKD = paddle.concat([self.v, v_BSKD], axis=1)
        self.k, self.v = k_BSKD, v_BSKD
        return k_BSKD, v_BSKD


class KVCache:
    def __init__(self):
        self._layers: dict[int, LayerCache] = {}

    def layer(self, index: int) -> LayerCache:
        return self._layers.setdefault(index, LayerCache())

    def length(self) -> int:
        first = next(iter(self._layers.values()), None)
        return 0 if first is None or first.k is None else first.k.shape[1]


@dataclass
class Sample:
    tokens: np.ndarray  # [B, N] sampled ids (after a row's stop token: pad_id)
    # [B, N] log-prob of each sampled token (temperature-scaled; greedy: T = 1)
    logprobs: np.ndarray
    lengths: np.ndarray  # [B] new tokens up to and including the stop token
    # layer -> [B, P + N - 1, K] expert ids per position run (record_routing=True), else None
    routing: dict[int, np.ndarray] | None = None


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
) -> Sample:
    """Sample continuations of equal-length prompts. temperature 0 = greedy. `prompt_extras`: more
    batch entries for the prompt only (token_types and the codes of a spoken prompt, say; for a
    packed multimodal prompt also positions [B, 3, P], startend_row_indices and mask_causal); the
    sampled tokens are text at positions last prompt position + 1, + 2, ..."""
    model.eval()
    rng = np.random.default_rng(seed)
    prompt = paddle.to_tensor(np.asarray(prompt_BP, dtype=np.int64))
    b, p = prompt.shape
    cache = KVCache()
    routes: dict[int, list[np.ndarray]] = {}
    given = (prompt_extras or {}).get("positions")
    # Decode step i runs at position cache.length() + shift: the prompt's last position + 1 + i.
    shift = 0 if given is None else np.asarray(given)[:, :, -1].max(axis=1) + 1 - p

    def forward(ids_BS, extras=None):
        batch = _text_batch(ids_BS, cache.length() + shift)
        batch.update({k: _tensor(v) for k, v in (extras or {}).items()})
        out = model(batch, view, with_mtp=False, cache=cache)
        if record_routing:
            for i, stats in out.router_stats.items():
                routes.setdefault(i, []).append(
                    stats.topk_ids_TK.numpy().reshape(b, ids_BS.shape[1], -1)
                )
        return out.logits[:, -1]

    logits = forward(prompt, prompt_extras)
    tokens = np.full([b, max_new_tokens], pad_id, dtype=np.int64)
    logprobs = np.zeros([b, max_new_tokens], dtype=np.float32)
    done = np.zeros([b], dtype=bool)
    lengths = np.full([b], max_new_tokens, dtype=np.int64)
    for t in range(max_new_tokens):
        # Log-probs of the distribution sampled from (greedy: the model's own, temperature 1).
        logp = F.log_softmax(logits.astype("float32") / (temperature or 1.0), axis=-1).numpy()
        if top_k > 0:
            kth = np.sort(logp, axis=-1)[:, -top_k][:, None]
            logp = np.where(logp >= kth, logp, -np.inf)
            logp = logp - np.logaddexp.reduce(logp, axis=-1, keepdims=True)
        if temperature == 0:
            nxt = logp.argmax(-1)
        else:
            gumbel = -np.log(-np.log(rng.random(logp.shape) + 1e-20) + 1e-20)
            nxt = (logp + gumbel).argmax(-1)
        nxt = np.where(done, pad_id, nxt)
        tokens[:, t] = nxt
        logprobs[:, t] = np.where(done, 0.0, logp[np.arange(b), nxt])
        if stop_id is not None:
            newly = (~done) & (nxt == stop_id)
            lengths[newly] = t + 1
            done |= newly
            if done.all():
                tokens, logprobs = tokens[:, : t + 1], logprobs[:, : t + 1]
                break
        if t + 1 < max_new_tokens:  # the last sampled token is never run
            logits = forward(paddle.to_tensor(nxt.reshape(b, 1)))
    routing = {i: np.concatenate(r, axis=1) for i, r in routes.items()} if record_routing else None
    return Sample(tokens, logprobs, lengths, routing)
