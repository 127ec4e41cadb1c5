"""Rollouts: sample a group of responses per query with the KV-cache sampler, score them, and keep
what training needs (rollout log-probs and, for router replay, the experts every MoE layer chose).

Legend: G responses per query, P prompt length (with any hint), N new tokens, K top-k, B rows.

Background rollouts use their own model copies (one per worker thread) loaded from a `PolicySnapshot`
taken when their group was submitted, so training can update the live weights meanwhile.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import paddle

from ..model.generation import generate
from ..model.model import Ernie5Model
from .verifiers import ANSWER_STOP, Problem, get_task, reward


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


@dataclass
class Rollout:
    problem: Problem
    prompt_ids: np.ndarray  # [P] BOS + prompt + hint tokens
    hint_len: int  # hint tokens at the end of prompt_ids (not trained on)
    tokens: np.ndarray  # [G, N] sampled ids (pad after the stop token)
    logprobs: np.ndarray  # [G, N] rollout log-probs
    lengths: np.ndarray  # [G] response tokens up to and including the stop token
    rewards: np.ndarray  # [G]
    routing: dict[int, np.ndarray] | None  # layer -> [G, P + N - 1, K] experts chosen at rollout
    version: int  # policy version that produced it
    hint_fraction: float = 0.0


def stop_id(tokenizer) -> int:
    ids = tokenizer.encode(ANSWER_STOP)
    assert len(ids) == 1, f"the answer terminator {ANSWER_STOP!r} must be one token, got {ids}"
    return ids[0]


def prompt_ids(tokenizer, problem: Problem, hint_fraction: float = 0.0) -> tuple[np.ndarray, int]:
    """(BOS + prompt + first hint tokens of the reference solution, number of hint tokens)."""
    from .hints import hint_length

    sol = tokenizer.encode(problem.solution)
    n_hint = hint_length(hint_fraction, len(sol)) if hint_fraction > 0 else 0
    ids = [tokenizer.bos_id] + tokenizer.encode(problem.prompt) + sol[:n_hint]
    return np.asarray(ids, np.int64), n_hint


def decode_response(tokenizer, hint_ids, tokens, length: int) -> str:
    return tokenizer.decode([int(t) for t in list(hint_ids) + list(tokens[:length])])


def score(tokenizer, problem: Problem, hint_ids, tokens_GN, lengths_G, stopped_G) -> np.ndarray:
    """Rewards of a group; a response cut off by the length limit (no stop token) scores 0."""
    spec = get_task(problem.task)
    out = np.zeros(len(lengths_G), np.float32)
    for i, (toks, n) in enumerate(zip(tokens_GN, lengths_G)):
        if not stopped_G[i]:
            continue
        resp = (decode_response(tokenizer, hint_ids, toks, int(n)) if spec.response_modality == "text"
                else np.concatenate([hint_ids, toks[:n]]))
        out[i] = reward(problem, resp)
    return out


def rollout_group(model, tokenizer, problem: Problem, group_size: int, max_new_tokens: int,
                  temperature: float, seed: int, hint_fraction: float = 0.0, version: int = 0,
                  record_routing: bool = True) -> Rollout:
    """Sample `group_size` responses to one query (one batched KV-cache generate call) and score them."""
    ids, n_hint = prompt_ids(tokenizer, problem, hint_fraction)
    stop = stop_id(tokenizer)
    sample = generate(model, np.tile(ids[None], (group_size, 1)), max_new_tokens, temperature=temperature,
                      stop_id=stop, pad_id=tokenizer.pad_id, seed=seed, record_routing=record_routing)
    stopped = sample.tokens[np.arange(group_size), sample.lengths - 1] == stop
    rewards = score(tokenizer, problem, ids[len(ids) - n_hint:], sample.tokens, sample.lengths, stopped)
    return Rollout(problem, ids, n_hint, sample.tokens, sample.logprobs, sample.lengths, rewards,
                   sample.routing, version, hint_fraction)


# ---------------------------------------------------------------------------------------------------
# Training batches from rollouts


@dataclass
class RolloutBatch:
    """Rows = every response of the given rollouts, right-padded to one length S."""

    input_ids_BS: np.ndarray  # prompt + response[:-1] (exactly the positions the sampler ran)
    start_B: np.ndarray  # prompt length per row: response token j is predicted at start - 1 + j
    targets_BN: np.ndarray  # response tokens
    valid_BN: np.ndarray  # bool, j < length
    rollout_logp_BN: np.ndarray
    replay_BSK: dict[int, np.ndarray] | None  # layer -> expert ids per position (router replay)
    query_B: np.ndarray  # index of the rollout (query) each row belongs to


def build_batch(rollouts: list[Rollout], pad_id: int, top_k: int) -> RolloutBatch:
    rows, starts, targets, logps, valid, query = [], [], [], [], [], []
    n_max = max(r.tokens.shape[1] for r in rollouts)
    for q, r in enumerate(rollouts):
        g, n = r.tokens.shape
        for i in range(g):
            rows.append(np.concatenate([r.prompt_ids, r.tokens[i, :n - 1]]))
            starts.append(len(r.prompt_ids))
            targets.append(np.pad(r.tokens[i], (0, n_max - n), constant_values=pad_id))
            logps.append(np.pad(r.logprobs[i], (0, n_max - n)))
            valid.append(np.arange(n_max) < r.lengths[i])
            query.append(q)
    s = max(len(x) for x in rows)
    input_ids = np.stack([np.pad(x, (0, s - len(x)), constant_values=pad_id) for x in rows])
    replay = None
    if all(r.routing is not None for r in rollouts):
        replay = {}
        for layer in rollouts[0].routing:
            parts = []
            for r in rollouts:
                ids = r.routing[layer]
                fill = np.broadcast_to(np.arange(top_k), (ids.shape[0], s - ids.shape[1], top_k))
                parts.append(np.concatenate([ids, fill], axis=1))  # padding positions: any valid ids
            replay[layer] = np.concatenate(parts, axis=0).astype(np.int64)
    return RolloutBatch(input_ids, np.asarray(starts), np.stack(targets), np.stack(valid),
                        np.stack(logps).astype(np.float32), replay, np.asarray(query))


def model_inputs(input_ids_BS: np.ndarray) -> dict:
    """Causal text-only inputs (each row is one document; None = plain causal attention)."""
    b, s = input_ids_BS.shape
    pos = np.broadcast_to(np.arange(s)[None, None, :], (b, 3, s))
    return {"input_ids": paddle.to_tensor(input_ids_BS, dtype="int64"),
            "token_types": paddle.zeros([b, s], dtype="int64"),
            "positions": paddle.to_tensor(np.ascontiguousarray(pos), dtype="int64"),
            "startend_row_indices": None}


def select(batch: RolloutBatch, rows: np.ndarray) -> RolloutBatch:
    """The rows of a batch (a minibatch of whole query groups)."""
    replay = None if batch.replay_BSK is None else {i: v[rows] for i, v in batch.replay_BSK.items()}
    return RolloutBatch(batch.input_ids_BS[rows], batch.start_B[rows], batch.targets_BN[rows],
                        batch.valid_BN[rows], batch.rollout_logp_BN[rows], replay, batch.query_B[rows])
