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


def test_temporal_context_is_the_previous_frames_neighbourhood_and_never_the_own_frame():
    from paddle_ernie5.model.vision import neighbour_index, previous_frame_context

    scales, r, bits = (1, 2, 4), 1, 3
    rng = np.random.default_rng(0)
    tokens = np.where(rng.random((3, 21, bits)) < 0.5, -1.0, 1.0)
    ctx = previous_frame_context(tokens, scales, r)
    assert ctx.shape == (3, 21, 9 * bits)
    np.testing.assert_array_equal(ctx[0], 0.0)
    # frame f, scale 4x4, cell (row 0, column 3), offset (dy, dx) = (-1, +1): frame f-1's cell
    # (3, 0) of that scale, wrapping round both edges
    lo, cell = 1 + 4, 0 * 4 + 3
    for f in (1, 2):
        np.testing.assert_array_equal(
            ctx[f, lo + cell].reshape(9, bits)[0 * 3 + 2], tokens[f - 1, lo + 3 * 4 + 0]
        )
    # the centre of every neighbourhood is the same cell; the 1x1 scale is its own neighbour
    np.testing.assert_array_equal(neighbour_index(scales, r)[:, 4], np.arange(21))
    np.testing.assert_array_equal(neighbour_index(scales, r)[0], np.zeros(9))
    # a frame shifted one cell right is read at offset (0, -1) of its context, at every scale
    grids = [tokens[0, 0:1], tokens[0, 1:5], tokens[0, 5:21]]
    moved = np.concatenate(
        [
            np.roll(g.reshape(s, s, bits), 1, axis=1).reshape(s * s, bits)
            for g, s in zip(grids, scales)
        ]
    )
    ctx2 = previous_frame_context(np.stack([tokens[0], moved]), scales, r)[1].reshape(21, 9, bits)
    np.testing.assert_array_equal(ctx2[:, 1 * 3 + 0], moved)
    # causal: frame f's own bits (and later ones) never reach its context
    changed = tokens.copy()
    changed[1] *= -1
    again = previous_frame_context(changed, scales, r)
    np.testing.assert_array_equal(again[:2], ctx[:2])
    assert not np.array_equal(again[2], ctx[2])
    # batched input: the same per clip
    np.testing.assert_array_equal(previous_frame_context(tokens[None], scales, r)[0], ctx)


def test_temporal_context_in_the_clips_documents_only_and_off_by_default(data_cache, folder):
    from paddle_ernie5.model.vision import previous_frame_context

    cfg = _cfg(
        data_cache, folder, "model.vision.temporal_context=1", "model.vision.frame_mask_prob=0.9"
    )
    v = cfg.model.vision
    assert v.temporal_context_width == 9 * v.bits
    data = VT.encoded_digits(cfg, "video", "train")
    clip = data.tokens[0]
    seg = VT.generation_segment(clip, v, "video", 5)
    scales = v.scales[: v.video_scales]
    want = previous_frame_context(clip.astype(np.float32), scales, 1).reshape(len(seg), -1)
    np.testing.assert_array_equal(seg.extras["vis_prev"], want)
    # a frame hidden from the later ones (frame_mask_prob) leaves the next frame no context
    per = v.tokens_per_video_frame
    for seed in range(20):
        masked = VT.generation_segment(clip, v, "video", 5, np.random.default_rng(seed))
        for f in range(1, v.video_frames):
            hidden = masked.horizon[(f - 1) * per] == f * per
            rows = masked.extras["vis_prev"][f * per : (f + 1) * per]
            assert (
                (rows == 0).all() if hidden else np.array_equal(rows, want[f * per : (f + 1) * per])
            )
    image = VT.encoded_digits(cfg, "image", "train").tokens[0]
    assert "vis_prev" not in VT.generation_segment(image, v, "image", 5).extras
    assert (
        "vis_prev"
        not in VT.generation_segment(clip, _cfg(data_cache, folder).model.vision, "video", 5).extras
    )
    assert _cfg(data_cache, folder).model.vision.temporal_context_width == 0
    with pytest.raises(C.ConfigError, match="temporal_context"):
        _cfg(data_cache, folder, "model.vision.temporal_context=3")  # latent side 4: at most 2


def test_sampling_with_temporal_context_feeds_the_generated_previous_frame(data_cache, folder):
    """The sampler gives frame f the generated frame f-1 as the training documents give the true
    one (teacher-forcing the sampled clip reproduces its greedy bits); the first frame has no
    context, so it does not depend on the context projection."""
    cfg = _cfg(
        data_cache, folder, "model.vision.temporal_context=1", "model.vision.cell_embedding=true"
    )
    v = cfg.model.vision
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    assert model.num_params() == count_params(cfg.model)["total"]
    emb = model.embed.by_modality["video"]
    assert model.embed.by_modality["image"].prev is None
    assert emb.prev.weight.shape == [v.temporal_context_width, cfg.model.hidden_size]
    model.eval()
    with paddle.no_grad():
        emb.prev.weight.set_value(paddle.zeros(emb.prev.weight.shape))
    prompt = PROMPTS.copy()
    prompt[:, -1] = IDS["<bov>"]
    without = sample_visual(model, prompt, "video", temperature=0.0)
    with paddle.no_grad():  # far from zero, so that a wrong context changes the bits
        emb.prev.weight.set_value(paddle.randn(emb.prev.weight.shape) * 0.5)
    _, tokens, rows = _greedy_refed(model, v, "video")
    np.testing.assert_array_equal(tokens[:, 0], without[:, 0])
    assert not np.array_equal(tokens[:, 1:], without[:, 1:])
    for row, (np_batch, where, logits) in enumerate(rows):
        assert np_batch["vis_prev"][0][where][: v.tokens_per_video_frame].max() == 0
        np.testing.assert_array_equal(
            np.where(logits[where] >= 0, 1.0, -1.0), tokens[row].reshape(-1, v.bits)
        )


def test_centred_clips_start_in_the_middle_and_keep_their_motion(data_cache, folder):
    rng = np.random.default_rng(0)
    blob = np.zeros((16, 16), np.float32)
    blob[:5, :4] = rng.random((5, 4)) * 0.5 + 0.5
    fg, bg = np.array([COLOUR_PAIRS[3][0]] * 6), np.array([COLOUR_PAIRS[3][1]] * 6)
    clips, steps = [], [(0, -1), (0, 2), (-1, 0), (2, 0), (0, 1), (1, 0)]
    for dy, dx in steps:
        y0, x0 = (int(t) for t in rng.integers(0, 16, 2))
        ink = np.stack([np.roll(blob, (y0 + dy * t, x0 + dx * t), (0, 1)) for t in range(3)])
        clips.append(
            ink[:, None] * PALETTE[fg[0]][:, None, None]
            + (1 - ink[:, None]) * PALETTE[bg[0]][:, None, None]
        )
    clips = np.stack(clips).astype(np.float32)
    out = VT.centre_clips(clips, fg, bg)
    ink = VT.ink_maps(out, fg, bg)
    rows = (ink[:, 0].sum(2) * np.arange(16)).sum(1) / ink[:, 0].sum((1, 2))
    cols = (ink[:, 0].sum(1) * np.arange(16)).sum(1) / ink[:, 0].sum((1, 2))
    assert np.abs(rows - 7.5).max() <= 0.5 and np.abs(cols - 7.5).max() <= 0.5
    for i, (dy, dx) in enumerate(steps):  # every frame rolled alike: the motion is the same
        np.testing.assert_array_equal(out[i, 1], np.roll(out[i, 0], (dy, dx), (-2, -1)))
        assert any(  # and each clip is a roll of the one it came from
            np.array_equal(np.roll(clips[i], (a, b), (-2, -1)), out[i])
            for a in range(16)
            for b in range(16)
        )
    # the sources: only caption -> clip documents read the centred clips; labels stay in order
    cfg = _cfg(data_cache, folder, "model.vision.centre_clips=true")
    ctx = _ctx(cfg)
    gen, qa = mixture.SOURCES["video_gen"](ctx), mixture.SOURCES["video_qa"](ctx)
    raw = VT.encoded_digits(cfg, "video", "train")
    np.testing.assert_array_equal(qa.data.tokens, raw.tokens)
    assert gen.data.tokens.shape == raw.tokens.shape and not np.array_equal(
        gen.data.tokens, raw.tokens
    )
    for k in raw.labels:
        np.testing.assert_array_equal(gen.data.labels[k], raw.labels[k])
    plain = mixture.SOURCES["video_gen"](_ctx(_cfg(data_cache, folder)))
    np.testing.assert_array_equal(plain.data.tokens, raw.tokens)
