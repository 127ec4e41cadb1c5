"""Built-in text corpus: Python's pydoc topics plus generated arithmetic, counting and caption text.

Nothing is downloaded: the prose ships with the interpreter (`pydoc_data.topics`), the rest is
generated from a seeded numpy Generator. Documents go to validation by a hash of their text, so the
split does not depend on order or seed, and a document generated twice always lands on the same
side.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys

import numpy as np
import sentencepiece as spm

from ..io import cache
from ..tokenizers.text import TRAINER_OPTIONS, TextTokenizer

COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "orange")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIRECTIONS = ("left", "right", "up", "down")
NAMES = (
    "Ana",
    "Ben",
    "Chen",
    "Dara",
    "Eli",
    "Fatima",
    "Goro",
    "Hana",
    "Ivan",
    "Jia",
    "Kofi",
    "Lena",
)
ITEMS = ("apples", "pens", "books", "stars", "cups", "coins", "shells", "cards", "stones", "boxes")
WORDS = (
    COLOURS
    + DIGIT_WORDS
    + DIRECTIONS
    + (
        "python",
        "letter",
        "number",
        "picture",
        "sound",
        "video",
        "digit",
        "square",
        "circle",
        "banana",
        "keyboard",
        "language",
        "function",
        "statement",
        "module",
        "question",
        "answer",
        "mississippi",
    )
)
# Additive light mixing: these are the captions' colours, and the facts are true.
LIGHT_MIXES = (("red", "green", "yellow"), ("green", "blue", "cyan"), ("red", "blue", "magenta"))

GENERATED_FRACTION = 0.35  # share of corpus characters that is generated rather than pydoc prose
MAX_DOC_CHARS = 2000
TOKENIZER_CACHE_FORMAT = 2  # bump when the cached tokenizer's layout or training changes


def build_text_corpus(seed: int = 0, val_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """(train documents, validation documents); deterministic given seed."""
    prose = pydoc_documents()
    prose_chars = sum(len(d) for d in prose)
    budget = int(prose_chars * GENERATED_FRACTION / (1.0 - GENERATED_FRACTION))
    docs = prose + generated_documents(budget, seed)
    train = [d for d in docs if not in_validation(d, val_fraction)]
    val = [d for d in docs if in_validation(d, val_fraction)]
    return train, val


def in_validation(doc: str, val_fraction: float) -> bool:
    """Stable split: the first 8 bytes of blake2b(doc) read as a fraction of 2**64."""
    h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2.0**64 < val_fraction


def pydoc_documents(max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Pydoc topics (sorted by name) cut at blank lines into documents of at most max_chars."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        docs.extend(_merge(_paragraphs(topics[name].strip(), max_chars), max_chars, "\n\n"))
    return docs


def _paragraphs(text: str, max_chars: int) -> list[str]:
    out = []
    for para in re.split(r"\n[ \t]*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        if len(para) <= max_chars:
            out.append(para)
            continue
        # An over-long paragraph (a big grammar block) is cut at line ends, then hard-cut if needed.
        lines = [
            line[i : i + max_chars]
            for line in para.split("\n")
            for i in range(0, max(len(line), 1), max_chars)
        ]
        out.extend(_merge(lines, max_chars, "\n"))
    return out


def _merge(parts: list[str], max_chars: int, sep: str) -> list[str]:
    """Greedily join consecutive parts while the result stays within max_chars."""
    out, cur = [], ""
    for p in parts:
        if cur and len(cur) + len(sep) + len(p) > max_chars:
            out.append(cur)
            cur = p
        else:
            cur = cur + sep + p if cur else p
    if cur:
        out.append(cur)
    return out


# --------------------------------------------------------------------------------------------------
# Generated text


def build_arithmetic_problems(n: int, seed: int) -> list[tuple[str, str]]:
    """n (question, answer) pairs such as ("What is 37 + 45?", "82"); answers are exact integers."""
    rng = np.random.default_rng(seed)
    return [_arithmetic(rng) for _ in range(n)]


def _arithmetic(rng: np.random.Generator) -> tuple[str, str]:
    op = rng.integers(3)
    if op == 0:
        a, b = rng.integers(0, 100, size=2)
        return f"What is {a} + {b}?", str(a + b)
    if op == 1:
        a = rng.integers(0, 100)
        b = rng.integers(0, a + 1)  # keep answers non-negative
        return f"What is {a} - {b}?", str(a - b)
    a, b = rng.integers(0, 13, size=2)
    return f"What is {a} * {b}?", str(a * b)


def _equation(rng: np.random.Generator) -> str:
    question, answer = _arithmetic(rng)
    return f"{question.removeprefix('What is ').removesuffix('?')} = {answer}."


def _qa(question: str, answer: str) -> str:
    return f"Q: {question} A: {answer}."


def _word_problem(rng: np.random.Generator) -> str:
    name = NAMES[rng.integers(len(NAMES))]
    item = ITEMS[rng.integers(len(ITEMS))]
    colour = COLOURS[rng.integers(len(COLOURS))]
    kind = rng.integers(3)
    if kind == 0:
        a, b = (int(x) for x in rng.integers(1, 50, size=2))
        q = (
            f"{name} has {a} {colour} {item} and gets {b} more. "
            f"How many {colour} {item} does {name} have now?"
        )
        return _qa(q, str(a + b))
    if kind == 1:
        a = int(rng.integers(1, 50))
        b = int(rng.integers(0, a + 1))
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        return _qa(q, str(a - b))
    a, b = (int(x) for x in rng.integers(2, 10, size=2))
    q = f"There are {a} bags with {b} {item} in each bag. How many {item} are there in total?"
    return _qa(q, str(a * b))


def _counting(rng: np.random.Generator) -> str:
    kind = rng.integers(4)
    word = WORDS[rng.integers(len(WORDS))]
    if kind == 0:
        return _qa(f'How many letters are in the word "{word}"?', str(len(word)))
    if kind == 1:
        letter = word[rng.integers(len(word))]
        return _qa(
            f'How many times does the letter "{letter}" appear in "{word}"?',
            str(word.count(letter)),
        )
    if kind == 2:
        k = int(rng.integers(1, 13))
        return _qa(f"How many stars are here: {' '.join('*' * k)}?", str(k))
    listed = [COLOURS[i] for i in rng.integers(0, 4, size=int(rng.integers(3, 10)))]
    target = listed[rng.integers(len(listed))]
    q = f"In the list {', '.join(listed)}, how many times does {target} appear?"
    return _qa(q, str(listed.count(target)))


def _an(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _sentence(rng: np.random.Generator) -> str:
    d = int(rng.integers(10))
    fg, bg = (COLOURS[i] for i in rng.choice(len(COLOURS), size=2, replace=False))
    kind = rng.integers(7)
    if kind == 0:
        return f"{_an(fg).capitalize()} {fg} {d} on {_an(bg)} {bg} background."
    if kind == 1:
        return f"The digit {d} is written in {fg} on {_an(bg)} {bg} background."
    if kind == 2:
        return f"The word {DIGIT_WORDS[d]} is written as the digit {d}."
    if kind == 3:
        return f"The number after {d} is {d + 1}, and the number before {d + 10} is {d + 9}."
    if kind == 4:
        a, b, c = LIGHT_MIXES[rng.integers(len(LIGHT_MIXES))]
        return f"Mixing {a} light and {b} light gives {c} light."
    if kind == 5:
        way = DIRECTIONS[rng.integers(len(DIRECTIONS))]
        return (
            f"{_an(fg).capitalize()} {fg} digit {d} moves {way} across {_an(bg)} {bg} background."
        )
    return f"Q: What colour is the digit in this picture of {_an(fg)} {fg} {d} on {bg}? A: {fg}."


GENERATORS = (
    ("arithmetic_qa", lambda rng: _qa(*_arithmetic(rng))),
    ("equations", _equation),
    ("word_problems", _word_problem),
    ("counting", _counting),
    ("sentences", _sentence),
)
TEXT_KINDS = ("prose",) + tuple(name for name, _ in GENERATORS)


def generated_documents(char_budget: int, seed: int, with_kinds: bool = False):
    """Documents of 4-16 lines, each document one kind of line, until char_budget characters.
    with_kinds: return (document, kind name) pairs."""
    rng = np.random.default_rng(seed)
    docs, used = [], 0
    while used < char_budget:
        kind, make = GENERATORS[rng.integers(len(GENERATORS))]
        doc = "\n".join(make(rng) for _ in range(int(rng.integers(4, 17))))
        docs.append((doc, kind) if with_kinds else doc)
        used += len(doc)
    return docs


def validation_documents_by_kind(seed: int = 0, val_fraction: float = 0.05) -> dict[str, list[str]]:
    """The validation split grouped by kind (prose, arithmetic_qa, ...): sources for routing
    analysis."""
    prose = pydoc_documents()
    budget = int(sum(len(d) for d in prose) * GENERATED_FRACTION / (1.0 - GENERATED_FRACTION))
    out: dict[str, list[str]] = {k: [] for k in TEXT_KINDS}
    for doc, kind in [(d, "prose") for d in prose] + generated_documents(
        budget, seed, with_kinds=True
    ):
        if in_validation(doc, val_fraction):
            out[kind].append(doc)
    return out


def get_text_tokenizer(
    cache_dir: str, vocab_size: int, seed: int = 0, val_fraction: float = 0.05
) -> TextTokenizer:
    """Tokenizer trained on the built-in corpus' training split, cached in cache_dir by config hash.

    The cache (io/cache.py) holds the sentencepiece model with its format and checksum: an empty,
    truncated, damaged or stale one is reported in one line on stderr and retrained in place."""
    train_docs, _ = build_text_corpus(seed, val_fraction)
    h = hashlib.sha256()
    h.update(
        json.dumps(
            dict(TRAINER_OPTIONS, vocab_size=vocab_size, sp=spm.__version__), sort_keys=True
        ).encode()
    )
    for doc in train_docs:
        h.update(doc.encode("utf-8"))
        h.update(b"\0")
    path = os.path.join(cache_dir, f"text_bpe_v{vocab_size}_{h.hexdigest()[:12]}.npz")
    what = "text tokenizer"
    arrays = cache.load(path, TOKENIZER_CACHE_FORMAT, what)
    if arrays is not None:
        try:
            return TextTokenizer(arrays["model_proto"].tobytes())
        except Exception as e:  # noqa: BLE001 - sentencepiece raises bare RuntimeError/OSError
            print(
                f"ernie5: cached {what} {path} does not load ({e}); rebuilding it", file=sys.stderr
            )
    tok = TextTokenizer.train(train_docs, vocab_size)
    cache.save(
        path, {"model_proto": np.frombuffer(tok.model_proto, np.uint8)}, TOKENIZER_CACHE_FORMAT
    )
    return tok
