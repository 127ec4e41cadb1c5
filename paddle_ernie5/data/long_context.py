"""The built-in long-context task: a passkey stated once inside a long stretch of built-in text and
asked for at the end; and long held-out text for perplexity.

    <bos> filler ... " The pass key is$4CNb. Remember it." ... filler
          " What is the pass key? The pass key is$" 4 C N b
                                                    ^ answer: the key's characters, one token each

The key has KEY_CHARS characters, character i drawn from its own alphabet of ten
(KEY_ALPHABETS: digits, A-J, K-T, a-j; chance of guessing the whole key 10^-4, a character 0.1).
Each key character is written as the tokenizer's byte-fallback token for it (`<0x34>` for "4"),
a token that encoding text never produces: the built-in text never holds one, so the needle is the
only place in the prompt where a character of slot i's alphabet occurs, and the answer's character
i can be found by content alone ("the slot-i character"). recipes/long_context_tiny_stage1.yaml
learns characters 2-4; the first (asked for by the marker) stays one constant answer through its
1100 steps and is learned after the warm restart of recipes/long_context_tiny.yaml. A key of
ordinary tokens ("4827") needs an induction circuit (find the earlier marker, copy the token after
it), and pretrain_tiny has none (its accuracy on the second half of a repeated random sequence is
0): such a key stayed at chance for 200 steps. The marker `$` (also a byte token) ends both the
needle's words and the question.

The filler is a contiguous window of built-in text (data/text.py, documents end to end), the
needle sits at a uniform depth of it.

Splits: training examples take their filler from the training split of the built-in text. Held-out
examples and the long validation text take theirs from the validation split plus generated
documents of another seed that the corpus's hash rule puts on the validation side (so no filler
document equals a training document; the prose validation split alone holds about 14K tokens).

Training source `passkey` (data.mixture.passkey > 0, packed by data/mixture.py): examples of a
length log-uniform in [MIN_TRAIN_TOKENS, data.seq_len] (a mix of lengths: short ones are many per
row, long ones teach the distances), trained only on the key's characters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .mixture import MixtureContext, register_source
from .multimodal import Segment, text_segment
from .packing import IGNORE

KEY_CHARS = 4  # key characters
NEEDLE = " The pass key is"
NEEDLE_END = ". Remember it."
KEY_MARK = "$"  # right before the key, in the needle and at the end of the question
KEY_ALPHABETS = ("0123456789", "ABCDEFGHIJ", "KLMNOPQRST", "abcdefghij")
QUESTION = " What is the pass key? The pass key is"
MIN_TRAIN_TOKENS = 64
# Seed of the generated documents added to the held-out filler (apart from the corpus's own).
HELD_OUT_TEXT_SEED = 0x10C
HELD_OUT_TEXT_CHARS = 1_500_000  # generated, of which the validation side (~5%) is kept


@dataclass(frozen=True)
class PasskeyExample:
    """ids [L] int64 (<bos> first); the answer is ids[answer_at : answer_at + KEY_CHARS];
    `depth` is the needle's position as a fraction of the filler."""

    ids: np.ndarray
    answer_at: int
    depth: float

    @property
    def answer(self) -> np.ndarray:
        return self.ids[self.answer_at : self.answer_at + KEY_CHARS]

    @property
    def prompt(self) -> np.ndarray:
        """Everything before the answer (what generation continues)."""
        return self.ids[: self.answer_at]


class PasskeyFormat:
    """The task's fixed token pieces for one tokenizer."""

    def __init__(self, tokenizer):
        self.bos = tokenizer.bos_id
        self.mark = _byte_token(tokenizer, KEY_MARK)
        # [KEY_CHARS, 10]: the byte token of each character of each slot's alphabet
        self.alphabets = np.array([[_byte_token(tokenizer, c) for c in a] for a in KEY_ALPHABETS])
        self.needle = np.asarray(tokenizer.encode(NEEDLE), np.int64)
        self.needle_end = np.asarray(tokenizer.encode(NEEDLE_END), np.int64)
        self.question = np.asarray(tokenizer.encode(QUESTION), np.int64)

    @property
    def overhead(self) -> int:
        """Positions besides the filler: <bos>, needle with its key, question and answer."""
        return (
            1 + len(self.needle) + len(self.needle_end) + len(self.question) + 2 * (1 + KEY_CHARS)
        )

    def example(self, filler, length: int, rng: np.random.Generator, depth=None, start=None):
        """A PasskeyExample of exactly `length` positions from the window of `filler` (token ids
        end to end, cycled) at `start`; `start` and `depth` (in [0, 1]) None: uniform draws."""
        n = length - self.overhead
        if n < 0:
            raise ValueError(f"a passkey example needs at least {self.overhead} positions")
        start = int(rng.integers(0, len(filler))) if start is None else int(start)
        window = np.take(filler, np.arange(start, start + n), mode="wrap")
        depth = float(rng.random()) if depth is None else float(depth)
        at = int(round(depth * n))
        key = self.alphabets[np.arange(KEY_CHARS), rng.integers(0, 10, size=KEY_CHARS)]
        stated = np.concatenate([self.needle, [self.mark], key, self.needle_end])
        asked = np.concatenate([self.question, [self.mark]])
        ids = np.concatenate([[self.bos], window[:at], stated, window[at:], asked, key])
        return PasskeyExample(ids.astype(np.int64), 1 + n + len(stated) + len(asked), depth)


def _byte_token(tokenizer, char: str) -> int:
    """The byte-fallback token of a one-byte character (a tokenizer without byte fallback cannot
    pose the task)."""
    i = tokenizer.sp.piece_to_id(f"<0x{ord(char):02X}>")
    if not tokenizer.sp.is_byte(i):
        raise ValueError(f"the tokenizer has no byte-fallback token for {char!r}")
    return int(i)


def filler_documents(split: str, split_seed: int, val_fraction: float) -> list[str]:
    """The split's documents in a seeded order: "train" the corpus's training split, "val" its
    validation split plus generated documents (another seed) that the corpus's hash rule puts on
    the validation side and that are not already there."""
    from .text import build_text_corpus, generated_documents, in_validation

    train, val = build_text_corpus(split_seed, val_fraction)
    if split == "train":
        docs = train
    elif split == "val":
        extra = generated_documents(HELD_OUT_TEXT_CHARS, split_seed + HELD_OUT_TEXT_SEED)
        seen = set(val)
        docs = val + [d for d in extra if in_validation(d, val_fraction) and d not in seen]
    else:
        raise ValueError(f"split {split!r}: choose train or val")
    order = np.random.default_rng([split_seed, len(docs)]).permutation(len(docs))
    return [docs[i] for i in order]


def filler_text(tokenizer, split: str, split_seed: int, val_fraction: float) -> np.ndarray:
    """Token ids of `filler_documents`, end to end (each document ends with a newline)."""
    ids = tokenizer.encode_batch(
        [d + "\n" for d in filler_documents(split, split_seed, val_fraction)]
    )
    return np.concatenate([np.asarray(x, np.int64) for x in ids])


def passkey_examples(fmt: PasskeyFormat, filler: np.ndarray, length: int, n: int, seed: int):
    """`n` held-out examples of `length` positions with the needle at evenly spread depths
    ((i + 0.5) / n), seeded by (seed, length)."""
    rng = np.random.default_rng([seed, length])
    return [fmt.example(filler, length, rng, depth=(i + 0.5) / n) for i in range(n)]


def long_text(tokenizer, filler: np.ndarray, length: int, seed: int) -> np.ndarray:
    """<bos> + `length - 1` consecutive filler tokens from a seeded start: long validation text."""
    start = int(np.random.default_rng([seed, length, 1]).integers(0, len(filler)))
    window = np.take(filler, np.arange(start, start + length - 1), mode="wrap")
    return np.concatenate([[tokenizer.bos_id], window]).astype(np.int64)


def answer_labels(example: PasskeyExample) -> np.ndarray:
    """Next-token labels that train only the key's characters (IGNORE elsewhere)."""
    labels = np.full(len(example.ids), IGNORE, np.int64)
    at = example.answer_at
    labels[at - 1 : at - 1 + KEY_CHARS] = example.answer
    return labels


@register_source("passkey")
class PasskeySource:
    """Mixture source: passkey examples over the split's filler, lengths log-uniform in
    [MIN_TRAIN_TOKENS, data.seq_len]."""

    def __init__(self, ctx: MixtureContext):
        dc = ctx.cfg.data
        self.fmt = PasskeyFormat(ctx.tokenizer)
        self.filler = filler_text(ctx.tokenizer, ctx.split, dc.split_seed, dc.val_fraction)
        self.max_len = dc.seq_len
        self.min_len = min(max(MIN_TRAIN_TOKENS, self.fmt.overhead + 8), self.max_len)

    def __len__(self) -> int:
        return len(self.filler)  # an index is a filler start; the key and depth come from rng

    def longest(self) -> int:
        return self.max_len

    def document(self, index: int, rng: np.random.Generator) -> list[Segment]:
        lo, hi = np.log(self.min_len), np.log(self.max_len)
        length = int(np.exp(rng.uniform(lo, hi)))
        example = self.fmt.example(self.filler, length, rng, start=index)
        seg = text_segment(example.ids)
        seg.labels = answer_labels(example)
        return [seg]
