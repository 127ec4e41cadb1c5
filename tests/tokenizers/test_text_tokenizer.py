"""Text tokenizer: determinism, exact round trip, byte fallback, seeded BPE-dropout, caching."""

import os
import subprocess
import sys

import pytest

from paddle_ernie5.data.text import build_text_corpus, get_text_tokenizer
from paddle_ernie5.tokenizers.text import MODALITY_SYMBOLS, TextTokenizer

VOCAB = 512


@pytest.fixture(scope="module")
def corpus():
    return build_text_corpus(seed=0)


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    return TextTokenizer.train(corpus[0], VOCAB, str(tmp_path_factory.mktemp("tok") / "t"))


def test_training_is_deterministic(corpus, tok, tmp_path):
    again = TextTokenizer.train(corpus[0], VOCAB, str(tmp_path / "again"))
    assert again.model_proto == tok.model_proto
    assert (tmp_path / "again.model").read_bytes() == tok.model_proto
    assert tok.vocab_size == VOCAB


def test_special_ids(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    ids = [tok.special_id(s) for s in MODALITY_SYMBOLS]
    assert len(set(ids) | {0, 1, 2, 3}) == len(MODALITY_SYMBOLS) + 4
    # Modality markers are control symbols: text that spells one does not produce its id.
    assert not set(tok.encode("<|boi|> <|im|>")) & set(ids)
    with pytest.raises(KeyError):
        tok.special_id("<|nope|>")


def test_round_trip_corpus_and_unicode(corpus, tok):
    docs = corpus[0] + corpus[1]
    assert [tok.decode(ids) for ids in tok.encode_batch(docs)] == docs
    for s in ["héllo 😀 中文", "  two  spaces\n\n\tand tabs  ", "x²+y² ≤ ∞ — naïve café", ""]:
        assert tok.decode(tok.encode(s)) == s
    byte_ids = {tok.sp.piece_to_id(f"<0x{b:02X}>") for b in "😀".encode()}
    assert byte_ids <= set(tok.encode("😀"))
    assert all(len(tok.encode(str(n))) == len(str(n)) for n in (7, 42, 1234))  # digits are split


def test_ids_outside_the_vocabulary_decode_to_a_marker(tok):
    ids = tok.encode("hello world")
    n = tok.vocab_size
    assert tok.decode(ids) == "hello world"
    marked = tok.decode(ids[:1]) + f"<id {n + 3}>" + tok.decode(ids[1:])
    assert tok.decode(ids[:1] + [n + 3] + ids[1:]) == marked
    assert tok.decode([n, -1]) == f"<id {n}><id -1>"


def test_dropout_zero_limit_matches_sentencepiece(corpus, tok):
    docs = corpus[0][::4]
    assert tok.encode_batch(docs, dropout=1e-12, seed=0) == tok.encode_batch(docs)


def test_dropout_changes_segmentation_reproducibly(corpus, tok):
    docs = corpus[0][:200]
    plain = tok.encode_batch(docs)
    a = tok.encode_batch(docs, dropout=0.2, seed=5)
    assert a == tok.encode_batch(docs, dropout=0.2, seed=5)
    assert a != tok.encode_batch(docs, dropout=0.2, seed=6)
    assert [tok.decode(x) for x in a] == docs
    n_plain, n_drop = sum(map(len, plain)), sum(map(len, a))
    assert 1.05 * n_plain < n_drop < 2.0 * n_plain
    # Document i depends on (seed, i, text) only.
    assert tok.encode_batch(docs[:10], dropout=0.2, seed=5) == a[:10]
    assert tok.encode(docs[0], dropout=0.2, seed=9) == tok.encode(docs[0], dropout=0.2, seed=9)
    # dropout = 1 never merges: one piece per character (or its bytes).
    word = "statement"
    assert [tok.sp.id_to_piece(i) for i in tok.encode(word, dropout=1.0, seed=0)] == list(word)


def test_dropout_reproducible_in_another_process(corpus, tok, tmp_path):
    path = tmp_path / "m.model"
    path.write_bytes(tok.model_proto)
    code = (
        "import sys; from paddle_ernie5.tokenizers.text import TextTokenizer; "
        "t = TextTokenizer.load(sys.argv[1]); print(t.encode(sys.argv[2], dropout=0.3, seed=11))"
    )
    text = corpus[0][0]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), text],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
        env=env,
    )
    assert out.stdout.strip() == str(tok.encode(text, dropout=0.3, seed=11))


def test_cache_reuses_model_file(tmp_path):
    first = get_text_tokenizer(str(tmp_path), VOCAB, seed=0)
    files = sorted(os.listdir(tmp_path))
    assert (
        len(files) == 1 and files[0].startswith(f"text_bpe_v{VOCAB}_") and files[0].endswith(".npz")
    )
    stamp = os.stat(tmp_path / files[0]).st_mtime_ns
    second = get_text_tokenizer(str(tmp_path), VOCAB, seed=0)
    assert second.model_proto == first.model_proto
    assert (
        os.stat(tmp_path / files[0]).st_mtime_ns == stamp and sorted(os.listdir(tmp_path)) == files
    )
    get_text_tokenizer(str(tmp_path), VOCAB + 64, seed=0)
    assert len(os.listdir(tmp_path)) == 2


def test_corrupt_cached_tokenizer_is_retrained(tmp_path, capsys):
    from paddle_ernie5.data.text import get_text_tokenizer

    tok = get_text_tokenizer(str(tmp_path), 512)
    path = next(p for p in tmp_path.iterdir() if p.suffix == ".npz")
    path.write_bytes(path.read_bytes()[:100])
    again = get_text_tokenizer(str(tmp_path), 512)
    assert "is unreadable" in capsys.readouterr().err
    text = "def f(x): return x + 1"
    assert again.encode(text) == tok.encode(text)
    assert path.stat().st_size > 100
