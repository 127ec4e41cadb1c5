"""Vision in the backbone: token layout, block-causal masks, embeddings, the bit head, the patch
merger, next-scale training and sampling (debug model, randomly initialised tiny tokenizer)."""

from contextlib import nullcontext

import numpy as np
import paddle
import pytest
from vision_support import tiny_tokenizer, vision_config

from paddle_ernie5 import config as C
from paddle_ernie5.data import mixture
from paddle_ernie5.data import vision_sources as VT
from paddle_ernie5.data.multimodal import pack_segments
from paddle_ernie5.model.inputs import to_model_batch
from paddle_ernie5.model.losses import compute_loss
from paddle_ernie5.model.model import Ernie5Model
from paddle_ernie5.model.params import count_params
from paddle_ernie5.model.vision import (
    frame_layout,
    generation_positions,
    history_bits,
    parent_index,
)
from paddle_ernie5.model.vision_sampling import decode_tokens, sample_visual, tokens_to_codes
from paddle_ernie5.ops.masks import to_dense
from paddle_ernie5.tokenizers.visual import VisualTokenizer, codes_to_ids, ids_to_codes

IDS = {"<boi>": 512, "<eoi>": 513, "<bov>": 514, "<eov>": 515, "bos": 2, "eos": 3}


@pytest.fixture(scope="module")
def setup(data_cache, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("vision"))
    tok_dir = tiny_tokenizer(folder)
    cfg = vision_config(
        data_cache,
        folder + "/run",
        tok_dir,
        "data.mixture.image_gen=1",
        "data.mixture.image_qa=1",
        "data.mixture.video_gen=1",
        "data.mixture.video_qa=1",
    )
    return cfg, VisualTokenizer.load(tok_dir)


def _ctx(cfg):
    from paddle_ernie5.data.loader import build_text_data

    tok, loader, _ = build_text_data(
        cfg.data.cache_dir, cfg.model.vocab_size, cfg.data.seq_len, 2, 0
    )
    return mixture.MixtureContext(cfg, tok, "train", loader.docs_ids_fn(0))


def _block_causal(doc_lens, blocks, horizon=None):
    """The dense mask from its definition: same document, and (earlier, or same block), and not past
    the position's horizon."""
    n = sum(doc_lens)
    doc = np.repeat(np.arange(len(doc_lens)), doc_lens)
    want = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(n):
            same_block = blocks[i] >= 0 and blocks[i] == blocks[j]
            seen = horizon is None or horizon[j] < 0 or i < horizon[j]
            want[i, j] = doc[i] == doc[j] and (j <= i or same_block) and seen
    return want


def test_tokens_codes_ids_round_trip_bit_exactly_through_the_tokenizer(setup):
    cfg, tok = setup
    rng = np.random.default_rng(0)
    frames = rng.random((3, 2, 3, 8, 8)).astype(np.float32)
    tokens, _ = VT.encode_frames(tok, frames, len(tok.cfg.scales))
    _, codes = tok.encode(frames)
    again = tokens_to_codes(tokens.astype(np.float32), tok.cfg.scales)
    for a, b in zip(again, codes):
        np.testing.assert_array_equal(a, b.numpy())
        ids = codes_to_ids(a)
        assert ids.max() < 2**tok.cfg.bits
        np.testing.assert_array_equal(ids_to_codes(ids, tok.cfg.bits), a)
    # decoding our tokens gives exactly what decoding the tokenizer's own codes gives
    np.testing.assert_allclose(
        decode_tokens(tok, tokens.astype(np.float32), tok.cfg.scales),
        np.clip(tok.decode(codes).numpy(), 0, 1),
        atol=1e-6,
    )


def test_layout_parents_history_and_centre_aligned_positions():
    scales = (1, 2, 4)
    k, r, c = frame_layout(scales)
    assert len(k) == 21 and k.tolist().count(2) == 16
    np.testing.assert_array_equal(
        parent_index(scales, 2).reshape(4, 4),
        [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]],
    )
    tokens = np.arange(21 * 2, dtype=np.float32).reshape(1, 21, 2)
    hist = history_bits(tokens, scales)
    np.testing.assert_array_equal(hist[0, 0], 0)
    np.testing.assert_array_equal(hist[0, 1:5], np.repeat(tokens[0, :1], 4, 0))
    # cell (3, 3) <- parent (1, 1)
    np.testing.assert_array_equal(hist[0, 5 + 4 * 3 + 3], tokens[0, 1 + 3])
    pos = generation_positions(scales, 4, 2, start=10)
    # every scale of a frame has the same centre (10 + 3, 10 + 3) in doubled latent units
    for s0, s1 in ((0, 1), (1, 5), (5, 21)):
        assert pos[1, s0:s1].mean() == 13 and pos[2, s0:s1].mean() == 13
    np.testing.assert_array_equal(pos[0], [10] * 21 + [11] * 21)


def test_multi_scale_image_mask_equals_the_dense_block_causal_mask(setup):
    cfg, _ = setup
    v = cfg.model.vision
    tokens = np.sign(np.random.default_rng(1).standard_normal((1, 21, 4))).astype(np.int8)
    doc = VT.generation_document([7, 8, 9], tokens, v, "image", IDS)
    qa = VT.qa_document(np.zeros((1, 4, 4, 4), np.float16), [20, 21], [22], v, "image", IDS)
    batch = pack_segments([doc, qa], seq_len=64)
    n_doc, n_qa = sum(len(s) for s in doc), sum(len(s) for s in qa)
    # image: <bos> 3 caption <boi> | scales of 1, 4, 16 | <eoi>; QA: <bos> <boi> | 4 patches | tail
    blocks = np.concatenate(
        [[-1] * 5, [0], [1] * 4, [2] * 16, [-1], [-1] * 2, [3] * 4, [-1] * (n_qa - 6)]
    )
    got = to_dense(batch["startend_row_indices"][0, 0], causal=False)
    n = n_doc + n_qa
    np.testing.assert_array_equal(got[:n, :n], _block_causal([n_doc, n_qa], blocks))
    assert not got[n:, :].any() and not got[:, n:].any()  # padding sees and is seen by nothing
    assert batch["vis_scale"][0, :n_doc].tolist() == [0] * 5 + [1] + [2] * 4 + [3] * 16 + [0]
    labels = batch["labels"][0]
    # caption -> <boi>; no text loss on bits
    assert labels[3] == IDS["<boi>"] and (labels[4:n_doc] == -100).all()
    qa_labels = labels[n_doc:n]
    assert (qa_labels >= 0).sum() == 2 and qa_labels[qa_labels >= 0].tolist() == [22, IDS["eos"]]


def test_video_window_and_masked_frames_give_the_dense_mask_of_their_definition(setup):
    cfg, _ = setup
    v = C.replace(cfg.model.vision, temporal_window=1, frame_mask_prob=0.5)
    tokens = np.ones((4, 5, 4), np.int8)
    rng = np.random.default_rng(3)
    seg = VT.generation_segment(tokens, v, "video", 0, rng)
    h = seg.horizon.reshape(4, 5)[:, 0]
    # frame g is hidden from frame g + 2 on (window 1) or from frame g + 1 on (masked);
    # the last frame never is
    assert h[3] == -1 and all(
        x in (5 * (g + 1), 5 * (g + 2)) or (x == -1 and g >= 2) for g, x in enumerate(h[:3])
    )
    batch = pack_segments([[seg]], seq_len=24)
    blocks = np.repeat(np.arange(8), [1, 4] * 4)
    got = to_dense(batch["startend_row_indices"][0, 0], causal=False)[:20, :20]
    np.testing.assert_array_equal(got, _block_causal([20], blocks, seg.horizon))
    assert not got[15:, :5].any()  # frame 3 never sees frame 0 (window 1)


def test_config_counts_and_validation(setup):
    cfg, _ = setup
    model = Ernie5Model(cfg.model)
    assert model.num_params() == count_params(cfg.model)["total"]
    for bad in (
        "model.vision.video_scales=4",
        "model.vision.merge=3",
        "model.vision.bit_flip_prob=0.7",
        "model.vision.scale_loss_weights=[1.0]",
    ):
        with pytest.raises(C.ConfigError, match=bad.split("=")[0]):
            C.load_config(
                "recipes/debug.yaml",
                ["model.modalities=[text,image,video]", "model.vision.scales=[1,2,4]", bad],
            )


def _mixture_batch(cfg, seed=0, rows=4):
    loader = mixture.MixtureLoader(_ctx(cfg), rows, seed=seed)
    return loader, loader.batch_at(0)


def test_embeddings_heads_and_merger_forward_backward_on_a_mixture_batch(setup):
    cfg, _ = setup
    loader, np_batch = _mixture_batch(cfg, seed=2)  # a first batch that holds every source
    assert set(loader.last_sources) >= {"image_gen", "image_qa", "video_gen", "video_qa"}
    for key in ("vis_in", "vis_target", "vis_scale", "image_patches", "video_patches"):
        assert key in np_batch, key
    assert np_batch["image_patches"].shape[2:] == (4, 4) and np_batch["video_patches"].shape[
        2:
    ] == (16, 4)
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    batch = to_model_batch(np_batch)
    out = model(batch)
    heads = model.head_losses(out, batch)
    assert set(heads) == {"image_bits", "video_bits"}
    for loss, count, _ in heads.values():
        assert 0.5 < float(loss) < 1.0 and float(count) > 0  # about log 2 per bit at initialisation
    parts = compute_loss(out, batch["labels"], cfg.model, heads)
    parts.total.backward()
    for name in ("image", "video"):
        emb = model.embed.by_modality[name]
        for p in (emb.bits.weight, emb.scale.weight, emb.merger.qkv.weight, emb.merger.out.weight):
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    head = model.heads["visual"]
    assert float(head.net[0].weight.grad.abs().sum()) > 0
    # A text-only batch through the same model: no visual loss, embeddings step aside.
    text = {k: v for k, v in np_batch.items() if not k.startswith(("vis_", "image_", "video_"))}
    text["token_types"] = np.zeros_like(text["token_types"])
    assert model.head_losses(model(to_model_batch(text)), to_model_batch(text)) == {}


def test_merger_runs_only_where_merged_tokens_are_read(setup):
    """The merger runs on the understanding positions only; the model's input embeddings equal those
    of merging every position (the other positions take another embedding either way)."""
    cfg, _ = setup
    _, np_batch = _mixture_batch(cfg)
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    model.eval()
    batch = to_model_batch(np_batch)
    got = model.embed(batch).numpy()
    for name in ("image", "video"):
        emb = model.embed.by_modality[name]
        rows = emb._understanding_rows(batch)
        assert 0 < rows.shape[0] < batch["token_types"].size  # some positions, not all
        emb._understanding_rows = lambda b: None  # merge every position
    want = model.embed(batch).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_patch_merger_understanding_path_learns_the_answer(setup):
    cfg, _ = setup
    ctx = _ctx(cfg)
    source = mixture.SOURCES["image_qa"](ctx)
    docs = [source.document(i, np.random.default_rng(i)) for i in range(6)]
    np_batch = pack_segments(docs, 96)
    assert "vis_in" not in np_batch and (np_batch["token_types"] == 1).sum() == 6 * 4
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    batch = to_model_batch(np_batch)
    opt = paddle.optimizer.Adam(3e-3, parameters=model.parameters())
    losses = []
    for _ in range(6):
        out = model(batch)
        parts = compute_loss(out, batch["labels"], cfg.model, model.head_losses(out, batch))
        parts.total.backward()
        merger = model.embed.by_modality["image"].merger
        assert float(merger.slot.grad.abs().sum()) > 0
        opt.step()
        opt.clear_grad()
        losses.append(float(parts.text))
    assert losses[-1] < losses[0] - 0.5


def test_next_scale_loss_on_a_fixed_batch_decreases(setup):
    cfg, _ = setup
    cfg = C.replace(
        cfg, model=C.replace(cfg.model, vision=C.replace(cfg.model.vision, bit_flip_prob=0.0))
    )
    ctx = _ctx(cfg)
    source = mixture.SOURCES["image_gen"](ctx)
    docs = [source.document(i, np.random.default_rng(i)) for i in range(4)]
    batch = to_model_batch(pack_segments(docs, 64))
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    opt = paddle.optimizer.Adam(3e-3, parameters=model.parameters())
    losses = []
    for _ in range(16):
        out = model(batch)
        loss = model.head_losses(out, batch)["image_bits"][0]
        loss.backward()
        opt.step()
        opt.clear_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.85 * losses[0] and losses[-1] < min(losses[:4]), losses


def test_bit_flips_corrupt_history_inputs_only_in_training(setup):
    cfg, _ = setup
    cfg = C.replace(
        cfg, model=C.replace(cfg.model, vision=C.replace(cfg.model.vision, bit_flip_prob=0.3))
    )
    model = Ernie5Model(cfg.model)
    emb = model.embed.by_modality["image"]
    bits = np.sign(np.random.default_rng(0).standard_normal((2, 50, 4))).astype(np.float32)
    batch = {"vis_in": paddle.to_tensor(bits), "vis_scale": paddle.ones([2, 50], "int64")}
    emb.eval()
    np.testing.assert_array_equal(emb(batch).numpy(), emb(batch).numpy())
    emb.train()
    paddle.seed(1)
    a = emb(batch).numpy()
    clean = emb.bits(paddle.to_tensor(bits)).numpy() + emb.scale(batch["vis_scale"]).numpy()
    changed = np.abs(a - clean).max(-1) > 1e-6
    assert 0.4 < changed.mean() < 0.95  # P(some of 4 bits flipped) = 1 - 0.7^4 = 0.76


@pytest.mark.parametrize("kind", ["image", "video"])
def test_sampling_gives_valid_tokens_that_a_full_forward_reproduces_and_decodes(setup, kind):
    cfg, tok = setup
    v = cfg.model.vision
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    model.eval()
    open_id = IDS["<boi>" if kind == "image" else "<bov>"]
    prompt = np.array([[2, 40, 41, open_id], [2, 50, 51, open_id]])
    uncond = np.array([[2, open_id]])
    tokens = sample_visual(model, prompt, kind, uncond_BP=uncond, cfg_scale=1.0, temperature=0.0)
    frames = 1 if kind == "image" else v.video_frames
    per_frame = v.tokens_per_image if kind == "image" else v.tokens_per_video_frame
    assert tokens.shape == (2, frames, per_frame, v.bits) and set(np.unique(tokens)) <= {-1.0, 1.0}
    # Teacher-forcing the sampled tokens through one full block-causal forward gives the same
    # greedy bits: the cached scale-by-scale sampling and the training mask agree.
    for row in range(2):
        doc = VT.generation_document(
            prompt[row, 1:-1].tolist(), tokens[row].astype(np.int8), v, kind, IDS
        )
        np_batch = pack_segments([doc], sum(len(s) for s in doc))
        logits = (
            model(to_model_batch(np_batch), with_mtp=False).extra["visual"]["logits"].numpy()[0]
        )
        where = np_batch["vis_scale"][0] > 0
        np.testing.assert_array_equal(
            np.where(logits[where] >= 0, 1.0, -1.0), tokens[row].reshape(-1, v.bits)
        )
    sampled = sample_visual(
        model, prompt, kind, uncond_BP=uncond, cfg_scale=3.0, temperature=1.0, seed=1
    )
    assert set(np.unique(sampled)) == {-1.0, 1.0}
    scales = v.scales if kind == "image" else v.scales[: v.video_scales]
    images = decode_tokens(tok, sampled, scales)
    assert images.shape == (2, frames, 3, 8, 8) and images.min() >= 0 and images.max() <= 1


def test_qa_documents_with_several_questions_target_every_answer_and_eos_only(setup):
    cfg, _ = setup
    doc = VT.qa_document(
        np.zeros((1, 4, 4, 4), np.float16),
        [30, 31],
        [32],
        cfg.model.vision,
        "image",
        IDS,
        earlier=[([40], [41, 42])],
    )
    tail = doc[-1]
    assert tail.input_ids.tolist() == [IDS["<eoi>"], 40, 41, 42, 30, 31, 32, IDS["eos"]]
    assert tail.labels.tolist() == [-100, 41, 42, -100, -100, 32, IDS["eos"], -100]
    assert (doc[0].labels == -100).all() and doc[1].labels is None


def test_merged_tokens_carry_their_place_in_the_picture(setup):
    """merger_position / merger_place_projection: each merged group gets the embedding (and
    projection) of its (frame group, row, column) index, so the same groups in another order give
    different inputs; both off, only the order of tokens changes."""
    cfg, _ = setup
    v = cfg.model.vision
    latent = v.scales[-1]
    feats = np.random.default_rng(0).normal(size=(1, v.bits, latent, latent)).astype(np.float32)
    seg = VT.merged_segment(feats, v, "image", 2)
    n = v.merged_places("image")
    np.testing.assert_array_equal(seg.extras[VT.PATCH_INDEX_KEY], np.arange(n))
    for on in (True, False):
        model = Ernie5Model(
            C.replace(
                cfg.model, vision=C.replace(v, merger_position=on, merger_place_projection=on)
            )
        )
        model.eval()
        emb = model.embed.by_modality["image"]
        groups = paddle.to_tensor(seg.extras[VT.FEATURE_KEY["image"]][None])
        index = paddle.to_tensor(seg.extras[VT.PATCH_INDEX_KEY][None])
        order = np.roll(np.arange(n), 1)
        a = emb({VT.FEATURE_KEY["image"]: groups, VT.PATCH_INDEX_KEY: index}).numpy()[0]
        b = emb(
            {
                VT.FEATURE_KEY["image"]: paddle.gather(groups, paddle.to_tensor(order), axis=1),
                VT.PATCH_INDEX_KEY: index,
            }
        ).numpy()[0]
        same_set = np.allclose(a[order], b, atol=1e-6)
        assert same_set != on  # with places, moving a group changes its token
        big = np.zeros((1, v.bits, 2 * latent, 2 * latent), np.float32)  # 4x the table's groups
        with pytest.raises(ValueError, match="merged groups") if on else nullcontext():
            VT.merged_segment(
                big, C.replace(v, merger_position=on, merger_place_projection=on), "image", 2
            )


def test_place_projection_gives_each_place_its_own_map(setup):
    """merger_place_projection: the token of a group at place p is out(pooled) + pooled @ W_p, so
    the mean over a picture's tokens is one linear map of all its groups (checked against a
    loop)."""
    cfg, _ = setup
    v = cfg.model.vision
    paddle.seed(1)
    merger = Ernie5Model(cfg.model).embed.by_modality["image"].merger
    places = v.merged_places("image")
    assert merger.places == places
    groups = paddle.randn([6, v.merge**2, v.bits])
    index = paddle.to_tensor([0, 3, places - 1, 3, 1, 2])
    got = merger(groups, index).numpy()
    plain = Ernie5Model(C.replace(cfg.model, vision=C.replace(v, merger_place_projection=False)))
    assert plain.embed.by_modality["image"].merger.place_proj is None
    merger.place_proj, proj = None, merger.place_proj  # the same weights without the projection
    base = merger(groups).numpy()
    w = proj.weight.numpy().reshape(places, v.merger_width, -1)
    x = merger.inp(groups) + merger.slot  # recompute the pooled group by hand
    q, k, val = (
        merger.qkv(merger.norm1(x))
        .reshape([6, -1, 3, merger.heads, v.merger_width // merger.heads])
        .transpose([2, 0, 3, 1, 4])
    )
    att = paddle.nn.functional.softmax(
        paddle.matmul(q, k, transpose_y=True) * q.shape[-1] ** -0.5, -1
    )
    x = x + merger.proj(
        paddle.matmul(att, val).transpose([0, 2, 1, 3]).reshape([6, -1, v.merger_width])
    )
    pooled = (x + merger.mlp(merger.norm2(x))).mean(1).numpy()
    want = base + np.stack([pooled[i] @ w[int(p)] for i, p in enumerate(index.numpy())])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_video_merger_sees_each_patch_change_since_the_previous_frame(setup):
    """merger_motion: a video group's patches [frames x cells, K] enter the merger with their
    difference from the same cell one frame earlier (zero for the first frame) as K more
    channels."""
    cfg, _ = setup
    v = cfg.model.vision
    merger = Ernie5Model(cfg.model).embed.by_modality["video"].merger
    seen = {}
    merger.inp.register_forward_pre_hook(
        lambda layer, inputs: seen.__setitem__("x", inputs[0].numpy())
    )
    cells = v.merge**2
    groups = (
        np.random.default_rng(1).normal(size=(3, v.merge_frames * cells, v.bits)).astype(np.float32)
    )
    merger(paddle.to_tensor(groups), paddle.to_tensor([0, 1, 2]))
    x = seen["x"]
    assert x.shape == (3, v.merge_frames * cells, 2 * v.bits)
    np.testing.assert_array_equal(x[..., : v.bits], groups)
    f = groups.reshape(3, v.merge_frames, cells, v.bits)
    want = np.concatenate([np.zeros_like(f[:, :1]), f[:, 1:] - f[:, :-1]], axis=1).reshape(
        groups.shape
    )
    np.testing.assert_allclose(x[..., v.bits :], want, atol=1e-6)
