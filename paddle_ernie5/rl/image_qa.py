"""RL problem family image_qa: questions about coloured-digit images, judged by the label word.

Problems are the (image, question) pairs of the cached encoded digits (data/vision_sources.py): the
digit, its colour and the background colour. Training problems come from the training images and
held-out problems from the held-out images, the split the pretraining mixture uses. The prompt is
the head of the QA document exactly as training packs it, and an answer ends with <eos>:

    <bos> <boi> [merged patches] <eoi> What colour is the digit?   ->   " red" <eos>

Reward 1 when the decoded answer, stripped of surrounding whitespace, is the label word.
"""

from __future__ import annotations

import numpy as np

from ..config import Config, ConfigError
from ..data.multimodal import pack_segments
from ..data.vision_sources import encoded_digits, qa_prompt, questions_of, special_ids
from .problems import Problem
from .prompts import Prompt
from .verifiers import FamilySpec, register_family

KIND = "image"


def label_match(problem: Problem, response: str) -> float:
    """1.0 when the response (its <eos> decodes to nothing) is the label word, up to whitespace."""
    return 1.0 if response.strip() == problem.answer else 0.0


class ImageQAPrompt:
    """<bos> <boi> [patches] <eoi> question (hint); answers end with <eos> as in qa_document."""

    def stop_id(self, tokenizer) -> int:
        return tokenizer.eos_id

    def solution_ids(self, tokenizer, problem: Problem) -> list[int]:
        return tokenizer.encode(problem.solution) + [tokenizer.eos_id]

    def build(self, model_cfg, tokenizer, problem: Problem, hint_ids: list[int]) -> Prompt:
        ids = special_ids(model_cfg.vocab_size, tokenizer)
        question = tokenizer.encode(problem.prompt) + list(hint_ids)
        doc = qa_prompt(
            problem.meta["feats"], question, model_cfg.vision, problem.meta["kind"], ids
        )
        packed = pack_segments([doc], sum(len(s) for s in doc), tokenizer.pad_id)
        return Prompt(packed["input_ids"][0], len(hint_ids), doc)


def problems_of(cfg: Config, split: str, n: int, seed: int) -> list[Problem]:
    """Up to n random (image, question) pairs of the `split` (train | heldout) images."""
    data = encoded_digits(cfg, KIND, split)
    pairs = [(i, q, a) for i in range(len(data)) for q, a in questions_of(KIND, data.labels, i)]
    order = np.random.default_rng([seed, split == "train"]).permutation(len(pairs))[:n]
    return [
        Problem(
            "image_qa",
            q,
            a,
            f" {a}",
            meta={"kind": KIND, "feats": data.feats[i]},
            context=f"{split}/{i}",
        )
        for i, q, a in (pairs[j] for j in order)
    ]


def image_qa_split(cfg: Config, n: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(questions about training images, questions about held-out images)."""
    if KIND not in cfg.model.modalities:
        raise ConfigError(
            f"rl.families has image_qa but model.modalities={list(cfg.model.modalities)} "
            f"lacks {KIND!r}; use a multimodal model (recipes/rl_multimodal_tiny.yaml)"
        )
    return problems_of(cfg, "train", n, seed), problems_of(cfg, "heldout", n, seed)


register_family(
    FamilySpec("image_qa", None, label_match, prompt=ImageQAPrompt(), split=image_qa_split)
)
