"""Verifiable problem families for RL: problems with reference solutions and rule-based rewards.

The unified interface is `reward(problem, response) -> float in [0, 1]`: a family registers how
its problems are made (`make_problems(n, seed, level)` for each of its `levels`, or `split` for
problems drawn from data with its own held-out split), how they are shown to the model (`prompt`,
rl/prompts.py: the prompt and the token that ends an answer) and how a response is judged
(`verifier`). Text families judge the decoded response text; a family whose responses are images or
speech registers a verifier with `response_modality` "image" / "audio", which receives the response
token ids instead and decodes and judges them itself. Families of other modules (image_qa:
rl/image_qa.py, an image and a question, answers ending in <eos>) register on first use, so
text-only use needs no vision data.

Built-in text families (rl/problems.py, with their levels) follow the corpus' own format
(data/text.py), so a pretrained model already knows how to answer:  prompt "Q: What is 37 + 45? A:"
->  response " 82.\\n" (reward 1 for the exact integer followed by the terminating period, nothing
else); sorting and reversal answer a list, " 1 2 3.\\n" (reward 1 for exactly the expected items,
separated by whitespace, then the period). Arithmetic levels answered units digit first judge the
digit string exactly (" 001.\\n" for 100; " 1.\\n" scores 0), and counting levels with a running
count judge the total after the last "=" (" pens 0 red 1 = 1.\\n"; the working is not graded).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..config import Config
from ..data.text import in_validation
from ..plugins import import_optional
from .problems import (
    RUNNING_COUNT_LEVELS,
    UNITS_FIRST_LEVELS,
    Problem,
    family_maker,
    levels_of,
    make_problems,
)
from .prompts import TEXT_PROMPT, PromptFormat


class Verifier(Protocol):
    def __call__(self, problem: Problem, response) -> float: ...


@dataclass(frozen=True)
class FamilySpec:
    name: str
    # (n, seed, level) -> problems of that level, deterministic
    make_problems: Callable[[int, int, int], list[Problem]] | None
    verifier: Verifier
    # "text": the verifier gets the decoded text; otherwise the response token ids
    response_modality: str = "text"
    prompt: PromptFormat = TEXT_PROMPT
    # Families drawn from data with its own train/held-out split (image_qa: the image split) give
    # (cfg, n, seed) -> (training, held-out) problems; None = make_problems split by prompt hash.
    split: Callable[[Config, int, int], tuple[list[Problem], list[Problem]]] | None = None
    levels: tuple[int, ...] = (0,)  # the difficulty levels make_problems knows
    default_levels: tuple[int, ...] | None = None  # drawn when the config names none; None = all

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


_SEQUENCE_ANSWER = re.compile(r"\s*(.*?)\.\s*", re.DOTALL)


def exact_sequence(problem: Problem, response: str) -> float:
    """1.0 when the response lists exactly the answer's items (whitespace-separated, any amount of
    whitespace) followed by a period; "1,2,3." or "1 2 3" (no period) score 0."""
    m = _SEQUENCE_ANSWER.fullmatch(response)
    return 1.0 if m is not None and m.group(1).split() == problem.answer.split() else 0.0


_DIGITS_ANSWER = re.compile(r"\s*(\d+)\.\s*")


def exact_digits(problem: Problem, response: str) -> float:
    """1.0 when the response is exactly the answer's digit string followed by a period (leading
    zeros are part of it: a units-first answer "001" is not "1")."""
    m = _DIGITS_ANSWER.fullmatch(response)
    return 1.0 if m is not None and m.group(1) == problem.answer else 0.0


_RUNNING_COUNT = re.compile(r"\s*(.*?)\s*=\s*(\d+)\.\s*", re.DOTALL)
_STEP = re.compile(r"(\S+) (\d+)")


def parse_running_count(response: str) -> tuple[list[tuple[str, int]], int] | None:
    """(steps, total) of a running-count response " pens 0 red 1 = 1.\\n": each step a word and
    the count after it (words not in "word count" pairs are dropped), total the integer after the
    last "="; None when there is no "= total." ending."""
    m = _RUNNING_COUNT.fullmatch(response)
    if m is None:
        return None
    steps = [(w, int(c)) for w, c in _STEP.findall(m.group(1))]
    return steps, int(m.group(2))


def exact_running_count(problem: Problem, response: str) -> float:
    """1.0 when the response ends "= answer." (the worked steps before "=" are not graded)."""
    parsed = parse_running_count(response)
    return 1.0 if parsed is not None and parsed[1] == int(problem.answer) else 0.0


def arithmetic_answer(problem: Problem, response: str) -> float:
    """exact_digits at the units-first levels, exact_integer at the others."""
    judge = exact_digits if problem.level in UNITS_FIRST_LEVELS else exact_integer
    return judge(problem, response)


def counting_answer(problem: Problem, response: str) -> float:
    """exact_running_count at the running-count levels, exact_integer at the others."""
    judge = exact_running_count if problem.level in RUNNING_COUNT_LEVELS else exact_integer
    return judge(problem, response)


def arithmetic_problems(n: int, seed: int, level: int = 0) -> list[Problem]:
    return make_problems("arithmetic", n, seed, level)


def counting_problems(n: int, seed: int, level: int = 0) -> list[Problem]:
    """Level 0: letter, star and list counting questions drawn exactly as the corpus draws them."""
    return make_problems("counting", n, seed, level)


FAMILIES: dict[str, FamilySpec] = {}
# Modules that register families on import (their data is loaded only when problems are made).
FAMILY_MODULES = ("paddle_ernie5.rl.image_qa",)


def register_family(spec: FamilySpec) -> None:
    """Add a family; modules that define one (rl/image_qa.py) call this on import."""
    FAMILIES[spec.name] = spec


for _name, _judge in (
    ("arithmetic", arithmetic_answer),
    ("counting", counting_answer),
    ("sorting", exact_sequence),
    ("reversal", exact_sequence),
    ("largest", exact_integer),
):
    register_family(
        FamilySpec(
            _name,
            family_maker(_name),
            _judge,
            levels=levels_of(_name),
            default_levels=(0,) if 0 in levels_of(_name) else None,
        )
    )


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
    name: str,
    n: int,
    seed: int,
    heldout_fraction: float,
    cfg: Config | None = None,
    level: int = 0,
) -> tuple[list[Problem], list[Problem]]:
    """(training, held-out) unique problems of a family's level; a question is held out by a hash
    of its prompt, so the split does not depend on n, seed or level and no held-out prompt is ever
    trained on. A family with its own `split` (data-backed, needs the run's `cfg`) decides
    instead."""
    spec = get_family(name)
    if level not in spec.levels:
        raise KeyError(
            f"RL problem family {name!r} has no level {level}; its levels: "
            f"{', '.join(map(str, spec.levels))}"
        )
    if spec.split is not None:
        if cfg is None:
            raise ValueError(
                f"RL problem family {name!r} draws its problems from data: pass the run's config"
            )
        return spec.split(cfg, n, seed)
    seen, train, held = set(), [], []
    for p in spec.make_problems(n, seed, level):
        if p.key in seen:
            continue
        seen.add(p.key)
        (held if in_validation(p.prompt, heldout_fraction) else train).append(p)
    return train, held
