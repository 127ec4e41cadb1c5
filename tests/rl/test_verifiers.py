import numpy as np
import pytest

from paddle_ernie5.rl import verifiers as V


def test_arithmetic_good_and_bad_answers():
    p = V.Problem("arithmetic", "Q: What is 37 + 45? A:", "82", " 82.\n")
    for good in (" 82.\n", " 82.", "82.", " 82. "):
        assert V.reward(p, good) == 1.0, good
    for bad in (
        " 83.\n",
        " 82",
        " 8.\n",
        " 820.\n",
        " 82.\nQ: What",
        " 82 apples.\n",
        "",
        " -82.\n",
        " 8 2.\n",
    ):
        assert V.reward(p, bad) == 0.0, bad


def test_built_in_problems_are_answered_correctly_by_their_own_solutions():
    for family in ("arithmetic", "counting"):
        problems = V.get_family(family).make_problems(200, 3, 0)
        assert len(problems) == 200, family  # `all` below would pass on no problems
        assert all(V.reward(p, p.solution) == 1.0 for p in problems)
        # a wrong number is always rejected
        assert all(V.reward(p, f" {int(p.answer) + 1}.\n") == 0.0 for p in problems)
    sums = [p for p in V.arithmetic_problems(50, 0) if "+" in p.prompt]
    question = sums[0].prompt.removeprefix("Q: What is ").removesuffix("? A:")
    a, b = (int(x) for x in question.split(" + "))
    assert sums[0].answer == str(a + b)


def test_counting_problems_are_true():
    problems = V.counting_problems(300, seed=1)
    checked = {"stars": 0, "list": 0}
    for p in problems:
        q = p.prompt
        if q.startswith("Q: How many stars"):
            assert q.count("*") == int(p.answer)
            checked["stars"] += 1
        elif "how many times does" in q and "In the list" in q:
            listed = q.split("In the list ")[1].split(", how many")[0].split(", ")
            target = q.split("how many times does ")[1].split(" appear")[0]
            assert listed.count(target) == int(p.answer)
            checked["list"] += 1
    # fails rather than passes when the problems, or either kind, are missing
    assert len(problems) == 300 and min(checked.values()) >= 30, checked


def test_split_is_disjoint_and_independent_of_n():
    tr, he = V.split_problems("arithmetic", 300, 0, 0.2)
    assert tr and he  # the disjointness below holds for empty lists too
    assert not {p.prompt for p in tr} & {p.prompt for p in he}
    tr2, he2 = V.split_problems("arithmetic", 600, 5, 0.2)
    assert len(tr2) > len(tr)
    assert not {p.prompt for p in tr2} & {p.prompt for p in he}  # held out for every pool
    assert 0.1 < len(he) / (len(he) + len(tr)) < 0.3


def test_unified_interface_takes_new_verifiers():
    def judge(problem, response_ids):  # e.g. an image judge receives token ids, not text
        return float(np.sum(response_ids) == int(problem.answer))

    V.register_family(
        V.FamilySpec(
            "toy_tokens",
            lambda n, seed, level: [V.Problem("toy_tokens", "x", "7", "")] * n,
            judge,
            response_modality="image",
        )
    )
    try:
        p = V.get_family("toy_tokens").make_problems(1, 0, 0)[0]
        assert V.reward(p, np.array([3, 4])) == 1.0 and V.reward(p, np.array([3])) == 0.0
    finally:
        del V.FAMILIES["toy_tokens"]
    with pytest.raises(KeyError, match="registered"):
        V.get_family("nope")
