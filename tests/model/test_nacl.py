"""KV-cache eviction at the end of the prefill (model/kv_eviction.py, wired through
model/generation.py): NACL's proxy scores and keep rule on hand-built cases, the budget's rounding,
what each policy keeps in every layer's cache, seeding, GQA, decode positions after an eviction,
the fast loop against the reference loop, and the `generate` settings' errors."""

import argparse
import math
import re
from pathlib import Path

import numpy as np
import paddle
import pytest
from support import small_moe_model

from paddle_ernie5.config import ConfigError
from paddle_ernie5.config.generate import GenerateConfig
from paddle_ernie5.errors import UserError
from paddle_ernie5.model import generation as G
from paddle_ernie5.model import kv_eviction as E
from paddle_ernie5.model.model import Ernie5Model

VOCAB = 61


def _model(heads=4, kv_heads=2, layers=3):
    return small_moe_model(VOCAB, layers, num_heads=heads, num_kv_heads=kv_heads)


@pytest.fixture(scope="module")
def model():
    return _model()


def _sharpen(model, factor=30.0):
    """Scale q, k and v up so attention is peaked and depends on RoPE positions (at the init scale
    every row attends almost uniformly)."""
    for blk in model.blocks:
        w = blk.attn.qkv.weight
        w.set_value(w * factor)
    return model


def _prompt(b=2, p=40, seed=0):
    return np.random.default_rng(seed).integers(3, VOCAB, size=(b, p))


def _prefill(model, prompt, settings, static=True):
    """The caches after the prompt's prefill with `settings` (None: no eviction)."""
    evictor = None if settings is None else E.KVEviction(settings)
    b, p = prompt.shape
    cache = G.StaticKVCache(p + 4, evictor) if static else G.KVCache(evictor)
    with paddle.no_grad():
        model(G._text_batch(paddle.to_tensor(prompt), 0), with_mtp=False, cache=cache)
    return cache


def _keys_BKLD(layer_cache):
    """The keys a layer cache holds, [B, Hk, length, D] (either cache type)."""
    if isinstance(layer_cache, G.LayerCache):
        return layer_cache.k.transpose([0, 2, 1, 3]).numpy()
    if "head" in layer_cache._bufs:
        k, _, n = layer_cache._bufs["head"]
        return k[:, :, :n].numpy()
    k, _, n = layer_cache._bufs["seq"]
    return k[:, :n].transpose([0, 2, 1, 3]).numpy()


# ---------------------------------------------------------------------------------- budget
def test_kept_count_is_the_ceiling_of_budget_times_length_read_as_written():
    assert E.kept_count(0.1, 30) == 3  # 0.1 * 30 is 3.0000000000000004 in floats
    assert E.kept_count(0.3, 10) == 3
    assert E.kept_count(0.5, 7) == 4
    assert E.kept_count(0.25, 10) == 3
    assert E.kept_count(1.0, 17) == 17
    assert E.kept_count(0.01, 10) == 1
    assert E.kept_count(1e-9, 5) == 1
    for p in range(1, 60):
        for budget in (0.05, 0.1, 0.2, 0.25, 1 / 3, 0.5, 0.7, 0.9):
            n = E.kept_count(budget, p)
            assert n == max(1, math.ceil(round(budget * p, 9)))


# ------------------------------------------------------------------------------ proxy scores
def test_proxy_scores_sum_the_causal_attention_of_the_proxies_over_the_gqa_group():
    rng = np.random.default_rng(0)
    b, p, h, hk, d, n = 2, 9, 4, 2, 8, 3
    q = rng.standard_normal((b, p, h, d)).astype(np.float32)
    k = rng.standard_normal((b, p, hk, d)).astype(np.float32)
    got = E.proxy_scores(paddle.to_tensor(q), paddle.to_tensor(k), n, 0.5)
    want = np.zeros((b, hk, p))
    for bi in range(b):
        for hi in range(h):
            for r in range(p - n, p):
                s = q[bi, r, hi].astype(np.float64) @ k[bi, : r + 1, hi // 2].T * 0.5
                w = np.exp(s - s.max())
                want[bi, hi // 2, : r + 1] += w / w.sum()
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), n * h // hk, atol=1e-5)


def _hand_built():
    """10 positions, 2 query heads sharing 1 kv head, proxies = the last 2 rows: head 0's proxies
    look for key 3, head 1's for key 7."""
    p, d = 10, 4
    q = np.zeros((1, p, 2, d), np.float32)
    k = np.zeros((1, p, 1, d), np.float32)
    k[0, :, 0] = np.random.default_rng(1).standard_normal((p, d)) * 0.1
    k[0, 3, 0, 0] = 5.0
    k[0, 7, 0, 1] = 4.0
    q[0, 8:, 0, 0] = 3.0
    q[0, 8:, 1, 1] = 3.0
    return paddle.to_tensor(q), paddle.to_tensor(k)


def test_nacl_keeps_the_proxies_and_the_top_scored_keys():
    q, k = _hand_built()
    scores = E.proxy_scores(q, k, 2, 1.0)
    assert np.argsort(-scores[0, 0, :8])[:2].tolist() == [3, 7]
    ev = E.KVEviction(GenerateConfig(kv_budget=0.4, nacl_proxy_tokens=2, nacl_random_share=0.0))
    np.testing.assert_array_equal(ev.keep_indices(0, q, k, 1.0), [[[3, 7, 8, 9]]])
    # half of the 4 non-proxy places random: the top 2 stay, 2 more come from the rest
    ev = E.KVEviction(GenerateConfig(kv_budget=0.6, nacl_proxy_tokens=2, nacl_random_share=0.5))
    kept = ev.keep_indices(0, q, k, 1.0)[0, 0].tolist()
    assert len(kept) == 6 and {3, 7, 8, 9} <= set(kept) and kept == sorted(set(kept))
    # a single slot after the proxies goes to the best key
    ev = E.KVEviction(GenerateConfig(kv_budget=0.3, nacl_proxy_tokens=2, nacl_random_share=0.0))
    np.testing.assert_array_equal(ev.keep_indices(0, q, k, 1.0), [[[3, 8, 9]]])


def test_nacl_keep_counts_and_more_proxies_than_the_budget():
    rng = np.random.default_rng(0)
    scores = rng.random((3, 2, 50))
    for keep, proxies, share in [(20, 5, 0.35), (10, 4, 1.0), (7, 12, 0.5), (50, 5, 0.2)]:
        kept = E.nacl_keep(scores, keep, proxies, share, np.random.default_rng(1))
        assert kept.shape == (3, 2, keep)
        for row in kept.reshape(-1, keep):
            assert len(set(row.tolist())) == keep and (np.diff(row) > 0).all()
            tail = list(range(50 - min(proxies, keep), 50))
            assert set(tail) <= set(row.tolist())  # the (most recent) proxies
        rest = keep - min(proxies, keep)
        n_random = math.floor(round(share * rest, 9))
        cand = scores[..., : 50 - proxies]
        top = np.sort(np.argsort(-cand, axis=-1)[..., : rest - n_random], axis=-1)
        for bi in range(3):
            for hi in range(2):
                assert set(top[bi, hi].tolist()) <= set(kept[bi, hi].tolist())


def test_random_keep_is_seeded_and_draws_in_proportion_to_exp_score():
    scores = np.array([[[0.0, 1.0, 2.0, 0.5, 9.0, 0.0]]])  # key 4 is top; 5 is the proxy
    rows = np.broadcast_to(scores, (20000, 1, 6))
    kept = E.nacl_keep(rows, 3, 1, 0.5, np.random.default_rng(7))  # 1 proxy, 1 top, 1 random
    assert (kept[:, 0, -1] == 5).all() and (kept == 4).any(axis=-1).all()
    drawn = np.array([sorted(set(r) - {4, 5})[0] for r in kept[:, 0].tolist()])
    freq = np.bincount(drawn, minlength=4)[:4] / len(drawn)
    w = np.exp(scores[0, 0, :4])
    np.testing.assert_allclose(freq, w / w.sum(), atol=0.015)
    again = E.nacl_keep(rows[:50], 3, 1, 0.5, np.random.default_rng(7))
    np.testing.assert_array_equal(again, kept[:50])


def test_eviction_is_reproducible_and_differs_across_seeds_layers_and_heads(model):
    prompt = _prompt(b=2, p=60)
    settings = GenerateConfig(kv_budget=0.5, nacl_proxy_tokens=4, nacl_random_share=1.0)

    def kept(s):
        cache = _prefill(model, prompt, s)
        return {i: layer.kept_positions for i, layer in cache._layers.items()}

    a, b = kept(settings), kept(settings)
    other = kept(GenerateConfig(**{**settings.__dict__, "nacl_seed": 1}))
    assert all((a[i] == b[i]).all() for i in a)
    assert any((a[i] != other[i]).any() for i in a)
    assert (a[0] != a[1]).any()  # each layer draws its own
    assert (a[0][:, 0] != a[0][:, 1]).any()  # and each kv head


# ------------------------------------------------------------------------------- in the cache
@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("policy", ["nacl", "recent", "random"])
@pytest.mark.parametrize("budget", [0.25, 0.5, 0.9])
def test_each_layer_and_kv_head_keeps_exactly_its_budget_of_the_original_keys(
    model, static, policy, budget
):
    prompt = _prompt(b=2, p=37)
    full = _prefill(model, prompt, None, static)
    settings = GenerateConfig(kv_budget=budget, kv_policy=policy, nacl_proxy_tokens=5)
    cache = _prefill(model, prompt, settings, static)
    n = math.ceil(budget * 37)
    assert cache.length() == n
    for i, layer in cache._layers.items():
        keep = layer.kept_positions
        assert keep.shape == (2, 2, n)
        assert all(len(set(r)) == n for r in keep.reshape(-1, n).tolist())
        want = np.take_along_axis(_keys_BKLD(full._layers[i]), keep[..., None], axis=2)
        np.testing.assert_array_equal(_keys_BKLD(layer), want)  # same keys, same rotation
        if policy == "recent":
            np.testing.assert_array_equal(keep, np.broadcast_to(np.arange(37 - n, 37), keep.shape))
        if policy == "nacl":
            assert (keep[..., -5:] == np.arange(32, 37)).all()  # the proxies
        if static:
            assert layer.capacity == n + 4  # the evicted positions are freed


def test_budget_one_evicts_nothing_and_gives_the_same_tokens(model):
    prompt = _prompt(b=3, p=30, seed=4)
    for static in (True, False):
        base = G.generate(model, prompt, 10, temperature=1.0, seed=3, static_cache=static)
        for policy in ("nacl", "recent", "random"):
            settings = GenerateConfig(kv_budget=1.0, kv_policy=policy)
            out = G.generate(
                model, prompt, 10, temperature=1.0, seed=3, static_cache=static, eviction=settings
            )
            np.testing.assert_array_equal(out.tokens, base.tokens)
            np.testing.assert_array_equal(out.logprobs, base.logprobs)
            cache = _prefill(model, prompt, settings, static)
            assert cache.length() == 30
            assert all(x.kept_positions is None for x in cache._layers.values())


class _KeepAll(E.KVEviction):
    """An eviction that runs the whole path (scores aside) and keeps every position."""

    def keep_indices(self, layer, q_BSHD, k_BPKD, softmax_scale):
        b, p, kh = k_BPKD.shape[:3]
        return np.broadcast_to(np.arange(p), (b, kh, p)).copy()


def test_an_eviction_that_keeps_every_position_changes_nothing(model, monkeypatch):
    prompt = _prompt(b=2, p=30, seed=5)
    monkeypatch.setattr(G, "KVEviction", _KeepAll)
    for static in (True, False):
        for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=2)):
            base = G.generate(model, prompt, 10, static_cache=static, **kw)
            out = G.generate(
                model, prompt, 10, static_cache=static, eviction=GenerateConfig(), **kw
            )
            np.testing.assert_array_equal(out.tokens, base.tokens)
            np.testing.assert_allclose(out.logprobs, base.logprobs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (2, 2)])
@pytest.mark.parametrize("policy", ["nacl", "recent", "random"])
def test_fast_loop_equals_the_reference_loop_under_eviction(heads, kv_heads, policy):
    model = _sharpen(_model(heads, kv_heads, layers=2))
    prompt = _prompt(b=2, p=33, seed=heads + kv_heads)
    settings = GenerateConfig(kv_budget=0.4, kv_policy=policy, nacl_proxy_tokens=3)
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=5)):
        fast = G.generate(model, prompt, 12, eviction=settings, **kw)
        ref = G.generate(model, prompt, 12, eviction=settings, static_cache=False, **kw)
        np.testing.assert_array_equal(fast.tokens, ref.tokens)
        np.testing.assert_allclose(fast.logprobs, ref.logprobs, atol=1e-5)
    cache = _prefill(model, prompt, settings)
    assert all(_keys_BKLD(x).shape[1] == kv_heads for x in cache._layers.values())


@pytest.mark.parametrize("static", [True, False])
def test_decode_after_eviction_runs_at_the_true_positions(static):
    """With the recency window every layer and head keeps the last N prompt positions, so the
    first decode step equals a full forward of prompt + token in which the new row cannot see the
    first P - N columns: same RoPE positions (P, not N), same kept keys."""
    model = _sharpen(_model())
    b, p, n = 2, 40, 10
    prompt = _prompt(b=b, p=p, seed=9)
    settings = GenerateConfig(kv_budget=n / p, kv_policy="recent")
    out = G.generate(model, prompt, 2, temperature=0.0, eviction=settings, static_cache=static)
    ids = np.concatenate([prompt, out.tokens[:, :1]], axis=1)
    lts = np.full([b, 1, p + 1, 2], p + 1, np.int32)  # column masks no row ...
    lts[:, :, : p - n] = [p, p + 1]  # ... except the new row for the evicted columns
    batch = G._text_batch(paddle.to_tensor(ids), 0)
    batch["startend_row_indices"] = paddle.to_tensor(lts)
    with paddle.no_grad():
        logits = model(batch, with_mtp=False).logits[:, -1].numpy().astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    np.testing.assert_array_equal(out.tokens[:, 1], logp.argmax(-1))
    np.testing.assert_allclose(out.logprobs[:, 1], logp[np.arange(b), out.tokens[:, 1]], atol=1e-4)


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kw,needle",
    [
        (
            dict(kv_budget=0.0),
            "generate.kv_budget=0.0 is invalid: allowed a fraction 0 < kv_budget",
        ),
        (dict(kv_budget=1.5), "generate.kv_budget=1.5"),
        (dict(kv_budget=-0.2), "generate.kv_budget=-0.2"),
        (dict(kv_policy="h2o"), "generate.kv_policy='h2o' is invalid: allowed one of"),
        (dict(nacl_proxy_tokens=0), "generate.nacl_proxy_tokens=0"),
        (dict(nacl_random_share=1.2), "generate.nacl_random_share=1.2"),
        (dict(nacl_seed=-1), "generate.nacl_seed=-1"),
    ],
)
def test_bad_settings_are_one_config_error_naming_the_field(model, kw, needle):
    with pytest.raises(ConfigError) as e:
        GenerateConfig(**kw).validate()
    assert needle in str(e.value)
    with pytest.raises(ConfigError):  # generate() checks its settings too
        G.generate(model, _prompt(b=1, p=5), 2, eviction=GenerateConfig(**kw))
    from paddle_ernie5.generate import generate_settings

    args = argparse.Namespace(**{**{f: None for f in GenerateConfig.__dataclass_fields__}, **kw})
    with pytest.raises(ConfigError) as e:  # `ernie5 generate --kv-budget ...`
        generate_settings(args)
    assert needle in str(e.value)


def test_cli_refuses_kv_flags_outside_text_continuation_before_loading_a_model(tmp_path):
    from paddle_ernie5 import generate as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        ["--checkpoint", str(tmp_path / "nowhere"), "--prompt", "a red 3", "--kv-budget", "0.5"]
    )
    with pytest.raises(UserError, match="--kv-budget set"):
        cli.run(args)
    args = parser.parse_args(
        ["--checkpoint", str(tmp_path / "nowhere"), "--text", "abc", "--kv-budget", "2"]
    )
    with pytest.raises(ConfigError, match="generate.kv_budget=2.0"):
        cli.run(args)


def _saved_model(cfg, tmp_path) -> Path:
    """A freshly initialised model (seed 0) saved as an exported-model folder of `cfg`."""
    from safetensors.numpy import save_file

    from paddle_ernie5.config import save_config

    paddle.seed(0)
    folder = tmp_path / "model"
    folder.mkdir()
    state = Ernie5Model(cfg.model).state_dict()
    save_file(
        {k: np.ascontiguousarray(v.numpy()) for k, v in state.items()},
        str(folder / "model.safetensors"),
    )
    save_config(cfg, str(folder / "config.yaml"))
    return folder


def test_cli_continues_text_with_an_evicted_cache(debug_config, tmp_path, capsys):
    from paddle_ernie5 import generate as cli

    cfg = debug_config()
    folder = _saved_model(cfg, tmp_path)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    text = "The passkey is 4312. " + "Grass is green. " * 2 + "What is the passkey?"
    lines = []
    for budget in ("1", "0.5"):
        args = parser.parse_args(
            ["--checkpoint", str(folder), "--text", text, "--max-new-tokens", "5"]
            + ["--kv-budget", budget, "--kv-policy", "nacl", "--nacl-proxy-tokens", "4"]
        )
        assert cli.run(args, log=lines.append) == 0
    assert len(lines) == 2 and all(isinstance(x, str) for x in lines)


# ------------------------------------------------------------------------- the recipe section
def test_generate_section_in_recipes_overrides_and_yaml(tmp_path):
    from paddle_ernie5.config import load_config, save_config

    cfg = load_config("recipes/debug.yaml", ["generate.kv_budget=0.5", "generate.kv_policy=recent"])
    assert cfg.generate == GenerateConfig(kv_budget=0.5, kv_policy="recent")
    assert load_config("recipes/debug.yaml").generate == GenerateConfig()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "base: " + str(Path("recipes/debug.yaml").resolve()) + "\n"
        "generate: {kv_budget: 0.25, nacl_proxy_tokens: 8}\n"
    )
    cfg = load_config(str(recipe))
    assert (cfg.generate.kv_budget, cfg.generate.nacl_proxy_tokens) == (0.25, 8)
    save_config(cfg, str(tmp_path / "saved.yaml"))  # a run's config.yaml reads back unchanged
    assert load_config(str(tmp_path / "saved.yaml")).generate == cfg.generate
    for bad, needle in (
        ("generate.kv_budget=0", "generate.kv_budget=0.0 is invalid"),
        ("generate.kv_budget=1.01", "generate.kv_budget=1.01 is invalid"),
        ("generate.kv_policy=h2o", "generate.kv_policy='h2o' is invalid"),
        ("generate.kv_budgt=0.5", "unknown key 'generate.kv_budgt'"),
    ):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config("recipes/debug.yaml", [bad])


def test_resume_ignores_the_generate_section():
    from paddle_ernie5.config import load_config
    from paddle_ernie5.config.train import resume_settings

    a = resume_settings(load_config("recipes/debug.yaml"))
    b = resume_settings(load_config("recipes/debug.yaml", ["generate.kv_budget=0.5"]))
    assert a == b


def test_cli_reads_the_runs_generate_section_and_flags_override_it(
    debug_config, tmp_path, monkeypatch
):
    from paddle_ernie5 import generate as cli

    cfg = debug_config("generate.kv_budget=0.5", "generate.nacl_proxy_tokens=4")
    folder = _saved_model(cfg, tmp_path)
    seen = []
    real = G.generate

    def spy(*a, **kw):
        seen.append(kw["eviction"])
        return real(*a, **kw)

    monkeypatch.setattr(G, "generate", spy)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    base = ["--checkpoint", str(folder), "--text", "The pass key is 4312.", "--max-new-tokens", "2"]
    for flags in ([], ["--kv-budget", "1", "--kv-policy", "random"]):
        assert cli.run(parser.parse_args(base + flags), log=lambda *_: None) == 0
    assert seen[0] == GenerateConfig(kv_budget=0.5, nacl_proxy_tokens=4)
    assert seen[1] == GenerateConfig(kv_budget=1.0, kv_policy="random", nacl_proxy_tokens=4)
