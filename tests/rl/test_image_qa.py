"""RL problem family image_qa: label-word verifier, prompts packed as training packs them,
KV-cached generation from an image prompt equal to a full forward, router replay through an image
rollout (debug model with vision, randomly initialised tiny visual tokenizer), and a one-step RL run
on image_qa + counting."""

import json

import numpy as np
import paddle
import pytest
from vision_support import tiny_tokenizer, vision_config

from paddle_ernie5.data import vision_sources as VS
from paddle_ernie5.data.multimodal import pack_segments
from paddle_ernie5.data.text import get_text_tokenizer
from paddle_ernie5.model.generation import generate
from paddle_ernie5.model.model import Ernie5Model
from paddle_ernie5.ops.masks import to_dense
from paddle_ernie5.rl import rollout as R
from paddle_ernie5.rl import verifiers as V
from paddle_ernie5.rl.objectives import response_logp_entropy
from paddle_ernie5.train.components import run_component

ROUNDING = 2e-6  # as tests/rl/test_router_replay.py: same routing, float32 summation order only


@pytest.fixture(scope="module")
def setup(data_cache, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("image_qa"))
    cfg = vision_config(
        data_cache,
        folder + "/run",
        tiny_tokenizer(folder),
        "component=rl",
        "rl.families=[image_qa,counting]",
    )
    tok = get_text_tokenizer(
        cfg.data.cache_dir, cfg.model.vocab_size, cfg.train.seed, cfg.data.val_fraction
    )
    train, held = V.split_problems("image_qa", 60, 0, 0.2, cfg)
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    model.eval()
    return cfg, tok, model, train, held


def test_split_follows_the_image_split_and_answers_are_the_labels(setup):
    cfg, _, _, train, held = setup
    assert len(train) == len(held) == 60
    for problems, split in ((train, "train"), (held, "heldout")):
        data = VS.encoded_digits(cfg, "image", split)
        for p in problems:
            where, i = p.context.split("/")
            assert where == split
            assert (p.prompt, p.answer) in VS.questions_of("image", data.labels, int(i))
            np.testing.assert_array_equal(p.meta["feats"], data.feats[int(i)])
    assert len({p.key for p in train + held}) == 120  # one key per (image, question)
    with pytest.raises(ValueError, match="config"):
        V.split_problems("image_qa", 10, 0, 0.2)


def test_verifier_scores_label_words_and_scoring_needs_the_eos(setup):
    _, tok, _, train, _ = setup
    p = next(q for q in train if q.prompt == "What colour is the digit?")
    wrong = next(c for c in ("red", "blue") if c != p.answer)
    for good in (f" {p.answer}", p.answer, f" {p.answer} ", f"\n{p.answer}"):
        assert V.reward(p, good) == 1.0, good
    for bad in (f" {wrong}", f" {p.answer} {p.answer}", f" {p.answer}.", f" light {p.answer}", ""):
        assert V.reward(p, bad) == 0.0, bad
    assert all(V.reward(q, q.solution) == 1.0 for q in train)
    # Through rollout scoring: answers end with <eos> (as QA answers do in training); a response cut
    # off before <eos> scores 0 even when its words are right.
    rows = [
        tok.encode(f" {p.answer}") + [tok.eos_id],
        tok.encode(f" {wrong}") + [tok.eos_id],
        tok.encode(f" {p.answer}") + tok.encode(" and"),
    ]
    n = max(map(len, rows))
    tokens = np.array([r + [tok.pad_id] * (n - len(r)) for r in rows])
    lengths = np.array([len(r) for r in rows])
    stopped = tokens[np.arange(3), lengths - 1] == R.stop_id(tok, p)
    assert R.stop_id(tok, p) == tok.eos_id
    np.testing.assert_array_equal(R.score(tok, p, [], tokens, lengths, stopped), [1.0, 0.0, 0.0])
    # A multimodal policy can sample a delimiter (an id past the text vocabulary): that answer
    # scores 0 instead of failing to decode.
    boi = VS.special_ids(tok.vocab_size, tok)[VS.DELIMITERS["image"][0]]
    odd = np.array([tok.encode(f" {p.answer}") + [boi, tok.eos_id]])
    assert R.score(tok, p, [], odd, np.array([odd.shape[1]]), np.array([True]))[0] == 0.0


def test_prompt_is_the_training_document_up_to_the_answer(setup):
    cfg, tok, model, train, _ = setup
    p = train[0]
    prompt = R.build_prompt(model.cfg, tok, p)
    ids, extras = R.prompt_arrays([prompt], tok.pad_id)
    doc = VS.qa_document(
        p.meta["feats"],
        tok.encode(p.prompt),
        tok.encode(f" {p.answer}"),
        cfg.model.vision,
        "image",
        VS.special_ids(cfg.model.vocab_size, tok),
    )
    full = pack_segments([doc], sum(len(s) for s in doc), tok.pad_id)
    n = ids.shape[1]
    assert ids[0, :2].tolist() == [tok.bos_id, cfg.model.vocab_size] and ids[0, -1] != tok.eos_id
    np.testing.assert_array_equal(ids, full["input_ids"][:, :n])
    for key in ("token_types", "image_patches"):
        np.testing.assert_array_equal(extras[key], full[key][:, :n])
    np.testing.assert_array_equal(extras["positions"], full["positions"][:, :, :n])
    np.testing.assert_array_equal(
        to_dense(extras["startend_row_indices"][0, 0], causal=False),
        to_dense(full["startend_row_indices"][0, 0], causal=False)[:n, :n],
    )
    assert extras["positions"][0, 0, -1] != n - 1  # the question continues from the image's extent


def test_cached_generation_from_an_image_prompt_equals_a_full_forward(setup):
    _, tok, model, train, _ = setup
    prompt = R.build_prompt(model.cfg, tok, train[1])
    ids, extras = R.prompt_arrays([prompt] * 3, tok.pad_id)
    sample = generate(model, ids, 6, temperature=1.0, seed=2, prompt_extras=extras)
    tails = list(sample.tokens[:, :-1])
    full_ids, full_extras = R.continuation_arrays([prompt] * 3, tails, tok.pad_id)
    start = np.full(3, ids.shape[1])

    def logp(batch_extras):
        logits = model(R.model_inputs(full_ids, batch_extras), with_mtp=False).logits
        return response_logp_entropy(logits, sample.tokens, start, 1.0)[0].numpy()

    np.testing.assert_allclose(sample.logprobs, logp(full_extras), atol=1e-5, rtol=0)
    # Response positions taken from the row index instead of the image's extent change the numbers.
    naive = dict(full_extras, positions=full_extras["positions"].copy())
    naive["positions"][:, :, ids.shape[1] :] = np.arange(ids.shape[1], full_ids.shape[1])
    assert np.abs(logp(naive) - sample.logprobs).max() > 1e-4


def test_router_replay_reproduces_rollout_logprobs_of_a_mixed_image_and_text_batch(setup):
    _, tok, model, train, _ = setup
    counting = V.get_family("counting").make_problems(1, 0, 0)[0]
    rollouts = [
        R.rollout_group(model, tok, p, 3, 5, 1.0, seed=i, hint_fraction=0.5)
        for i, p in enumerate([train[2], counting])
    ]
    assert rollouts[0].prompt.doc is not None and rollouts[1].prompt.doc is None
    batch = R.build_batch(rollouts, tok.pad_id)
    valid = batch.valid_BN
    saved = {i: moe.router.selection_bias.numpy().copy() for i, moe in model.moe_layers()}
    try:
        # the router would now choose other experts (see test_router_replay)
        rng = np.random.default_rng(1)
        for _, moe in model.moe_layers():
            n = moe.router.selection_bias.shape[0]
            moe.router.selection_bias.set_value(
                paddle.to_tensor(rng.normal(0, 0.05, n).astype("float32"))
            )
        free = R.forward_logp(model, batch, 1.0, replay=False)[0].numpy()
        assert np.abs((free - batch.rollout_logp_BN) * valid).max() > 100 * ROUNDING
        replayed = R.forward_logp(model, batch, 1.0, replay=True)[0].numpy()
        np.testing.assert_allclose(
            replayed * valid, batch.rollout_logp_BN * valid, atol=ROUNDING, rtol=0
        )
    finally:
        for i, moe in model.moe_layers():
            moe.router.selection_bias.set_value(paddle.to_tensor(saved[i]))


def test_rl_run_on_image_qa_and_counting(setup, data_cache, tmp_path):
    run = tmp_path / "rl"
    cfg = vision_config(
        data_cache,
        str(run),
        setup[0].model.vision.tokenizer_dir,
        "component=rl",
        "rl.families=[image_qa,counting]",
        "rl.train_problems=40",
        "rl.eval_problems=2",
        "rl.prompts_per_step=2",
        "rl.group_size=2",
        "rl.max_new_tokens=3",
        "train.max_steps=1",
        "train.warmup_steps=0",
    )
    out = run_component(cfg)
    assert {"image_qa/reward_before", "image_qa/reward_after", "counting/entropy_after"} <= set(out)
    step = [json.loads(l) for l in open(run / "metrics.jsonl") if '"loss"' in l][0]
    assert step["router/differ_frac"] == 0 and np.isfinite(step["loss"])
