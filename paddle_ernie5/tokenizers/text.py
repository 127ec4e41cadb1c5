"""Text tokenizer: sentencepiece BPE with byte fallback, exact round trip, seeded BPE-dropout.

Text is kept verbatim (identity normalisation, no dummy prefix, whitespace runs allowed as
pieces), so `decode(encode(s)) == s` for any string without the U+2581 character; characters
outside the vocabulary become UTF-8 byte pieces. Digits are split so numbers are read digit by
digit.

BPE-dropout (Provilkov et al., 2020) is done here over the model's merge table with a numpy
Generator instead of sentencepiece's `enable_sampling`: that path draws from a process-wide C++
generator shared by every thread (`sentencepiece.set_random_generator_seed`), and with
sentencepiece 0.2.3 the same seed gives different segmentations in different processes, so a run
could not be reproduced. With `dropout=0` both paths give identical ids (a test checks this on the
whole corpus).
"""

from __future__ import annotations

import io

import numpy as np
import sentencepiece as spm

from ..io import write_bytes

MODALITY_SYMBOLS = ("<|boi|>", "<|eoi|>", "<|bov|>", "<|eov|>", "<|boa|>", "<|eoa|>", "<|im|>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPACE = "\u2581"
TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    character_coverage=1.0,
    num_threads=2,
    input_sentence_size=1_000_000,  # the built-in corpus has ~1K documents; only bounds memory
    shuffle_input_sentence=False,  # the first sentences, not a random sample: deterministic
    max_sentence_length=1 << 16,  # documents are whole paragraphs, not lines
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,  # indentation in code blocks becomes a few pieces, not many
    split_digits=True,
    pad_id=PAD_ID,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    # Control symbols are never produced from input text, so a document cannot forge a modality
    # boundary or an image placeholder; callers insert them by id.
    control_symbols=list(MODALITY_SYMBOLS),
    minloglevel=2,
)


class TextTokenizer:
    """A trained sentencepiece BPE model plus the merge table used for seeded BPE-dropout."""

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        # Only normal pieces can be produced by merging (byte and control pieces are reserved ids).
        self._piece_id, self._merge_score = {}, {}  # a higher score merges first
        for i in range(self.sp.get_piece_size()):
            if not (self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.is_byte(i)):
                self._piece_id[self.sp.id_to_piece(i)] = i
                self._merge_score[self.sp.id_to_piece(i)] = self.sp.get_score(i)
        self._byte_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]

    @classmethod
    def train(
        cls, texts: list[str], vocab_size: int, path_prefix: str | None = None
    ) -> TextTokenizer:
        """Train on texts and (with a `path_prefix`) write `{path_prefix}.model` atomically;
        deterministic for equal inputs."""
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buf,
            vocab_size=vocab_size,
            **TRAINER_OPTIONS,
        )
        proto = buf.getvalue()
        if path_prefix is not None:
            write_bytes(f"{path_prefix}.model", proto)
        return cls(proto)

    @classmethod
    def load(cls, path: str) -> TextTokenizer:
        with open(path, "rb") as f:
            return cls(f.read())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    pad_id = property(lambda self: self.sp.pad_id())
    bos_id = property(lambda self: self.sp.bos_id())
    eos_id = property(lambda self: self.sp.eos_id())
    unk_id = property(lambda self: self.sp.unk_id())

    def special_id(self, name: str) -> int:
        """Id of a modality symbol such as "<|boi|>"."""
        if name not in MODALITY_SYMBOLS:
            raise KeyError(f"unknown special token {name!r}; known: {MODALITY_SYMBOLS}")
        return self.sp.piece_to_id(name)

    def encode(self, text: str, dropout: float = 0.0, seed=None) -> list[int]:
        """Token ids; with dropout > 0 each merge is skipped with that probability (seeded by
        `seed`)."""
        if dropout <= 0.0:
            return self.sp.encode(text)
        return self._encode_dropout(text, dropout, np.random.default_rng(seed))

    def encode_batch(self, texts: list[str], dropout: float = 0.0, seed=None) -> list[list[int]]:
        """Encode many texts; with dropout, text i draws from Generator([seed, i]) so it depends on
        (seed, i, text) only, never on the other texts or on threads."""
        if dropout <= 0.0:
            return self.sp.encode(list(texts), num_threads=2)
        if seed is None:
            rng = np.random.default_rng()
            return [self._encode_dropout(t, dropout, rng) for t in texts]
        return [
            self._encode_dropout(t, dropout, np.random.default_rng([seed, i]))
            for i, t in enumerate(texts)
        ]

    def decode(self, ids) -> str:
        """Text of `ids`; an id outside this vocabulary (a model's modality delimiters sit above it)
        is written as <id N> instead of failing."""
        n, out, run = self.vocab_size, [], []
        for i in (int(i) for i in ids):
            if 0 <= i < n:
                run.append(i)
                continue
            out += [self.sp.decode(run), f"<id {i}>"]
            run = []
        return "".join(out + [self.sp.decode(run)])

    def _encode_dropout(self, text: str, dropout: float, rng: np.random.Generator) -> list[int]:
        ids = []
        for word in _words(text.replace(" ", SPACE)):
            for piece in self._bpe(word, dropout, rng):
                pid = self._piece_id.get(piece)
                if pid is None:  # a character outside the vocabulary: its UTF-8 bytes
                    ids.extend(self._byte_ids[b] for b in piece.encode("utf-8"))
                else:
                    ids.append(pid)
        return ids

    def _bpe(self, word: str, dropout: float, rng: np.random.Generator) -> list[str]:
        """sentencepiece's BPE loop: merge the best-scoring adjacent pair (leftmost on ties); a
        dropped pair stays unavailable until one of its symbols changes, as when it is popped from
        SP's heap."""
        syms = list(word)
        blocked = [False] * len(syms)  # blocked[i]: pair (i, i + 1) was dropped
        score = self._merge_score
        while len(syms) > 1:
            best, best_i = None, -1
            for i in range(len(syms) - 1):
                if blocked[i]:
                    continue
                s = score.get(syms[i] + syms[i + 1])
                if s is not None and (best is None or s > best):
                    best, best_i = s, i
            if best is None:
                break
            if dropout > 0.0 and rng.random() < dropout:
                blocked[best_i] = True
                continue
            syms[best_i] += syms.pop(best_i + 1)
            blocked.pop(best_i + 1)
            blocked[best_i] = False
            if best_i > 0:
                blocked[best_i - 1] = False
        return syms


def _words(escaped: str) -> list[str]:
    """Cut before every U+2581 that follows another character: no piece spans such a cut, because
    the trainer splits words there (whitespace-only runs stay whole), so BPE runs on each part
    alone."""
    out, start = [], 0
    for i in range(1, len(escaped)):
        if escaped[i] == SPACE and escaped[i - 1] != SPACE:
            out.append(escaped[start:i])
            start = i
    if escaped:
        out.append(escaped[start:])
    return out
