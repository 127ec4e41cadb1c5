"""Rollouts: sample a group of responses per query with the KV-cache sampler, score them, and keep
what training needs (rollout log-probs and, for router replay, the experts every MoE layer chose).

Legend: G responses per query, P prompt length (with any hint), N new tokens, K top-k, B rows.

The training forward sees every row exactly as the sampler did: text prompts as plain causal text,
a packed prompt (image + question, rl/prompts.py) with its positions, mask and image features, the
response continuing at the prompt's last position + 1.

Background rollouts use their own model copies (one per worker thread) loaded from a
`PolicySnapshot` taken when their group was submitted, so training can update the live weights
meanwhile.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import paddle

from ..data.multimodal import pack_segments
from ..model.generation import generate
from ..model.inputs import to_model_batch
from ..model.model import Ernie5Model
from ..model.view import FULL_VIEW, ElasticView
from .objectives import response_logp_entropy
from .problems import Problem
from .prompts import Prompt
from .verifiers import get_family, reward


@dataclass
class PolicySnapshot:
    version: int  # optimizer steps taken when the snapshot was made
    state: dict  # parameter and buffer name -> numpy array


class RolloutModels:
    """Per-thread model copies that load a snapshot only when its version changes."""

    def __init__(self, model_cfg):
        self.model_cfg = model_cfg
        self._local = threading.local()

    def get(self, snap: PolicySnapshot) -> Ernie5Model:
        model = getattr(self._local, "model", None)
        if model is None:
            model = self._local.model = Ernie5Model(self.model_cfg)
            self._local.version = None
        if self._local.version != snap.version:
            model.set_state_dict({k: paddle.to_tensor(v) for k, v in snap.state.items()})
            self._local.version = snap.version
        return model


def snapshot(model, version: int) -> PolicySnapshot:
    return PolicySnapshot(version, {k: v.numpy().copy() for k, v in model.state_dict().items()})


def perturb_router_bias(snap: PolicySnapshot, std: float, seed: int) -> PolicySnapshot:
    """The snapshot with Gaussian noise of `std` added to every router's selection bias (drawn
    from (seed, version)): a rollout policy that picks other experts, same combine weights."""
    rng = np.random.default_rng([seed, snap.version])
    state = dict(snap.state)
    for name in sorted(state):
        if name.endswith("router.selection_bias"):
            noise = rng.normal(0.0, std, state[name].shape).astype(state[name].dtype)
            state[name] = state[name] + noise
    return PolicySnapshot(snap.version, state)


@dataclass
class Rollout:
    problem: Problem
    prompt: Prompt  # ids [P]: BOS + prompt + hint tokens; hint_len of them are the hint
    tokens: np.ndarray  # [G, N] sampled ids (pad after the stop token)
    logprobs: np.ndarray  # [G, N] rollout log-probs
    lengths: np.ndarray  # [G] response tokens up to and including the stop token
    rewards: np.ndarray  # [G]
    routing: dict[int, np.ndarray] | None  # layer -> [G, P + N - 1, K] experts chosen at rollout
    version: int  # policy version that produced it
    hint_fraction: float = 0.0
    seconds: float = 0.0  # wall time of sampling and scoring the group


def stop_id(tokenizer, problem: Problem) -> int:
    """The token that ends an answer of the problem's family."""
    return get_family(problem.family).prompt.stop_id(tokenizer)


def build_prompt(model_cfg, tokenizer, problem: Problem, hint_fraction: float = 0.0) -> Prompt:
    """The problem's prompt followed by the first hint tokens of its reference solution."""
    from .hints import hint_length

    fmt = get_family(problem.family).prompt
    sol = fmt.solution_ids(tokenizer, problem)
    n_hint = hint_length(hint_fraction, len(sol)) if hint_fraction > 0 else 0
    return fmt.build(model_cfg, tokenizer, problem, sol[:n_hint])


def prompt_arrays(prompts: list[Prompt], pad_id: int) -> tuple[np.ndarray, dict | None]:
    """(ids [B, P], generate's prompt_extras) of equal-length prompts of one layout; extras None
    for text prompts, else the packed arrays (positions, token types, FlashMask layout, image
    features)."""
    ids = np.stack([p.ids for p in prompts])
    if prompts[0].doc is None:
        return ids, None
    packed = pack_segments([p.doc for p in prompts], ids.shape[1], pad_id, one_per_row=True)
    return ids, {k: v for k, v in packed.items() if k not in ("input_ids", "labels")}


def continuation_arrays(
    prompts: list[Prompt], tails: list[np.ndarray], pad_id: int
) -> tuple[np.ndarray, dict | None]:
    """Rows prompt + tail, right-padded to the longest: (ids [B, S], extras). Extras None when every
    prompt is text (plain causal rows, as sampled); else each row packed as one document, a text
    prompt getting the equivalent document mask; model_inputs(ids, extras) is the model batch."""
    rows = [np.concatenate([p.ids, t]).astype(np.int64) for p, t in zip(prompts, tails)]
    s = max(len(r) for r in rows)
    if all(p.doc is None for p in prompts):
        return np.stack([np.pad(r, (0, s - len(r)), constant_values=pad_id) for r in rows]), None
    packed = pack_segments(
        [p.continued(np.asarray(t, np.int64)) for p, t in zip(prompts, tails)],
        s,
        pad_id,
        one_per_row=True,
    )
    return packed.pop("input_ids"), packed


def decode_response(tokenizer, hint_ids, tokens, length: int) -> str | None:
    """The response text, or None when it holds a non-text token (a multimodal model can sample a
    visual or audio delimiter, which no text answer contains)."""
    ids = [int(t) for t in list(hint_ids) + list(tokens[:length])]
    if any(i >= tokenizer.vocab_size for i in ids):
        return None
    return tokenizer.decode(ids)


def score(tokenizer, problem: Problem, hint_ids, tokens_GN, lengths_G, stopped_G) -> np.ndarray:
    """Rewards of a group; a response cut off by the length limit (no stop token) or holding a
    non-text token where text is judged scores 0."""
    spec = get_family(problem.family)
    out = np.zeros(len(lengths_G), np.float32)
    for i, (toks, n) in enumerate(zip(tokens_GN, lengths_G)):
        if not stopped_G[i]:
            continue
        resp = (
            decode_response(tokenizer, hint_ids, toks, int(n))
            if spec.response_modality == "text"
            else np.concatenate([hint_ids, toks[:n]])
        )
        out[i] = 0.0 if resp is None else reward(problem, resp)
    return out


def rollout_group(
    model,
    tokenizer,
    problem: Problem,
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    hint_fraction: float = 0.0,
    version: int = 0,
    record_routing: bool = True,
    view: ElasticView = FULL_VIEW,
) -> Rollout:
    """Sample `group_size` responses to one query (one batched KV-cache generate call) and score
    them; `view` is the rollout's elastic view (rl.rollout_top_k)."""
    t0 = time.perf_counter()
    prompt = build_prompt(model.cfg, tokenizer, problem, hint_fraction)
    stop = stop_id(tokenizer, problem)
    ids, extras = prompt_arrays([prompt] * group_size, tokenizer.pad_id)
    sample = generate(
        model,
        ids,
        max_new_tokens,
        temperature=temperature,
        stop_id=stop,
        pad_id=tokenizer.pad_id,
        seed=seed,
        record_routing=record_routing,
        prompt_extras=extras,
        view=view,
    )
    stopped = sample.tokens[np.arange(group_size), sample.lengths - 1] == stop
    hint = prompt.ids[len(prompt.ids) - prompt.hint_len :]
    rewards = score(tokenizer, problem, hint, sample.tokens, sample.lengths, stopped)
    return Rollout(
        problem,
        prompt,
        sample.tokens,
        sample.logprobs,
        sample.lengths,
        rewards,
        sample.routing,
        version,
        hint_fraction,
        time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------------------------------
# Training batches from rollouts


@dataclass
class RolloutBatch:
    """Rows = every response of the given rollouts, right-padded to one length S."""

    input_ids_BS: np.ndarray  # prompt + response[:-1] (exactly the positions the sampler ran)
    # the rows' other model arrays when a prompt is packed (continuation_arrays)
    extras_BS: dict | None
    start_B: np.ndarray  # prompt length per row: response token j is predicted at start - 1 + j
    targets_BN: np.ndarray  # response tokens
    valid_BN: np.ndarray  # bool, j < length
    rollout_logp_BN: np.ndarray
    replay_BSK: dict[int, np.ndarray] | None  # layer -> expert ids per position (router replay)
    query_B: np.ndarray  # index of the rollout (query) each row belongs to


def build_batch(rollouts: list[Rollout], pad_id: int) -> RolloutBatch:
    prompts, tails, starts, targets, logps, valid, query = [], [], [], [], [], [], []
    n_max = max(r.tokens.shape[1] for r in rollouts)
    for q, r in enumerate(rollouts):
        g, n = r.tokens.shape
        for i in range(g):
            prompts.append(r.prompt)
            tails.append(r.tokens[i, : n - 1])
            starts.append(len(r.prompt.ids))
            targets.append(np.pad(r.tokens[i], (0, n_max - n), constant_values=pad_id))
            logps.append(np.pad(r.logprobs[i], (0, n_max - n)))
            valid.append(np.arange(n_max) < r.lengths[i])
            query.append(q)
    input_ids, extras = continuation_arrays(prompts, tails, pad_id)
    s = input_ids.shape[1]
    replay = None
    if all(r.routing is not None for r in rollouts):
        replay = {}
        for layer in rollouts[0].routing:
            parts = []
            for r in rollouts:
                ids = r.routing[layer]
                k = ids.shape[
                    -1
                ]  # the rollout's top-k (rl.rollout_top_k may differ from the model's)
                fill = np.broadcast_to(np.arange(k), (ids.shape[0], s - ids.shape[1], k))
                # padding positions: any valid ids
                parts.append(np.concatenate([ids, fill], axis=1))
            replay[layer] = np.concatenate(parts, axis=0).astype(np.int64)
    return RolloutBatch(
        input_ids,
        extras,
        np.asarray(starts),
        np.stack(targets),
        np.stack(valid),
        np.stack(logps).astype(np.float32),
        replay,
        np.asarray(query),
    )


def model_inputs(input_ids_BS: np.ndarray, extras: dict | None = None) -> dict:
    """Model batch of rows: causal text-only (each row is one document; None = plain causal
    attention), or with `extras` (continuation_arrays) the packed documents."""
    if extras is not None:
        return to_model_batch({**extras, "input_ids": input_ids_BS})
    b, s = input_ids_BS.shape
    pos = np.broadcast_to(np.arange(s)[None, None, :], (b, 3, s))
    return {
        "input_ids": paddle.to_tensor(input_ids_BS, dtype="int64"),
        "token_types": paddle.zeros([b, s], dtype="int64"),
        "positions": paddle.to_tensor(np.ascontiguousarray(pos), dtype="int64"),
        "startend_row_indices": None,
    }


def forward_logp(model, batch: RolloutBatch, temperature: float, replay: bool):
    """(response log-probs [B, N], entropies [B, N], model output) of the training forward, with
    the rollout's experts forced when `replay` (router replay) and the batch recorded them."""
    forced = None
    if replay and batch.replay_BSK is not None:
        forced = {i: paddle.to_tensor(ids) for i, ids in batch.replay_BSK.items()}
    out = model(
        model_inputs(batch.input_ids_BS, batch.extras_BS), with_mtp=False, router_replay=forced
    )
    logp, ent = response_logp_entropy(out.logits, batch.targets_BN, batch.start_B, temperature)
    return logp, ent, out


def select(batch: RolloutBatch, rows: np.ndarray) -> RolloutBatch:
    """The rows of a batch (a minibatch of whole query groups)."""
    replay = None if batch.replay_BSK is None else {i: v[rows] for i, v in batch.replay_BSK.items()}
    extras = (
        None
        if batch.extras_BS is None
        else {k: v[rows] if isinstance(v, np.ndarray) else v for k, v in batch.extras_BS.items()}
    )
    return RolloutBatch(
        batch.input_ids_BS[rows],
        extras,
        batch.start_B[rows],
        batch.targets_BN[rows],
        batch.valid_BN[rows],
        batch.rollout_logp_BN[rows],
        replay,
        batch.query_B[rows],
    )
