"""Verifiable problems and the built-in curriculum: families of questions with difficulty levels.

A `Problem` is what the model is asked, the exact answer a verifier checks and a reference
solution; it carries its family and level. Every built-in text family follows the corpus' answer
format (data/text.py: "Q: ... A: answer."), so a pretrained model already knows how an answer
ends:

    family      level: what is asked                       example prompt -> solution
    arithmetic  0: the pretraining corpus' mix (a +- b to 99, a * b to 12)
                1: a + b, one digit each                  "Q: What is 3 + 4? A:" -> " 7.\\n"
                2: a - b, one digit each, a >= b
                3: a + b - c, one digit each, result >= 0 "Q: What is 3 + 4 - 2? A:" -> " 5.\\n"
                4: a + b, two digits + one digit
                5: a + b, two digits each
                6: a - b, two digits each, a >= b
                7: a + b, two digits each, answer written units digit first
                   "Q: What is 37 + 45, units digit first? A:" -> " 28.\\n" (82)
                8: a + b, three digits each, units digit first
                9: a - b, two digits each, a >= b, units digit first (no leading zeros:
                   53 - 48 = 5 -> " 5.\\n", 93 - 41 = 52 -> " 25.\\n")
    counting    0: the corpus' mix (letters, stars, colour lists)
                L = 1..4: how many stars / how often a colour appears in a list of
                3L - 2 .. 3L items (1-3, 4-6, 7-9, 10-12)
                L = 5..7: how many colours are in a list of 3-5, 6-8, 9-11 distinct words
                (colours and nouns), answered with a running count: every word copied with
                the count so far, then "=" and the total
                "Q: How many colours are in the list pens red cups blue? A:"
                -> " pens 0 red 1 cups 1 blue 2 = 2.\\n"
    sorting     L = 1..4: L + 1 digits in increasing order "Q: Sort 3 1 2. A:" -> " 1 2 3.\\n"
    reversal    L = 1..4: L + 1 letters, reversed          "Q: Reverse c a t. A:" -> " t a c.\\n"
    largest     1: the largest of 3 one-digit numbers      "Q: What is the largest of 3 8 5? A:"
                2, 3, 4: of 2, 3, 5 two-digit numbers

Levels of one family never share a prompt (the operands' ranges, list lengths or wording differ),
so a problem's level is a function of its prompt.

Why the units-first and running-count levels: a held-out problem of levels 1-6 or counting 1-4
needs what training never showed (an unseen one-digit fact; a count the model cannot form in one
token), so RL has nothing to sharpen there. Written units digit first, a sum is a chain of column
facts (digit + digit + carry) that every training pool holds, each digit read from fixed places
of the prompt; a running count is a chain of copy-the-next-word and add-0-or-1 steps. Held-out
problems are new combinations of steps the model has seen, which a policy can partly solve and
RL can make reliable. The verifier checks the final answer only, never the working.

Sorting, reversal and largest are not in the pretraining corpus: the supervised stage (rl/sft.py)
teaches their format.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..data.text import COLOURS, ITEMS, _counting, build_arithmetic_problems

ANSWER_STOP = ".\n"  # the corpus ends every answer line with this piece; text rollouts stop on it


@dataclass(frozen=True)
class Problem:
    family: str
    prompt: str  # text given to the model
    answer: str  # the exact answer the verifier checks
    solution: str  # reference response (SFT target, AHRL hints)
    # judge/prompt inputs (labels, image)
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    context: str = ""  # what the prompt refers to besides its text (an image's id); part of the key
    level: int = 0  # difficulty level within the family (0 = the family's only or corpus level)

    @property
    def task(self) -> str:
        """What results are reported by: the family, or family/L<level> for a curriculum level."""
        return task_name(self.family, self.level)

    @property
    def key(self) -> str:
        head = self.task
        return f"{head}:{self.context}:{self.prompt}" if self.context else f"{head}:{self.prompt}"


def task_name(family: str, level: int) -> str:
    return family if level == 0 else f"{family}/L{level}"


def qa_problem(
    family: str, question: str, answer: str, level: int = 0, working: str = ""
) -> Problem:
    """A corpus-format question: prompt "Q: question A:", solution " answer.\\n", or with worked
    steps " working = answer.\\n"."""
    head = f" {working} =" if working else ""
    return Problem(
        family, f"Q: {question} A:", answer, f"{head} {answer}{ANSWER_STOP}", level=level
    )


# --------------------------------------------------------------------------------------------------
# Level generators: rng -> (question, answer)

QA = tuple[str, str] | tuple[str, str, str]  # (question, answer[, working])


def _digits(rng: np.random.Generator, n: int) -> list[int]:
    return [int(x) for x in rng.integers(0, 10, size=n)]


def _add(lo_a: int, hi_a: int, lo_b: int, hi_b: int) -> Callable[[np.random.Generator], QA]:
    def make(rng):
        a, b = int(rng.integers(lo_a, hi_a + 1)), int(rng.integers(lo_b, hi_b + 1))
        return f"What is {a} + {b}?", str(a + b)

    return make


def _sub(lo: int, hi: int) -> Callable[[np.random.Generator], QA]:
    def make(rng):
        a = int(rng.integers(lo, hi + 1))
        b = int(rng.integers(lo, a + 1))
        return f"What is {a} - {b}?", str(a - b)

    return make


def _add_sub(rng: np.random.Generator) -> QA:
    a, b = _digits(rng, 2)
    c = int(rng.integers(0, a + b + 1)) if a + b < 10 else int(rng.integers(0, 10))
    return f"What is {a} + {b} - {c}?", str(a + b - c)


UNITS_FIRST = "units digit first"
# Arithmetic levels answered units digit first: their answer is a digit string (leading zeros
# count: 50 + 50 -> "001"), judged as text, not as an integer.
UNITS_FIRST_LEVELS = frozenset({7, 8, 9})
# Counting levels answered with a running count: the solution holds worked steps before "=".
RUNNING_COUNT_LEVELS = frozenset({5, 6, 7})
COUNTED = COLOURS  # what a running-count question counts
NOT_COUNTED = ITEMS  # the other words of its lists (all single tokens, like the colours)


def has_working(problem: Problem) -> bool:
    """Whether the reference solution holds worked steps before the answer (a running count)."""
    return problem.family == "counting" and problem.level in RUNNING_COUNT_LEVELS


def _units_first(digits: int, op: str) -> Callable[[np.random.Generator], QA]:
    """a op b with `digits`-digit operands (a >= b for "-"); the answer's digits reversed."""

    def make(rng):
        a = int(rng.integers(10 ** (digits - 1), 10**digits))
        if op == "+":
            b = int(rng.integers(10 ** (digits - 1), 10**digits))
            value = a + b
        else:
            b = int(rng.integers(10 ** (digits - 1), a + 1))
            value = a - b
        return f"What is {a} {op} {b}, {UNITS_FIRST}?", str(value)[::-1]

    return make


def _running_count(lo: int, hi: int) -> Callable[[np.random.Generator], QA]:
    """How many colours are in a list of lo..hi distinct words (colours and nouns, drawn without
    replacement); the working copies each word with the count of colours so far."""
    words = COUNTED + NOT_COUNTED

    def make(rng):
        n = int(rng.integers(lo, hi + 1))
        listed = [words[i] for i in rng.choice(len(words), size=n, replace=False)]
        steps, count = [], 0
        for w in listed:
            count += w in COUNTED
            steps.append(f"{w} {count}")
        question = f"How many colours are in the list {' '.join(listed)}?"
        return question, str(count), " ".join(steps)

    return make


def _count(lo: int, hi: int) -> Callable[[np.random.Generator], QA]:
    """Stars or a colour list of lo..hi items (as the corpus asks them), half each."""

    def make(rng):
        n = int(rng.integers(lo, hi + 1))
        if rng.random() < 0.5:
            return f"How many stars are here: {' '.join('*' * n)}?", str(n)
        listed = [COLOURS[i] for i in rng.integers(0, 4, size=n)]
        target = listed[int(rng.integers(n))]
        return (
            f"In the list {', '.join(listed)}, how many times does {target} appear?",
            str(listed.count(target)),
        )

    return make


def _sort(n: int) -> Callable[[np.random.Generator], QA]:
    def make(rng):
        xs = _digits(rng, n)
        return f"Sort {' '.join(map(str, xs))}.", " ".join(map(str, sorted(xs)))

    return make


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _reverse(n: int) -> Callable[[np.random.Generator], QA]:
    def make(rng):
        xs = [LETTERS[i] for i in rng.integers(0, len(LETTERS), size=n)]
        return f"Reverse {' '.join(xs)}.", " ".join(reversed(xs))

    return make


def _largest(n: int, lo: int, hi: int) -> Callable[[np.random.Generator], QA]:
    def make(rng):
        xs = [int(x) for x in rng.integers(lo, hi + 1, size=n)]
        return f"What is the largest of {' '.join(map(str, xs))}?", str(max(xs))

    return make


_QA_LINE = re.compile(r"Q: (.*) A: (-?\d+)\.")


def _corpus_counting(rng: np.random.Generator) -> QA:
    """Letter, star and list counting questions drawn exactly as the corpus draws them."""
    q, a = _QA_LINE.fullmatch(_counting(rng)).groups()
    return q, a


LEVELS: dict[str, dict[int, Callable[[np.random.Generator], QA]]] = {
    "arithmetic": {
        1: _add(0, 9, 0, 9),
        2: _sub(0, 9),
        3: _add_sub,
        4: _add(10, 99, 0, 9),
        5: _add(10, 99, 10, 99),
        6: _sub(10, 99),
        7: _units_first(2, "+"),
        8: _units_first(3, "+"),
        9: _units_first(2, "-"),
    },
    "counting": {
        0: _corpus_counting,
        **{lv: _count(3 * lv - 2, 3 * lv) for lv in range(1, 5)},
        **{lv: _running_count(3 * (lv - 4), 3 * (lv - 4) + 2) for lv in range(5, 8)},
    },
    "sorting": {lv: _sort(lv + 1) for lv in range(1, 5)},
    "reversal": {lv: _reverse(lv + 1) for lv in range(1, 5)},
    "largest": {
        1: _largest(3, 0, 9),
        2: _largest(2, 10, 99),
        3: _largest(3, 10, 99),
        4: _largest(5, 10, 99),
    },
}


def make_problems(family: str, n: int, seed: int, level: int) -> list[Problem]:
    """n problems (duplicates possible) of a built-in family's level, deterministic in seed."""
    if family == "arithmetic" and level == 0:  # exactly the corpus' own draws
        return [qa_problem(family, q, a) for q, a in build_arithmetic_problems(n, seed)]
    make = LEVELS[family][level]
    # level 0 keeps the seed's own stream: the corpus-mix problems of earlier runs, unchanged
    rng = np.random.default_rng(seed if level == 0 else [seed, level])
    problems = []
    for _ in range(n):
        question, answer, *working = make(rng)
        problems.append(qa_problem(family, question, answer, level, *working))
    return problems


def family_maker(family: str) -> Callable[[int, int, int], list[Problem]]:
    return lambda n, seed, level: make_problems(family, n, seed, level)


def levels_of(family: str) -> tuple[int, ...]:
    """The levels a built-in family defines (arithmetic's level 0 is drawn by data/text.py)."""
    extra = (0,) if family == "arithmetic" else ()
    return tuple(sorted(extra + tuple(LEVELS[family])))
