"""The units-first arithmetic levels (7-9) and the running-count counting levels (5-7): operands
and list lengths as documented, held-out prompts never trained on, the working of every reference
solution correct step by step, verifiers exact, and a response budget too short for the working
refused."""

import re

import pytest

from paddle_ernie5 import config as C
from paddle_ernie5.data.text import COLOURS, ITEMS
from paddle_ernie5.rl import problems as P
from paddle_ernie5.rl import verifiers as V
from paddle_ernie5.rl.curriculum import build_curriculum, check_response_budget


@pytest.mark.parametrize(("level", "digits", "op"), [(7, 2, "+"), (8, 3, "+"), (9, 2, "-")])
def test_units_first_levels(level, digits, op):
    problems = V.arithmetic_problems(500, 3, level)
    for p in problems:
        a, got_op, b = re.fullmatch(
            r"Q: What is (\d+) ([-+]) (\d+), units digit first\? A:", p.prompt
        ).groups()
        assert got_op == op and len(a) == len(b) == digits, p.prompt
        value = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert value >= 0
        assert p.answer == str(value)[::-1] and p.solution == f" {p.answer}.\n"
    if op == "+":  # a carry out of the top column appears, and its answer ends in "1"
        assert any(len(p.answer) == digits + 1 and p.answer.endswith("1") for p in problems)
    else:  # a one-digit difference is written without a leading zero
        assert any(len(p.answer) == 1 for p in problems)


def test_units_first_verifier_judges_the_digit_string():
    p = P.qa_problem("arithmetic", "What is 50 + 50, units digit first?", "001", level=7)
    for good in [" 001.\n", "001.", " 001. "]:
        assert V.reward(p, good) == 1.0, good
    # "1" and "100" are the same integer as "001" or the sum, but not the units-first digits
    for bad in [" 1.\n", " 100.\n", " 0 0 1.\n", " 001\n", " 001.1.\n", ""]:
        assert V.reward(p, bad) == 0.0, bad
    # the other levels keep comparing integers
    p1 = P.qa_problem("arithmetic", "What is 3 + 4?", "7", level=1)
    assert V.reward(p1, " 07.\n") == 1.0 and V.reward(p1, " 70.\n") == 0.0


@pytest.mark.parametrize(("level", "lo", "hi"), [(5, 3, 5), (6, 6, 8), (7, 9, 11)])
def test_running_count_levels_and_their_working(level, lo, hi):
    lengths = set()
    for p in V.counting_problems(400, 5, level):
        listed = (
            re.fullmatch(r"Q: How many colours are in the list ([a-z ]+)\? A:", p.prompt)
            .group(1)
            .split()
        )
        lengths.add(len(listed))
        assert len(set(listed)) == len(listed) and set(listed) <= set(COLOURS + ITEMS)
        steps, total = V.parse_running_count(p.solution)
        # every word copied in order, each with the number of colours up to and including it
        assert [w for w, _ in steps] == listed
        assert [c for _, c in steps] == [
            sum(w in COLOURS for w in listed[: i + 1]) for i in range(len(listed))
        ]
        assert total == steps[-1][1] == int(p.answer)
    assert lengths == set(range(lo, hi + 1))


def test_running_count_parser_and_verifier():
    question = "How many colours are in the list pens red?"
    p = P.qa_problem("counting", question, "1", 5, "pens 0 red 1")
    assert p.solution == " pens 0 red 1 = 1.\n"
    assert V.parse_running_count(p.solution) == ([("pens", 0), ("red", 1)], 1)
    assert V.parse_running_count(" = 4.\n") == ([], 4)
    assert V.parse_running_count(" pens 0 red 1 = 1\n") is None  # no terminating period
    assert V.parse_running_count(" 1.\n") is None  # no "="
    # the total after the last "=" decides; the working is not graded
    for good in [p.solution, " = 1.\n", " pens 7 red 9 = 1.\n", "pens 0 red 1=1."]:
        assert V.reward(p, good) == 1.0, good
    for bad in [" pens 0 red 1 = 2.\n", " 1.\n", " pens 0 red 1 = 1\n", " red 1 = 1. 1", ""]:
        assert V.reward(p, bad) == 0.0, bad
    # counting levels 1-4 keep the plain integer answer
    p2 = P.qa_problem("counting", "How many stars are here: * *?", "2", level=1)
    assert V.reward(p2, " 2.\n") == 1.0 and V.reward(p2, " = 2.\n") == 0.0


def _cfg(*overrides):
    return C.load_config(
        "recipes/debug.yaml",
        [
            "rl.families=[arithmetic,counting]",
            "rl.curriculum.arithmetic.levels=[7,8,9]",
            "rl.curriculum.counting.levels=[5,6,7]",
            "rl.train_problems=800",
            "rl.eval_problems=40",
            *overrides,
        ],
    )


def test_worked_levels_split_is_disjoint():
    cur = build_curriculum(_cfg())
    assert cur.tasks == [f"arithmetic/L{lv}" for lv in (7, 8, 9)] + [
        f"counting/L{lv}" for lv in (5, 6, 7)
    ]
    for task in cur.tasks:
        train = {p.prompt for p in cur.train[task]}
        held = {p.prompt for p in cur.heldout[task]}
        assert train and held and not train & held, task
    # held-out sums are new combinations of column facts the training pool holds
    facts = set()
    for p in cur.train["arithmetic/L7"]:
        a, b = re.findall(r"\d+", p.prompt)
        facts |= {(a[1], b[1]), (a[0], b[0])}
    for p in cur.heldout["arithmetic/L7"]:
        a, b = re.findall(r"\d+", p.prompt)
        assert {(a[1], b[1]), (a[0], b[0])} <= facts


class _CharTokenizer:
    """One token per character: enough to measure reference lengths."""

    def encode(self, text):
        return [ord(c) for c in text]


def test_response_budget_too_short_for_the_working_is_refused():
    cfg = _cfg()
    cur = build_curriculum(cfg)
    longest = max(len(p.solution) for t in ("counting/L7",) for p in cur.train[t] + cur.heldout[t])
    check_response_budget(cur, _CharTokenizer(), longest)  # fits exactly
    with pytest.raises(C.ConfigError, match=r"rl.max_new_tokens=.*'counting/L7'.*raise it"):
        check_response_budget(cur, _CharTokenizer(), longest - 1)
    # short-answer tasks are not held to the budget (a cut response just scores 0)
    short = build_curriculum(_cfg("rl.curriculum.counting.levels=[1]"))
    check_response_budget(short, _CharTokenizer(), 1)
    with pytest.raises(C.ConfigError, match=r"rl.curriculum.counting.levels=\[8\]"):
        build_curriculum(_cfg("rl.curriculum.counting.levels=[8]"))
    with pytest.raises(C.ConfigError, match=r"rl.curriculum.arithmetic.levels=\[10\]"):
        build_curriculum(_cfg("rl.curriculum.arithmetic.levels=[10]"))
