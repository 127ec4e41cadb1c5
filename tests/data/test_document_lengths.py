"""A document longer than data.seq_len fails before training, not at the step that first draws it:
config validation counts the shortest picture document the vision settings make, and the mixture
loader measures each source's longest document when it is built."""

import numpy as np
import pytest
from vision_support import tiny_tokenizer, vision_config

from paddle_ernie5 import config as C
from paddle_ernie5.data import mixture
from paddle_ernie5.data import vision_sources as VS

ALL = [f"data.mixture.{s}=1" for s in ("image_gen", "image_qa", "video_gen", "video_qa")]


@pytest.fixture(scope="module")
def tok_dir(data_cache):
    return tiny_tokenizer(data_cache)


def _ctx(cfg, split="val"):
    from paddle_ernie5.data.loader import build_text_data

    tok, loader, _ = build_text_data(
        cfg.data.cache_dir, cfg.model.vocab_size, cfg.data.seq_len, 2, 0
    )
    return mixture.MixtureContext(cfg, tok, split, loader.docs_ids_fn(0))


def test_config_refuses_a_seq_len_shorter_than_a_picture(data_cache, tmp_path, tok_dir):
    # scales 1, 2, 4: an image is 21 tokens; with <bos> <boi> <eoi> the shortest image_gen
    # document has 24 positions.
    with pytest.raises(C.ConfigError) as e:
        vision_config(
            data_cache, str(tmp_path), tok_dir, "data.seq_len=23", "data.mixture.image_gen=1"
        )
    msg = str(e.value)
    assert "data.seq_len=23" in msg and ">= 24" in msg and "data.mixture.image_gen" in msg
    assert "\n" not in msg
    cfg = vision_config(
        data_cache, str(tmp_path), tok_dir, "data.seq_len=24", "data.mixture.image_gen=1"
    )
    # the count is the real shortest document: no caption
    ids = VS.special_ids(cfg.model.vocab_size, type("T", (), {"bos_id": 2, "eos_id": 3})())
    data = VS.encoded_digits(cfg, "image", "heldout")
    doc = VS.generation_document([], data.tokens[0], cfg.model.vision, "image", ids)
    assert sum(len(s) for s in doc) == 24
    for source in ("video_gen", "image_qa", "video_qa"):
        n, _ = cfg.model.vision.picture_positions(source)
        with pytest.raises(C.ConfigError, match=f"data.mixture.{source}"):
            vision_config(
                data_cache,
                str(tmp_path),
                tok_dir,
                f"data.seq_len={n - 1}",
                f"data.mixture.{source}=1",
            )


def test_longest_is_the_longest_document_each_source_makes(data_cache, tmp_path, tok_dir):
    cfg = vision_config(data_cache, str(tmp_path), tok_dir, *ALL)
    ctx = _ctx(cfg)
    for name in ("image_gen", "video_gen"):
        src = mixture.SOURCES[name](ctx)
        lens = [
            sum(
                len(s)
                for s in VS.generation_document(
                    src.caption_ids(int(i)), src.data.tokens[int(i)], src.v, src.kind, src.ids
                )
            )
            for i in src.index
        ]
        assert max(lens) == src.longest(), name
    for name in ("image_qa", "video_qa"):
        src = mixture.SOURCES[name](ctx)
        lens = []
        for i in range(len(src)):
            qa = [
                (src._ids(q), src._ids(" " + a))
                for q, a in VS.questions_of(src.kind, src.data.labels, i)
            ]
            doc = VS.qa_document(src.data.feats[i], *qa[-1], src.v, src.kind, src.ids, qa[:-1])
            lens.append(sum(len(s) for s in doc))
        assert max(lens) == src.longest(), name
        rng = np.random.default_rng(0)
        drawn = [sum(len(s) for s in src.document(i % len(src), rng)) for i in range(200)]
        assert max(drawn) <= src.longest()


def test_loader_refuses_a_seq_len_below_the_longest_document(data_cache, tmp_path, tok_dir):
    cfg = vision_config(data_cache, str(tmp_path), tok_dir, "data.mixture.image_qa=1")
    longest = mixture.SOURCES["image_qa"](_ctx(cfg)).longest()
    short = vision_config(
        data_cache,
        str(tmp_path),
        tok_dir,
        "data.mixture.image_qa=1",
        f"data.seq_len={longest - 1}",
    )
    assert short.data.seq_len >= short.model.vision.picture_positions("image_qa")[0]
    with pytest.raises(C.ConfigError) as e:
        mixture.MixtureLoader(_ctx(short), 2, seed=0)  # before any batch is drawn
    assert f"at least {longest}" in str(e.value) and "data.mixture.image_qa=0" in str(e.value)
    mixture.MixtureLoader(
        _ctx(C.replace(short, data=C.replace(short.data, seq_len=longest))), 2, seed=0
    ).batch_at(0)
