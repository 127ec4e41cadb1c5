"""Long-context evaluation: passkey retrieval accuracy and perplexity of long held-out text
(data/long_context.py), with full attention, RRAttention block-sparse prefill and NACL eviction.

Retrieval (teacher-forced): one forward over the prompt and the key's first KEY_CHARS - 1
characters; the key is retrieved when the argmax at each of the KEY_CHARS answer positions is that
character, which is exactly when greedy decoding writes the whole key. `exact` is the share of
keys retrieved whole (chance 10^-4), `chars` the share of characters right (chance 0.1).

Retrieval with a KV budget (NACL and the baselines, `generate` settings): greedy generation of
KEY_CHARS tokens after a prefill that ends with the eviction, as `ernie5 generate` runs it.

Perplexity: the exp of the mean next-token loss of one long window of held-out text.

The forward runs in eval mode without gradients, so a model whose attention has
`sparse_prefill: rr` computes only the blocks RRAttention selects (model/attention.py);
`with_attention` rebuilds a model with other attention settings and the same weights, and
`selection_stats` sums the layers' selections of the last forward.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import paddle

from ..config import GenerateConfig
from ..data.long_context import (
    KEY_CHARS,
    PasskeyFormat,
    filler_text,
    long_text,
    passkey_examples,
)
from ..model.generation import generate
from ..model.kv_eviction import kept_count
from ..model.losses import compute_loss
from ..model.model import Ernie5Model

# `ernie5 eval` of a run whose recipe trains the passkey source: these lengths, this many keys.
EVAL_LENGTHS = (1024, 4096, 8192)
EVAL_SAMPLES = 8
EVAL_SEED = 0


class LongContextEval:
    """Held-out examples and text of the validation split, built once per tokenizer."""

    def __init__(self, cfg, tokenizer, seed: int = EVAL_SEED):
        dc = cfg.data
        self.tokenizer = tokenizer
        self.fmt = PasskeyFormat(tokenizer)
        self.filler = filler_text(tokenizer, "val", dc.split_seed, dc.val_fraction)
        self.seed = seed

    def examples(self, length: int, n: int):
        return passkey_examples(self.fmt, self.filler, length, n, self.seed)

    def text(self, length: int, window: int = 0) -> np.ndarray:
        """Held-out text of `length` tokens; `window` picks another seeded start."""
        return long_text(self.tokenizer, self.filler, length, self.seed + window)


def _causal_batch(ids: np.ndarray, labels: np.ndarray | None = None) -> dict:
    s = len(ids)
    pos = np.broadcast_to(np.arange(s, dtype=np.int64), (1, 3, s))
    batch = {
        "input_ids": paddle.to_tensor(ids[None].astype(np.int64)),
        "token_types": paddle.zeros([1, s], dtype="int64"),
        "positions": paddle.to_tensor(np.ascontiguousarray(pos)),
        "startend_row_indices": None,
        "mask_causal": True,
    }
    if labels is not None:
        batch["labels"] = paddle.to_tensor(labels[None].astype(np.int64))
    return batch


@paddle.no_grad()
def prefill_answers(model, example) -> tuple[np.ndarray, float]:
    """(argmax tokens at the KEY_CHARS answer positions, forward seconds)."""
    model.eval()
    at = example.answer_at
    ids = example.ids[: at + KEY_CHARS - 1]
    t0 = time.perf_counter()
    out = model(_causal_batch(ids), with_mtp=False)
    h = out.hidden[:, at - 1 : at - 1 + KEY_CHARS]
    seconds = time.perf_counter() - t0
    return model.text_head(h).argmax(axis=-1).numpy()[0], seconds


def selection_stats(model) -> dict:
    """RRAttention of the last forward, summed over the layers: blocks kept and allowed, seconds
    spent selecting (zeros when every layer ran dense)."""
    kept = total = 0
    seconds = 0.0
    for block in model.blocks:
        sel = block.attn.last_selection
        if sel is not None:
            kept, total, seconds = (
                kept + sel.blocks_kept,
                total + sel.blocks_total,
                seconds + (sel.seconds),
            )
    return {"blocks_kept": kept, "blocks_total": total, "select_s": seconds}


def _causal_blocks(s: int, b: int = 128) -> int:
    """128 x 128 blocks of a causal S x S attention (what a dense prefill computes per head)."""
    n = -(-s // b)
    return n * (n + 1) // 2


def passkey_scores(model, examples) -> dict:
    """exact / chars accuracy (teacher-forced) with the mean forward seconds and the share of
    attention blocks computed (1 for a dense model)."""
    exact = chars = 0
    seconds, select_s, kept, total = [], 0.0, 0, 0
    for ex in examples:
        pred, sec = prefill_answers(model, ex)
        right = pred == ex.answer
        exact += int(right.all())
        chars += int(right.sum())
        seconds.append(sec)
        st = selection_stats(model)
        select_s += st["select_s"]
        kept += st["blocks_kept"]
        total += st["blocks_total"]
    n = max(len(examples), 1)
    return {
        "exact": exact / n,
        "chars": chars / (n * KEY_CHARS),
        "prefill_s": float(np.median(seconds)) if seconds else 0.0,
        "select_s": select_s / n,
        "density": kept / total if total else 1.0,
    }


@paddle.no_grad()
def perplexity(model, ids: np.ndarray) -> float:
    """exp(mean next-token loss) of one causal window."""
    model.eval()
    labels = np.concatenate([ids[1:], [-100]])
    out = model(_causal_batch(ids), with_mtp=False)
    loss = float(compute_loss(out, paddle.to_tensor(labels[None]), model.cfg).text)
    return math.exp(min(loss, 50.0))


def pooled_perplexity(model, windows) -> float:
    """Perplexity of all tokens of equal-length windows together (exp of their mean loss)."""
    lengths = {len(w) for w in windows}
    if len(lengths) != 1:
        raise ValueError(f"windows of different lengths {sorted(lengths)}: pool equal ones")
    return math.exp(sum(math.log(perplexity(model, w)) for w in windows) / len(windows))


def generated_scores(model, examples, settings: GenerateConfig, speed_tokens: int = 0) -> dict:
    """exact / chars accuracy of greedy generation after the prefill's eviction; with
    `speed_tokens`, also `decode_tokens_per_s` on the first example."""
    exact = chars = 0
    for ex in examples:
        out = generate(model, ex.prompt[None], KEY_CHARS, temperature=0.0, eviction=settings)
        right = out.tokens[0, :KEY_CHARS] == ex.answer
        exact += int(right.all())
        chars += int(right.sum())
    n = max(len(examples), 1)
    res = {"exact": exact / n, "chars": chars / (n * KEY_CHARS)}
    if speed_tokens and examples:
        res["decode_tok_s"] = decode_tokens_per_s(model, examples[0].prompt, settings, speed_tokens)
    return res


def decode_tokens_per_s(model, prompt: np.ndarray, settings: GenerateConfig, steps: int) -> float:
    """Greedy decode speed after the prefill's eviction, steady state: `steps` decode steps after
    the first two tokens, each step's model forward timed (forward hooks). The prefill and the first
    decode step are left out: a cache that evicted nothing moves its keys into the decode layout in
    that step (model/generation.py StaticLayerCache), one that evicted did it in the prefill."""
    calls = []
    pre = model.register_forward_pre_hook(lambda *_: calls.append([time.perf_counter()]))
    post = model.register_forward_post_hook(lambda *_: calls[-1].append(time.perf_counter()))
    try:
        generate(model, prompt[None], 2 + steps, temperature=0.0, eviction=settings)
    finally:
        pre.remove()
        post.remove()
    decode = sum(t1 - t0 for t0, t1 in calls[2:])  # calls[0] the prefill, [1] the first step
    return (len(calls) - 2) / max(decode, 1e-9)


def kv_cache_bytes(model_cfg, prompt: int, budget: float, new_tokens: int = 0) -> int:
    """Keys and values held after the prefill's eviction (float32), over all layers."""
    att = model_cfg.attention
    keys = kept_count(budget, prompt) + new_tokens
    return model_cfg.num_layers * 2 * att.num_kv_heads * att.head_dim * 4 * keys


def with_attention(model, **changes):
    """A copy of `model` (same weights, eval mode) whose attention config has `changes`."""
    cfg = model.cfg
    new_cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, **changes))
    other = Ernie5Model(new_cfg)
    other.set_state_dict(model.state_dict())
    other.eval()
    return other


def long_context_metrics(
    cfg, model, tokenizer, lengths=EVAL_LENGTHS, samples: int = EVAL_SAMPLES, log=print
) -> dict:
    """Retrieval accuracy and perplexity at each length (the model's own attention settings)."""
    ev = LongContextEval(cfg, tokenizer)
    out = {}
    for length in lengths:
        s = passkey_scores(model, ev.examples(length, samples))
        out[f"long/{length}/exact"] = s["exact"]
        out[f"long/{length}/chars"] = s["chars"]
        out[f"long/{length}/ppl"] = perplexity(model, ev.text(length))
        log(f"long context {length}: passkey {s['exact']:.3f}, ppl {out[f'long/{length}/ppl']:.2f}")
    return out


def report_rows(metrics: dict) -> str:
    """Rows of `ernie5 eval`'s table for the metrics above."""
    rows = ""
    lengths = sorted({int(k.split("/")[1]) for k in metrics if k.startswith("long/")})
    for length in lengths:
        m = {k.split("/")[2]: v for k, v in metrics.items() if k.startswith(f"long/{length}/")}
        rows += (
            f"| passkey retrieval at {length} tokens (whole key; characters) | {m['exact']:.3f}; "
            f"{m['chars']:.3f} | chance 0.0001; 0.1 |\n"
            f"| perplexity of held-out text, {length} tokens | {m['ppl']:.2f} | |\n"
        )
    return rows
