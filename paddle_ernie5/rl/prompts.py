"""How a family's problem becomes the model's prompt, and how a response continues it.

A family's `PromptFormat` (verifiers.FamilySpec.prompt) names the token that ends an answer, the
reference solution's tokens and builds a `Prompt`: token ids and, when the prompt is not plain
causal text, the document segments training packs it as (data/multimodal.py), e.g. for image QA

    <bos> <boi> [merged patches] <eoi> question
    (patches: one bidirectional block, 3-D positions)

A response is text continuing the prompt: its positions follow the prompt's last position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..data.multimodal import Segment, text_segment
from .problems import ANSWER_STOP, Problem


@dataclass
class Prompt:
    ids: np.ndarray  # [P] token ids, hint included (pad at non-text positions)
    hint_len: int  # hint tokens at the end of ids (not trained on)
    doc: list[Segment] | None = None  # the packed prompt document; None = plain causal text

    def continued(self, tail_ids: np.ndarray) -> list[Segment]:
        """The prompt document followed by text `tail_ids` (a response) at the next positions."""
        if self.doc is None:
            return [text_segment(np.concatenate([self.ids, tail_ids]))]
        if len(tail_ids) == 0:
            return list(self.doc)
        last = int(self.doc[-1].positions[:, -1].max())
        return [*self.doc, text_segment(tail_ids, last + 1)]


class PromptFormat(Protocol):
    def stop_id(self, tokenizer) -> int:
        """The token that ends a response (rollouts stop on it; a response without it scores 0)."""

    def solution_ids(self, tokenizer, problem: Problem) -> list[int]:
        """The reference response's tokens, stop token included (SFT targets, AHRL hints)."""

    def build(self, model_cfg, tokenizer, problem: Problem, hint_ids: list[int]) -> Prompt:
        """The prompt of `problem` followed by `hint_ids`."""


class TextPrompt:
    """<bos> prompt text; answers end with ANSWER_STOP, as in the text corpus."""

    def stop_id(self, tokenizer) -> int:
        ids = tokenizer.encode(ANSWER_STOP)
        assert len(ids) == 1, f"the answer terminator {ANSWER_STOP!r} must be one token, got {ids}"
        return ids[0]

    def solution_ids(self, tokenizer, problem: Problem) -> list[int]:
        return tokenizer.encode(problem.solution)

    def build(self, model_cfg, tokenizer, problem: Problem, hint_ids: list[int]) -> Prompt:
        ids = [tokenizer.bos_id] + tokenizer.encode(problem.prompt) + list(hint_ids)
        return Prompt(np.asarray(ids, np.int64), len(hint_ids))


TEXT_PROMPT = TextPrompt()
