"""The curriculum: levels per family (seeded, true answers, disjoint prompts), the held-out split,
the task mixture, config validation, verifiers of the new families and the pass@k estimator."""

import math
import os
import re

import numpy as np
import pytest
from support import RECIPES

from paddle_ernie5 import config as C
from paddle_ernie5.rl import problems as P
from paddle_ernie5.rl import verifiers as V
from paddle_ernie5.rl.curriculum import build_curriculum, family_levels
from paddle_ernie5.rl.evaluate import greedy_changes, pass_at_k, table, weak_starts

CURRICULUM = ("arithmetic", "counting", "sorting", "reversal", "largest")


def _true_answer(p: P.Problem) -> str:
    """The answer worked out from the prompt text alone."""
    q = p.prompt.removeprefix("Q: ").removesuffix(" A:")
    if m := re.fullmatch(r"What is (\d+) ([-+]) (\d+), units digit first\?", q):
        a, op, b = m.groups()
        return str(int(a) + int(b) if op == "+" else int(a) - int(b))[::-1]
    if m := re.fullmatch(r"How many colours are in the list ([a-z ]+)\?", q):
        return str(sum(w in P.COLOURS for w in m.group(1).split()))
    if m := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)(?: - (\d+))?\?", q):
        a, op, b, c = m.groups()
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        return str(value - int(c or 0))
    if m := re.fullmatch(r"How many stars are here: ([* ]+)\?", q):
        return str(m.group(1).count("*"))
    if m := re.fullmatch(r"In the list (.*), how many times does (\w+) appear\?", q):
        return str(m.group(1).split(", ").count(m.group(2)))
    if m := re.fullmatch(r"Sort ([\d ]+)\.", q):
        return " ".join(sorted(m.group(1).split()))
    if m := re.fullmatch(r"Reverse ([a-z ]+)\.", q):
        return " ".join(reversed(m.group(1).split()))
    if m := re.fullmatch(r"What is the largest of ([\d ]+)\?", q):
        return str(max(int(x) for x in m.group(1).split()))
    if p.family == "counting" and p.level == 0:  # the corpus' word questions
        return p.answer
    raise AssertionError(f"unexpected prompt {p.prompt!r}")


@pytest.mark.parametrize("family", CURRICULUM)
def test_levels_are_seeded_true_and_labelled(family):
    spec = V.get_family(family)
    assert spec.levels == P.levels_of(family) and len(spec.levels) >= 4
    prompts = {}
    for level in spec.levels:
        problems = spec.make_problems(300, 7, level)
        assert len(problems) == 300
        assert problems == spec.make_problems(300, 7, level)  # seeded
        assert problems != spec.make_problems(300, 8, level)
        for p in problems:
            assert (p.family, p.level) == (family, level)
            assert p.task == (family if level == 0 else f"{family}/L{level}")
            assert p.answer == _true_answer(p), p
            assert V.reward(p, p.solution) == 1.0
        prompts[level] = {p.prompt for p in problems}
    # levels 1.. never share a prompt (level 0, the corpus mix, may overlap them)
    levels = [lv for lv in spec.levels if lv > 0]
    for i, a in enumerate(levels):
        for b in levels[i + 1 :]:
            assert not prompts[a] & prompts[b], (family, a, b)


def test_level_difficulty_follows_its_definition():
    """Operand ranges and list lengths per level, as rl/problems.py documents them."""
    for p in V.arithmetic_problems(200, 0, 4):  # two digits + one digit
        a, b = map(int, re.findall(r"\d+", p.prompt))
        assert 10 <= a <= 99 and 0 <= b <= 9
    for p in V.arithmetic_problems(200, 0, 3):  # a + b - c, one digit each, non-negative
        assert int(p.answer) >= 0 and all(len(x) == 1 for x in re.findall(r"\d+", p.prompt))
    for level in range(1, 5):
        for p in V.get_family("sorting").make_problems(50, 0, level):
            assert len(p.answer.split()) == level + 1
        numbers = re.findall(r"\d+", V.get_family("largest").make_problems(1, 0, level)[0].prompt)
        assert len(numbers) == (3, 2, 3, 5)[level - 1]
        assert {len(x) for x in numbers} == {1 if level == 1 else 2}
        for p in V.counting_problems(100, 0, level):
            # stars, or "In the list a, b, c, how many ...": one comma per item
            n = p.prompt.count("*") or p.prompt.count(",")
            assert 3 * level - 2 <= n <= 3 * level, p.prompt


def test_corpus_levels_are_the_corpus_draws():
    """Level 0 of arithmetic and counting draws exactly what data/text.py draws for the seed."""
    from paddle_ernie5.data.text import _counting, build_arithmetic_problems

    qa = build_arithmetic_problems(50, 3)
    assert [(p.prompt, p.answer) for p in V.arithmetic_problems(50, 3)] == [
        (f"Q: {q} A:", a) for q, a in qa
    ]
    rng = np.random.default_rng(3)
    assert [f"{p.prompt} {p.answer}." for p in V.counting_problems(50, 3)] == [
        _counting(rng) for _ in range(50)
    ]


def _cfg(*overrides):
    return C.load_config(
        "recipes/debug.yaml",
        [
            "rl.families=[arithmetic,counting,sorting,reversal]",
            "rl.curriculum.arithmetic.levels=[1,3,5]",
            "rl.curriculum.counting.levels=[0,2]",
            "rl.curriculum.sorting.levels=[2]",
            "rl.curriculum.reversal.weight=2",
            "rl.train_problems=600",
            "rl.eval_problems=50",
            *overrides,
        ],
    )


def test_curriculum_split_is_disjoint_seeded_and_mixed_by_weight():
    cur = build_curriculum(_cfg())
    assert cur.tasks == [
        "arithmetic/L1",
        "arithmetic/L3",
        "arithmetic/L5",
        "counting",
        "counting/L2",
        "sorting/L2",
        "reversal/L1",
        "reversal/L2",
        "reversal/L3",
        "reversal/L4",
    ]
    # family weights 1, 1, 1, 2 (of 5), shared equally by each family's levels
    expect = [1 / 15] * 3 + [1 / 10] * 2 + [1 / 5] + [2 / 20] * 4
    np.testing.assert_allclose(cur.weights, expect)
    train = {p.key for p in cur.training_problems()}
    held = {p.key for p in cur.heldout_problems()}
    assert train and held and not train & held
    # the held-out split is by prompt: no held-out prompt is trained on at any level or family
    assert not {p.prompt for p in cur.training_problems()} & {
        p.prompt for p in cur.heldout_problems()
    }
    assert all(0 < len(cur.heldout[t]) <= 50 for t in cur.tasks)
    again = build_curriculum(_cfg())
    assert [p.key for p in again.heldout_problems()] == [p.key for p in cur.heldout_problems()]
    draws = [cur.draw(0, i) for i in range(4000)]
    assert [p.key for p in draws[:50]] == [again.draw(0, i).key for i in range(50)]
    assert [p.key for p in draws[:50]] != [cur.draw(1, i).key for i in range(50)]
    assert all(p.key in train for p in draws)
    share = np.array([np.mean([p.task == t for p in draws]) for t in cur.tasks])
    np.testing.assert_allclose(share, expect, atol=0.02)


def test_curriculum_config():
    cfg = _cfg()
    assert family_levels(cfg, "arithmetic") == (1, 3, 5)
    # unset levels: the family's defaults (corpus mix for arithmetic/counting, all levels else)
    base = C.load_config("recipes/debug.yaml", ["rl.curriculum.largest.weight=3"])
    assert family_levels(base, "arithmetic") == (0,)
    assert family_levels(base, "counting") == (0,)
    assert family_levels(base, "largest") == (1, 2, 3, 4)  # a weight alone keeps the levels
    assert base.rl.curriculum.largest.weight == 3
    with pytest.raises(C.ConfigError, match=r"rl.curriculum.sorting.levels=\[0\].*levels 1, 2"):
        build_curriculum(_cfg("rl.curriculum.sorting.levels=[0]"))
    with pytest.raises(C.ConfigError, match="distinct"):
        _cfg("rl.curriculum.sorting.levels=[1,1]")
    with pytest.raises(C.ConfigError, match="rl.pass_k"):
        _cfg("rl.pass_k=9")
    with pytest.raises(C.ConfigError, match="rollout_staleness"):
        _cfg("rl.rollout_staleness=-1")


@pytest.mark.parametrize(
    ("family", "level", "good", "bad"),
    [
        (
            "sorting",
            3,
            [" 1 2 3 3.\n", "1 2 3 3.", "  1  2 3 3 . "],
            [" 1 2 3.\n", " 3 3 2 1.\n", " 1 2 3 3\n", " 1,2,3,3.\n", " 1233.\n", "", ".", "x"],
        ),
        (
            "reversal",
            2,
            [" t a c.\n", "t a c."],
            [" c a t.\n", " tac.\n", " t a c\n", " t a c a.\n", " t a c. t\n", ""],
        ),
        ("largest", 2, [" 8.\n", "8."], [" 7.\n", " 8\n", " 8 5.\n", " eight.\n", ""]),
        ("counting", 1, [" 3.\n"], [" 4.\n", " three.\n", " 3\n", ""]),
        ("arithmetic", 3, [" 5.\n"], [" 9.\n", " -5.\n", " 5 .\n.", " 5"]),
    ],
)
def test_verifiers_of_each_family(family, level, good, bad):
    answer = {
        "sorting": ("Sort 3 1 3 2.", "1 2 3 3"),
        "reversal": ("Reverse c a t.", "t a c"),
        "largest": ("What is the largest of 3 8 5?", "8"),
        "counting": ("How many stars are here: * * *?", "3"),
        "arithmetic": ("What is 3 + 4 - 2?", "5"),
    }[family]
    p = P.qa_problem(family, *answer, level=level)
    for response in good:
        assert V.reward(p, response) == 1.0, response
    for response in bad:
        assert V.reward(p, response) == 0.0, response


def test_pass_at_k_by_hand():
    # n = 5 samples, c = 2 correct, k = 2: 1 - C(3, 2) / C(5, 2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # the same by enumerating every pair of the 5 samples
    samples = [1, 1, 0, 0, 0]
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    assert pass_at_k(5, 2, 2) == pytest.approx(
        np.mean([samples[i] or samples[j] for i, j in pairs])
    )
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0  # n = k: any correct
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # k = 1: the fraction correct
    assert pass_at_k(16, 3, 8) == pytest.approx(1 - math.comb(13, 8) / math.comb(16, 8))
    assert pass_at_k(10, 3, 8) == 1.0  # fewer than k wrong: every k-subset holds a correct one
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 8)


def test_greedy_changes_by_hand():
    before = {
        "a1": ("a", 1.0, (5, 9)),  # stays right
        "a2": ("a", 1.0, (5, 9)),  # right -> wrong
        "a3": ("a", 0.0, (4, 9)),  # wrong -> right
        "a4": ("a", 0.0, (3, 9)),  # wrong -> another wrong answer
        "b1": ("b", 0.0, (7, 9)),  # stays the same wrong answer
        "b2": ("b", 0.0, (7, 9)),  # not measured after: ignored
    }
    after = {
        "a1": ("a", 1.0, (5, 9)),
        "a2": ("a", 0.0, (6, 9)),
        "a3": ("a", 1.0, (5, 9)),
        "a4": ("a", 0.0, (2, 9)),
        "b1": ("b", 0.0, (7, 9)),
    }
    out = greedy_changes(before, after)
    assert out["a"] == {
        "right_to_wrong": 0.25,
        "wrong_to_right": 0.25,
        "wrong_to_other_wrong": 0.25,
        "changed": 0.75,
    }
    assert out["b"] == {
        "right_to_wrong": 0.0,
        "wrong_to_right": 0.0,
        "wrong_to_other_wrong": 0.0,
        "changed": 0.0,
    }


def test_weak_starts_names_the_trained_tasks_below_the_floor():
    results = {
        "arithmetic/L7": {"pass@8": 0.12},  # trained, below: named
        "arithmetic/L9": {"pass@8": 0.2},  # trained, at the floor: not named
        "arithmetic/L1": {"pass@8": 0.05},  # measured only: not named
        "sorting/L4": {"pass@8": 0.95},
    }
    trained = ["arithmetic/L7", "arithmetic/L9", "sorting/L4"]
    out = weak_starts(results, trained, 8, 0.2)
    assert len(out) == 1 and out[0].startswith("arithmetic/L7 starts at held-out pass@8 0.12 ")
    assert "rl.min_start_pass_k=0.2" in out[0]
    assert weak_starts(results, trained, 8, 0.0) == []
    assert len(weak_starts(results, trained, 8, 1.0)) == 3
    with pytest.raises(C.ConfigError, match="min_start_pass_k"):
        _cfg("rl.min_start_pass_k=1.5")


def test_table_lists_every_task_before_and_after():
    after = {
        "arithmetic/L1": {
            "reward": 0.5,
            "greedy_accuracy": 0.75,
            "pass@8": 0.9,
            "entropy": 0.2,
            "response_length": 3.0,
            "prompts": 20,
        }
    }
    before = {"arithmetic/L1": {**after["arithmetic/L1"], "pass@8": 0.6}}
    text = table(after, before)
    assert "pass@1 (greedy)" in text and "pass@8" in text
    assert "0.600 -> 0.900" in text and "0.750 -> 0.750" in text and "arithmetic/L1" in text


def test_level_weights_share_a_family_and_zero_levels_are_measured_only():
    """rl.curriculum.<family>.level_weights splits the family's weight by level (normalised within
    the family); a level of weight 0 is never drawn but keeps its held-out prompts."""
    cfg = _cfg("rl.curriculum.arithmetic.level_weights=[0,1,3]")
    cur = build_curriculum(cfg)
    # family weights 1, 1, 1, 2 (of 5): arithmetic's 1/5 goes 0, 1/4, 3/4 to L1, L3, L5
    expect = [0.0, 1 / 20, 3 / 20] + [1 / 10] * 2 + [1 / 5] + [2 / 20] * 4
    np.testing.assert_allclose(cur.weights, expect)
    draws = [cur.draw(0, i) for i in range(4000)]
    assert not [p for p in draws if p.task == "arithmetic/L1"]
    share = np.array([np.mean([p.task == t for p in draws]) for t in cur.tasks])
    np.testing.assert_allclose(share, expect, atol=0.02)
    # the weight-0 level is still measured, on the same held-out prompts as without level weights
    plain = build_curriculum(_cfg())
    assert [p.key for p in cur.heldout["arithmetic/L1"]] == [
        p.key for p in plain.heldout["arithmetic/L1"]
    ]
    assert len(cur.heldout["arithmetic/L1"]) > 0
    # equal level weights are the default split exactly
    same = build_curriculum(_cfg("rl.curriculum.arithmetic.level_weights=[2,2,2]"))
    np.testing.assert_allclose(same.weights, plain.weights, rtol=1e-12)
    # a measurement-only family: every level of weight 0
    off = build_curriculum(_cfg("rl.curriculum.arithmetic.level_weights=[0,0,0]"))
    assert off.weights[:3].sum() == 0 and off.weights.sum() == pytest.approx(1)
    with pytest.raises(C.ConfigError, match=r"level_weights.*one weight >= 0 per entry"):
        _cfg("rl.curriculum.arithmetic.level_weights=[1,1]")
    with pytest.raises(C.ConfigError, match=r"level_weights.*one weight >= 0 per entry"):
        _cfg("rl.curriculum.arithmetic.level_weights=[1,-1,1]")
    with pytest.raises(C.ConfigError, match="every family of rl.families weight 0"):
        build_curriculum(
            _cfg(
                "rl.families=[arithmetic]",
                "rl.curriculum.arithmetic.level_weights=[0,0,0]",
            )
        )


def test_setting_levels_resets_inherited_level_weights(tmp_path):
    """Level weights belong to the levels they were written for: a layer (recipe or override)
    that sets a family's levels without level_weights gets equal shares; one that sets both, or
    only the weights, keeps what it says."""
    rl_tiny = os.path.join(RECIPES, "rl_tiny.yaml")
    arith = C.load_config(rl_tiny).rl.curriculum.arithmetic
    assert arith.levels == (1, 2, 3, 4, 7, 9) and len(arith.level_weights) == 6
    over = C.load_config(rl_tiny, ["rl.curriculum.arithmetic.levels=[1,2]"]).rl.curriculum
    assert over.arithmetic.levels == (1, 2) and over.arithmetic.level_weights == ()
    assert (
        over.sorting == C.load_config(rl_tiny).rl.curriculum.sorting
    )  # other families as they were
    both = C.load_config(
        rl_tiny,
        ["rl.curriculum.arithmetic.levels=[1,2]", "rl.curriculum.arithmetic.level_weights=[1,3]"],
    )
    assert both.rl.curriculum.arithmetic.level_weights == (1.0, 3.0)
    weights = C.load_config(rl_tiny, ["rl.curriculum.arithmetic.level_weights=[1,1,1,1,1,2]"])
    assert weights.rl.curriculum.arithmetic.levels == arith.levels
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {rl_tiny}\nrl:\n  curriculum:\n    arithmetic: {{levels: [4, 7]}}\n")
    chained = C.load_config(str(child)).rl.curriculum.arithmetic
    assert chained.levels == (4, 7) and chained.level_weights == ()
    assert chained.weight == arith.weight
