"""The evaluation suite: metrics of one model (optionally in an elastic view) on held-out data.

Text: next-token cross-entropy and perplexity on the validation split, beside the unigram baseline.
Decode speed: greedy tokens/s with the KV cache. Speech (ASR word accuracy, TTS intelligibility)
and vision (image QA, judged text -> image, video direction QA), each beside chance, are in
eval/audio.py and eval/vision_eval.py, long-context passkey retrieval and long-text perplexity (for
runs that train the passkey source) in eval/long_context.py; eval/runner.py puts all of them in one
table.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import paddle

from ..data.loader import eval_batches, text_data_for, unigram_baseline
from ..model.generation import generate
from ..model.inputs import to_model_batch
from ..model.losses import compute_loss
from ..model.view import FULL_VIEW, ElasticView


class TextEval:
    """Validation batches prepared once, reused for every model and view."""

    def __init__(self, cfg, max_batches: int = 0):
        tok, loader, val = text_data_for(cfg)
        self.tokenizer = tok
        batches = eval_batches(val, cfg.train.batch_size)
        self.batches = [
            to_model_batch(b)
            for b in (itertools.islice(batches, max_batches) if max_batches else batches)
        ]
        self.unigram = unigram_baseline(loader.docs_ids_fn(0), val["labels"], cfg.model.vocab_size)
        self.prompts = val["input_ids"][:, :16]

    @paddle.no_grad()
    def loss(self, model, view: ElasticView = FULL_VIEW) -> float:
        model.eval()
        total = count = 0.0
        for batch in self.batches:
            parts = compute_loss(model(batch, view, with_mtp=False), batch["labels"], model.cfg)
            c = float(parts.num_targets)
            total, count = total + float(parts.text) * c, count + c
        return total / max(count, 1.0)

    def decode_tokens_per_s(
        self,
        model,
        view: ElasticView = FULL_VIEW,
        new_tokens: int = 48,
        batch: int = 1,
        repeats: int = 3,
    ) -> float:
        prompt = self.prompts[:batch]
        generate(model, prompt, 4, temperature=0.0, view=view)  # warm-up
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            generate(model, prompt, new_tokens, temperature=0.0, view=view)
            best = min(best, time.perf_counter() - t0)
        return batch * new_tokens / best


def text_metrics(ev: TextEval, model, view: ElasticView = FULL_VIEW, speed: bool = True) -> dict:
    loss = ev.loss(model, view)
    out = {
        "text/loss": loss,
        "text/ppl": math.exp(min(loss, 50)),
        "text/unigram_ppl": math.exp(min(ev.unigram, 50)),
    }
    if speed:
        out["decode/tokens_per_s"] = ev.decode_tokens_per_s(model, view)
    return out


def score(metrics: dict, unigram: float) -> float:
    """A single 0-100 score for a row: how much of the gap from the unigram baseline to a perfect
    model (loss 0) is closed, in nats."""
    return float(np.clip(100.0 * (1.0 - metrics["text/loss"] / unigram), 0.0, 100.0))
