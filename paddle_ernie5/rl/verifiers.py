"""Verifiable problem families for RL: problems with reference solutions and rule-based rewards.

The unified interface is `reward(problem, response) -> float in [0, 1]`: a family registers how
its problems are made (`make_problems`, or `split` for problems drawn from data with its own
held-out split), how they are shown to the model (`prompt`, rl/prompts.py: the prompt and the token
that ends an answer) and how a response is judged (`verifier`). Text families judge the decoded
response text; a family whose responses are images or speech registers a verifier with
`response_modality` "image" / "audio", which receives the response token ids instead and decodes
and judges them itself. Families of other modules (image_qa: rl/image_qa.py, an image and a
question, answers ending in <eos>) register on first use, so text-only use needs no vision data.

Built-in text families follow the corpus' own format (data/text.py), so a pretrained model already
knows how to answer:  prompt "Q: What is 37 + 45? A:"  ->  response " 82.\\n" (reward 1 for the
exact integer followed by the terminating period, nothing else).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..config import Config
from ..data.text import _counting, build_arithmetic_problems, in_validation
from ..plugins import import_optional
from .problems import Problem
from .prompts import ANSWER_STOP, TEXT_PROMPT, PromptFormat


class Verifier(Protocol):
    def __call__(self, problem: Problem, response) -> float: ...


@dataclass(frozen=True)
class FamilySpec:
    name: str
    # (n, seed) -> problems, deterministic
    make_problems: Callable[[int, int], list[Problem]] | None
    verifier: Verifier
    # "text": the verifier gets the decoded text; otherwise the response token ids
    response_modality: str = "text"
    prompt: PromptFormat = TEXT_PROMPT
    # Families drawn from data with its own train/held-out split (image_qa: the image split) give
    # (cfg, n, seed) -> (training, held-out) problems; None = make_problems split by prompt hash.
    split: Callable[[Config, int, int], tuple[list[Problem], list[Problem]]] | None = None

    def __post_init__(self):
        if (self.make_problems is None) == (self.split is None):
            raise ValueError(
                f"RL problem family {self.name!r}: give exactly one of make_problems and split"
            )


_INTEGER_ANSWER = re.compile(r"\s*(-?\d+)\.\s*")


def exact_integer(problem: Problem, response: str) -> float:
    """1.0 when the response is exactly the answer followed by a period (surrounding space
    allowed)."""
    m = _INTEGER_ANSWER.fullmatch(response)
    return 1.0 if m is not None and int(m.group(1)) == int(problem.answer) else 0.0


def _qa_problem(family: str, question: str, answer: str) -> Problem:
    return Problem(family, f"Q: {question} A:", answer, f" {answer}{ANSWER_STOP}")


def arithmetic_problems(n: int, seed: int) -> list[Problem]:
    return [_qa_problem("arithmetic", q, a) for q, a in build_arithmetic_problems(n, seed)]


_QA_LINE = re.compile(r"Q: (.*) A: (-?\d+)\.")


def counting_problems(n: int, seed: int) -> list[Problem]:
    """Letter, star and list counting questions drawn exactly as the corpus draws them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        q, a = _QA_LINE.fullmatch(_counting(rng)).groups()
        out.append(_qa_problem("counting", q, a))
    return out


FAMILIES: dict[str, FamilySpec] = {}
# Modules that register families on import (their data is loaded only when problems are made).
FAMILY_MODULES = ("paddle_ernie5.rl.image_qa",)


def register_family(spec: FamilySpec) -> None:
    """Add a family; modules that define one (rl/image_qa.py) call this on import."""
    FAMILIES[spec.name] = spec


register_family(FamilySpec("arithmetic", arithmetic_problems, exact_integer))
register_family(FamilySpec("counting", counting_problems, exact_integer))


def get_family(name: str) -> FamilySpec:
    if name not in FAMILIES:
        import_optional(FAMILY_MODULES)
    if name not in FAMILIES:
        raise KeyError(
            f"unknown RL problem family {name!r}; registered: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[name]


def reward(problem: Problem, response) -> float:
    """The unified verifier entry point: (family, prompt, response) -> reward."""
    return float(get_family(problem.family).verifier(problem, response))


def split_problems(
    name: str, n: int, seed: int, heldout_fraction: float, cfg: Config | None = None
) -> tuple[list[Problem], list[Problem]]:
    """(training, held-out) unique problems of a family; a question is held out by a hash of its
    prompt, so the split does not depend on n or seed and no held-out prompt is ever trained on. A
    family with its own `split` (data-backed, needs the run's `cfg`) decides instead."""
    spec = get_family(name)
    if spec.split is not None:
        if cfg is None:
            raise ValueError(
                f"RL problem family {name!r} draws its problems from data: pass the run's config"
            )
        return spec.split(cfg, n, seed)
    seen, train, held = set(), [], []
    for p in spec.make_problems(n, seed):
        if p.key in seen:
            continue
        seen.add(p.key)
        (held if in_validation(p.prompt, heldout_fraction) else train).append(p)
    return train, held
