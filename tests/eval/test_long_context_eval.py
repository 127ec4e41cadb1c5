"""Long-context evaluation (eval/long_context.py): teacher-forced retrieval against greedy
generation, perplexity against the logits, a model rebuilt with other attention settings, the KV
cache size, and the rows of `ernie5 eval`."""

import math

import numpy as np
import paddle
import pytest

from paddle_ernie5.config import GenerateConfig
from paddle_ernie5.data.long_context import KEY_CHARS, PasskeyFormat, passkey_examples
from paddle_ernie5.eval import long_context as LC
from paddle_ernie5.model.generation import generate
from paddle_ernie5.model.model import Ernie5Model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from paddle_ernie5.config import load_config
    from paddle_ernie5.data.text import get_text_tokenizer

    cache = str(tmp_path_factory.mktemp("cache"))
    cfg = load_config(
        "recipes/debug.yaml",
        [f"data.cache_dir={cache}", "model.max_seq_len=2048", "data.mixture.passkey=1.0"],
    )
    tok = get_text_tokenizer(cache, cfg.model.vocab_size, 1234, 0.05)
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    for blk in model.blocks:  # peaked attention, so that a block selection matters
        blk.attn.qkv.weight.set_value(blk.attn.qkv.weight * 8.0)
    model.eval()
    filler = np.random.default_rng(0).integers(100, 400, size=5000)
    examples = passkey_examples(PasskeyFormat(tok), filler, 700, 3, seed=0)
    return cfg, tok, model, examples


def test_teacher_forced_answers_are_the_greedy_argmax_given_the_true_prefix(setup):
    _, _, model, examples = setup
    for ex in examples:
        pred, seconds = LC.prefill_answers(model, ex)
        assert pred.shape == (KEY_CHARS,) and seconds > 0
        first = generate(model, ex.prompt[None], 1, temperature=0.0).tokens[0, 0]
        assert pred[0] == first
        ids = ex.ids[: ex.answer_at + KEY_CHARS - 1]
        with paddle.no_grad():
            logits = model(LC._causal_batch(ids), with_mtp=False).logits.numpy()[0]
        at = ex.answer_at
        np.testing.assert_array_equal(pred, logits[at - 1 : at - 1 + KEY_CHARS].argmax(-1))


def test_scores_count_whole_keys_and_characters(setup, monkeypatch):
    _, _, model, examples = setup
    wrong = examples[1].answer.copy()
    wrong[0] = wrong[0] + 1  # one character of one key wrong

    def prefill(m, ex):
        return (wrong if ex is examples[1] else ex.answer), 0.5

    monkeypatch.setattr(LC, "prefill_answers", prefill)
    s = LC.passkey_scores(model, examples)
    assert s["exact"] == pytest.approx(2 / 3)
    assert s["chars"] == pytest.approx(11 / 12)
    assert s["density"] == 1.0 and s["prefill_s"] == 0.5


def test_perplexity_is_the_exp_of_the_mean_next_token_loss(setup):
    _, _, model, examples = setup
    ids = examples[0].ids[:300]
    with paddle.no_grad():
        logits = model(LC._causal_batch(ids), with_mtp=False).logits.numpy()[0].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = math.exp(-logp[np.arange(299), ids[1:]].mean())
    assert LC.perplexity(model, ids) == pytest.approx(want, rel=1e-4)


def test_pooled_perplexity_is_that_of_all_the_windows_tokens(setup):
    _, _, model, examples = setup
    windows = [examples[0].ids[:200], examples[1].ids[100:300]]
    losses = []
    with paddle.no_grad():
        for ids in windows:
            logits = model(LC._causal_batch(ids), with_mtp=False).logits.numpy()[0]
            logp = logits.astype(np.float64) - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            losses.append(-logp[np.arange(199), ids[1:]])
    want = math.exp(np.concatenate(losses).mean())
    assert LC.pooled_perplexity(model, windows) == pytest.approx(want, rel=1e-4)
    with pytest.raises(ValueError, match="different lengths"):
        LC.pooled_perplexity(model, [windows[0], windows[1][:50]])


def test_rr_with_tau_one_equals_full_attention_and_lower_tau_computes_fewer_blocks(setup):
    _, _, model, examples = setup
    ex = examples[0]
    full = LC.prefill_answers(model, ex)[0]
    rr1 = LC.with_attention(model, sparse_prefill="rr", rr_tau=1.0)
    np.testing.assert_array_equal(LC.prefill_answers(rr1, ex)[0], full)
    st = LC.selection_stats(rr1)
    assert st["blocks_kept"] == st["blocks_total"] > 0
    assert LC.perplexity(rr1, ex.ids) == pytest.approx(LC.perplexity(model, ex.ids), rel=1e-5)
    rr = LC.with_attention(model, sparse_prefill="rr", rr_tau=0.3)
    s = LC.passkey_scores(rr, examples)
    assert 0 < s["density"] < 1 and s["select_s"] > 0
    assert LC.selection_stats(model) == {"blocks_kept": 0, "blocks_total": 0, "select_s": 0.0}
    assert model.cfg.attention.sparse_prefill == "none"  # the original is untouched


def test_generated_scores_with_the_full_cache_match_teacher_forcing(setup):
    _, _, model, examples = setup
    g = LC.generated_scores(model, examples, GenerateConfig(), speed_tokens=3)
    t = LC.passkey_scores(model, examples)
    assert g["exact"] == t["exact"]  # whole key right <=> every argmax right on the true prefix
    assert g["decode_tok_s"] > 0
    half = LC.generated_scores(model, examples, GenerateConfig(kv_budget=0.5, kv_policy="recent"))
    assert 0 <= half["chars"] <= 1


def test_kv_cache_bytes(setup):
    cfg = setup[0]
    att = cfg.model.attention
    per_key = cfg.model.num_layers * 2 * att.num_kv_heads * att.head_dim * 4
    assert LC.kv_cache_bytes(cfg.model, 1000, 1.0) == 1000 * per_key
    assert LC.kv_cache_bytes(cfg.model, 1000, 0.25, new_tokens=4) == 254 * per_key


def test_metrics_and_report_rows(setup):
    cfg, tok, model, _ = setup
    m = LC.long_context_metrics(cfg, model, tok, lengths=(300,), samples=2, log=lambda *_: None)
    assert set(m) == {"long/300/exact", "long/300/chars", "long/300/ppl"}
    rows = LC.report_rows(m)
    assert "passkey retrieval at 300 tokens" in rows and "chance 0.0001; 0.1" in rows
    assert rows.count("\n") == 2
