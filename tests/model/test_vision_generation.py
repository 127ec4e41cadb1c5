"""Generation-side options of vision in the backbone: the cell embedding (model.vision.
cell_embedding), the shape head (shape_loss_weight) and generated clips of fewer frames than the
understood ones (video_frames, video_qa_frames); debug model, random tiny tokenizer."""

import numpy as np
import paddle
import pytest
from vision_support import tiny_tokenizer, vision_config

from paddle_ernie5 import config as C
from paddle_ernie5.data import mixture
from paddle_ernie5.data import vision_sources as VT
from paddle_ernie5.data.digits import COLOUR_PAIRS, PALETTE, digit_images
from paddle_ernie5.data.multimodal import pack_segments
from paddle_ernie5.model.inputs import to_model_batch
from paddle_ernie5.model.losses import compute_loss
from paddle_ernie5.model.model import Ernie5Model
from paddle_ernie5.model.params import count_params
from paddle_ernie5.model.vision_sampling import sample_visual

IDS = {"<boi>": 512, "<eoi>": 513, "<bov>": 514, "<eov>": 515, "bos": 2, "eos": 3}
MIXTURE = ("data.mixture.image_gen=1", "data.mixture.video_gen=1", "data.mixture.video_qa=1")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vision_gen"))
    tiny_tokenizer(path)
    return path


def _cfg(data_cache, folder, *overrides):
    return vision_config(
        data_cache, folder + "/run", folder + "/visual_tokenizer", *MIXTURE, *overrides
    )


def _ctx(cfg):
    from paddle_ernie5.data.loader import build_text_data

    tok, loader, _ = build_text_data(
        cfg.data.cache_dir, cfg.model.vocab_size, cfg.data.seq_len, 2, 0
    )
    return mixture.MixtureContext(cfg, tok, "train", loader.docs_ids_fn(0))


PROMPTS = np.array([[2, 40, 41, 0], [2, 50, 51, 0]])  # <bos>, two caption tokens, the open tag


def _greedy_refed(model, v, kind):
    """Greedy tokens the sampler draws for PROMPTS, and per row the packed training document of
    those tokens (the same caption) with its generation positions and teacher-forced bit logits."""
    prompt = PROMPTS.copy()
    prompt[:, -1] = IDS["<boi>" if kind == "image" else "<bov>"]
    tokens = sample_visual(model, prompt, kind, temperature=0.0)
    rows = []
    for row in range(len(prompt)):
        doc = VT.generation_document(
            prompt[row, 1:-1].tolist(), tokens[row].astype(np.int8), v, kind, IDS
        )
        np_batch = pack_segments([doc], sum(len(s) for s in doc))
        logits = (
            model(to_model_batch(np_batch), with_mtp=False).extra["visual"]["logits"].numpy()[0]
        )
        rows.append((np_batch, np_batch["vis_scale"][0] > 0, logits))
    return prompt, tokens, rows


def test_ink_maps_recover_the_painted_ink_and_cell_shares_average_it(data_cache):
    rng = np.random.default_rng(0)
    ink = rng.random((6, 2, 8, 8)).astype(np.float32)
    pairs = np.array([COLOUR_PAIRS[i] for i in rng.integers(len(COLOUR_PAIRS), size=6)])
    fg, bg = pairs[:, 0], pairs[:, 1]
    a = ink[:, :, None]
    pixels = a * PALETTE[fg][:, None, :, None, None] + (1 - a) * PALETTE[bg][:, None, :, None, None]
    np.testing.assert_allclose(VT.ink_maps(pixels, fg, bg), ink, atol=1e-5)
    shares = VT.cell_shares(ink, (1, 2, 4))
    assert shares.shape == (6, 2, 1 + 4 + 16)
    np.testing.assert_allclose(shares[..., 0], ink.mean(axis=(2, 3)), atol=1e-6)
    # scale 2x2, cell (1, 0): rows 4-7, columns 0-3
    np.testing.assert_allclose(shares[..., 1 + 2], ink[:, :, 4:, :4].mean(axis=(2, 3)), atol=1e-6)
    np.testing.assert_allclose(shares[..., 5 + 4 * 3 + 1], ink[:, :, 6:, 2:4].mean(axis=(2, 3)))
    # the built-in digits: ink recovered from the quantised pixels within 8-bit rounding
    d = digit_images("train", size=8, cache_dir=data_cache, copies=1)
    ink_d = VT.ink_maps(d.pixels[:50, None], d.labels["fg"][:50], d.labels["bg"][:50])
    again = (
        ink_d[:, 0, None] * PALETTE[d.labels["fg"][:50]][:, :, None, None]
        + (1 - ink_d[:, 0, None]) * PALETTE[d.labels["bg"][:50]][:, :, None, None]
    )
    assert np.abs(again - d.pixels[:50]).max() < 0.02


@pytest.mark.parametrize("kind", ["image", "video"])
def test_sampling_with_cell_embedding_matches_a_full_forward(data_cache, folder, kind):
    """The sampler gives every scale the cells the training documents give it: teacher-forcing the
    sampled tokens reproduces its greedy bits."""
    cfg = _cfg(data_cache, folder, "model.vision.cell_embedding=true")
    v = cfg.model.vision
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    assert model.num_params() == count_params(cfg.model)["total"]
    table = model.embed.by_modality[kind].cell.weight
    assert table.shape[0] == v.generation_cells(kind)
    with paddle.no_grad():  # a table far from zero, so that a wrong cell changes the bits
        table.set_value(paddle.randn(table.shape) * 0.5)
    model.eval()
    _, tokens, rows = _greedy_refed(model, v, kind)
    for row, (np_batch, where, logits) in enumerate(rows):
        assert np_batch["vis_cell"][0][where].tolist() == list(range(v.generation_cells(kind)))
        np.testing.assert_array_equal(
            np.where(logits[where] >= 0, 1.0, -1.0), tokens[row].reshape(-1, v.bits)
        )


def test_shape_head_targets_the_cells_ink_and_learns_it(data_cache, folder):
    cfg = _cfg(
        data_cache,
        folder,
        "model.vision.cell_embedding=true",
        "model.vision.shape_loss_weight=0.5",
        "model.vision.bit_flip_prob=0.0",
    )
    ctx = _ctx(cfg)
    source = mixture.SOURCES["image_gen"](ctx)
    assert source.shape.shape == (len(source.data), 1, cfg.model.vision.tokens_per_image)
    docs = [source.document(i, np.random.default_rng(i)) for i in range(4)]
    for i, doc in enumerate(docs):
        want = source.shape[int(source.index[i])].reshape(-1)
        np.testing.assert_array_equal(doc[1].extras["vis_shape"], want)
    assert 0 < float(source.shape.max()) <= 1 and float(source.shape.min()) >= 0
    video = mixture.SOURCES["video_gen"](ctx)
    v = cfg.model.vision
    assert video.shape.shape == (len(video.data), v.video_frames, v.tokens_per_video_frame)
    batch = to_model_batch(pack_segments(docs, 64))
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    out = model(batch)
    heads = model.head_losses(out, batch)
    assert set(heads) == {"image_bits", "image_shape"} and heads["image_shape"][2] == 0.5
    sel = (batch["vis_scale"].numpy() > 0) & (batch["token_types"].numpy() == 1)
    pred = out.extra["visual"]["shape"].numpy()
    want = ((pred - batch["vis_shape"].numpy()) ** 2)[sel].mean()
    np.testing.assert_allclose(float(heads["image_shape"][0]), want, rtol=1e-5)
    total = compute_loss(out, batch["labels"], cfg.model, heads).total
    bits_only = compute_loss(
        out, batch["labels"], cfg.model, {"image_bits": heads["image_bits"]}
    ).total
    np.testing.assert_allclose(
        float(total) - float(bits_only), 0.5 * float(heads["image_shape"][0]), rtol=1e-4
    )
    opt = paddle.optimizer.Adam(3e-3, parameters=model.parameters())
    losses = []
    for _ in range(12):
        loss = model.head_losses(model(batch), batch)["image_shape"][0]
        loss.backward()
        opt.step()
        opt.clear_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    # off by default: no head, no targets, the same loss entries as before
    plain = _cfg(data_cache, folder)
    assert Ernie5Model(plain.model).heads["visual"].shape is None
    assert VT.generation_segment(
        source.data.tokens[0], plain.model.vision, "image", 5
    ).extras.keys() == {"vis_in", "vis_target", "vis_scale"}


def test_generated_clips_may_have_fewer_frames_than_understood_ones(data_cache, folder):
    cfg = _cfg(data_cache, folder, "model.vision.video_frames=2", "model.vision.video_qa_frames=4")
    v = cfg.model.vision
    assert v.qa_frames == 4 and v.merged_places("video") == (4 // v.merge_frames) * 4
    data = VT.encoded_digits(cfg, "video", "train")
    assert data.tokens.shape[1:3] == (2, v.tokens_per_video_frame)
    assert data.feats.shape[1] == 4
    # the tokenizer is causal in time: the 2 frames code as the first 2 of 4 frames do
    four = VT.encoded_digits(_cfg(data_cache, folder), "video", "train")
    np.testing.assert_array_equal(data.tokens, four.tokens[:, :2])
    np.testing.assert_array_equal(data.feats, four.feats)
    assert v.picture_positions("video_gen")[0] == 3 + 2 * v.tokens_per_video_frame
    assert v.picture_positions("video_qa")[0] == 6 + v.merged_places("video")
    with pytest.raises(C.ConfigError, match="merge_frames"):
        _cfg(data_cache, folder, "model.vision.video_frames=2")  # merge_frames 4 needs 4 frames
    with pytest.raises(C.ConfigError, match="video_qa_frames"):
        _cfg(data_cache, folder, "model.vision.video_qa_frames=-1")


def test_caption_heads_target_the_captions_digit_and_direction_where_it_was_given(
    data_cache, folder
):
    cfg = _cfg(
        data_cache,
        folder,
        "model.vision.caption_loss_weight=0.3",
        "model.vision.cond_drop_prob=0.5",
        "model.vision.bit_flip_prob=0.0",
    )
    ctx = _ctx(cfg)
    docs, want = [], []
    for kind in ("image", "video"):
        source = mixture.SOURCES[f"{kind}_gen"](ctx)
        lab = source.data.labels
        for n in range(6):
            doc = source.document(n, np.random.default_rng(n))
            i = int(source.index[n])
            got = doc[1].extras["vis_caption"]
            assert got.shape == (len(doc[1]), 2) and (got == got[0]).all()
            if len(doc[0]) == 2:  # <bos> <boi|bov>: the caption was dropped
                assert got[0].tolist() == [0, 0]
            else:
                direction = int(lab["direction"][i]) + 1 if kind == "video" else 0
                assert got[0].tolist() == [int(lab["digit"][i]) + 1, direction]
            docs.append(doc)
            want.append(got[0])
    assert {int(w[0] == 0) for w in want} == {0, 1}  # some captions dropped, some kept
    batch = to_model_batch(pack_segments(docs, 512))
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    assert model.num_params() == count_params(cfg.model)["total"]
    out = model(batch)
    heads = model.head_losses(out, batch)
    assert {"image_caption_digit", "video_caption_digit", "video_caption_direction"} <= set(heads)
    assert "image_caption_direction" not in heads and heads["image_caption_digit"][2] == 0.3
    # the digit loss from its definition: mean -log p(digit) over captioned image positions
    logits = out.extra["visual"]["caption"].numpy()[..., :10]
    target = batch["vis_caption"].numpy()[..., 0]
    sel = (batch["vis_scale"].numpy() > 0) & (batch["token_types"].numpy() == 1) & (target > 0)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.clip(target - 1, 0, None)[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(heads["image_caption_digit"][0]), nll[sel].mean(), rtol=1e-4)
    assert float(heads["image_caption_digit"][1]) == sel.sum()
    compute_loss(out, batch["labels"], cfg.model, heads).total.backward()
    assert float(model.heads["visual"].caption.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("kind", ["image", "video"])
def test_pooled_caption_is_the_mean_of_its_words_and_the_sampler_gives_the_prompts(
    data_cache, folder, kind
):
    cfg = _cfg(data_cache, folder, "model.vision.caption_pooling=6")
    v = cfg.model.vision
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    assert model.num_params() == count_params(cfg.model)["total"]
    emb = model.embed.by_modality[kind]
    table = emb.words.weight.numpy()
    rows = np.array([[41, 42, 0, 0, 0, 0], [0] * 6, [7, 7, 9, 1, 2, 3]])
    got = emb.pooled_caption(paddle.to_tensor(rows[None])).numpy()[0]
    np.testing.assert_allclose(got[0], table[[41, 42]].mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(got[1], np.zeros_like(got[1]))
    np.testing.assert_allclose(got[2], table[rows[2]].mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(VT.caption_row([40, 41], 4), [41, 42, 0, 0])
    with pytest.raises(ValueError, match="caption_pooling"):
        VT.caption_row(list(range(7)), 6)
    # the sampler pools the prompt's caption as the training documents do: teacher-forcing its
    # greedy tokens reproduces them, and another caption changes them
    model.eval()
    prompt, tokens, rows = _greedy_refed(model, v, kind)
    for row, (np_batch, where, logits) in enumerate(rows):
        assert (np_batch["vis_prompt"][0][where] == VT.caption_row(prompt[row, 1:-1], 6)).all()
        np.testing.assert_array_equal(
            np.where(logits[where] >= 0, 1.0, -1.0), tokens[row].reshape(-1, v.bits)
        )
    with paddle.no_grad():  # only the pooled table changes: the bits follow the caption's words
        emb.words.weight.set_value(paddle.randn(emb.words.weight.shape) * 3.0)
    assert not np.array_equal(sample_visual(model, prompt, kind, temperature=0.0), tokens)
