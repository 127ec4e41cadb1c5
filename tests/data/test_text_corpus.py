"""Built-in text corpus: determinism, split, composition and correctness of generated answers."""

import re
from pydoc_data.topics import topics

from paddle_ernie5.data.text import (
    MAX_DOC_CHARS,
    build_arithmetic_problems,
    build_text_corpus,
    in_validation,
    pydoc_documents,
)

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def test_deterministic_and_disjoint_split():
    train, val = build_text_corpus(seed=0)
    assert (train, val) == build_text_corpus(seed=0)
    assert not set(train) & set(val)
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.09
    # The split is a property of each text, so it does not depend on order or on the other
    # documents.
    assert all(in_validation(d, 0.05) for d in val) and not any(
        in_validation(d, 0.05) for d in train
    )
    assert build_text_corpus(seed=1) != (train, val)


def test_pydoc_documents_keep_all_text_within_size():
    docs = pydoc_documents()
    assert max(len(d) for d in docs) <= MAX_DOC_CHARS
    assert sum(len(d) < 100 for d in docs) <= 3  # paragraph-sized, not line-sized

    def squash(s):
        return "".join(s.split())

    assert squash("".join(docs)) == squash("".join(topics[k] for k in sorted(topics)))


def test_generated_share_and_seed_only_changes_generated_text():
    train0, val0 = build_text_corpus(seed=0)
    train1, val1 = build_text_corpus(seed=1)
    prose = set(pydoc_documents())
    all0, all1 = train0 + val0, train1 + val1
    gen_chars = sum(len(d) for d in all0 if d not in prose)
    assert 0.30 < gen_chars / sum(len(d) for d in all0) < 0.40
    assert {d for d in all0 if d in prose} == {d for d in all1 if d in prose} == prose


def test_arithmetic_answers_are_exact():
    pairs = build_arithmetic_problems(500, seed=3)
    assert pairs == build_arithmetic_problems(500, seed=3)
    assert pairs != build_arithmetic_problems(500, seed=4)
    seen = set()
    for q, a in pairs:
        x, op, y = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", q).groups()
        assert int(a) == OPS[op](int(x), int(y)) >= 0
        seen.add(op)
    assert seen == set(OPS)


def test_generated_lines_state_true_facts():
    train, val = build_text_corpus(seed=0)
    text = "\n".join(train + val)
    checks = 0
    for word, n in re.findall(r'How many letters are in the word "(\w+)"\? A: (\d+)\.', text):
        assert len(word) == int(n)
        checks += 1
    letter_re = r'How many times does the letter "(\w)" appear in "(\w+)"\? A: (\d+)\.'
    for letter, word, n in re.findall(letter_re, text):
        assert word.count(letter) == int(n)
        checks += 1
    list_re = r"In the list ([a-z, ]+), how many times does (\w+) appear\? A: (\d+)\."
    for items, target, n in re.findall(list_re, text):
        assert items.split(", ").count(target) == int(n)
        checks += 1
    for stars, n in re.findall(r"How many stars are here: ([* ]+)\? A: (\d+)\.", text):
        assert stars.count("*") == int(n)
        checks += 1
    for a, op, b, n in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", text):
        assert OPS[op](int(a), int(b)) == int(n)
        checks += 1
    assert checks > 1000
