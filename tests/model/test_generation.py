import numpy as np
import paddle

from paddle_ernie5.config import AttentionConfig, ModelConfig, MoEConfig
from paddle_ernie5.model.generation import KVCache, _text_batch, generate
from paddle_ernie5.model.model import Ernie5Model
from paddle_ernie5.model.view import ElasticView


def _model(backend):
    paddle.seed(0)
    cfg = ModelConfig(
        vocab_size=61,
        hidden_size=32,
        num_layers=2,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, backend=backend),
        moe=MoEConfig(num_experts=6, top_k=2, expert_hidden=16, shared_expert_hidden=8),
    )
    model = Ernie5Model(cfg)
    model.eval()
    return model


def test_cached_decoding_equals_full_recompute():
    for backend in ("reference", "cpu"):
        model = _model(backend)
        ids = paddle.to_tensor(np.random.default_rng(0).integers(0, 61, size=(3, 12)))
        full = model(_text_batch(ids, 0), with_mtp=False).logits.numpy()
        cache = KVCache()
        steps = [model(_text_batch(ids[:, :5], 0), with_mtp=False, cache=cache).logits.numpy()]
        for t in range(5, 12):
            steps.append(
                model(_text_batch(ids[:, t : t + 1], t), with_mtp=False, cache=cache).logits.numpy()
            )
        np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-5)


def test_greedy_generation_matches_argmax_of_recompute_and_logprobs_are_exact():
    model = _model("reference")
    prompt = np.random.default_rng(1).integers(0, 61, size=(2, 4))
    out = generate(model, prompt, 6, temperature=0.0, view=ElasticView(top_k=1))
    seq = prompt
    for t in range(6):
        logits = model(
            _text_batch(paddle.to_tensor(seq), 0), ElasticView(top_k=1), with_mtp=False
        ).logits
        logp = paddle.nn.functional.log_softmax(logits[:, -1], -1).numpy()
        nxt = logp.argmax(-1)
        np.testing.assert_array_equal(out.tokens[:, t], nxt)
        np.testing.assert_allclose(out.logprobs[:, t], logp[np.arange(2), nxt], atol=1e-5)
        seq = np.concatenate([seq, nxt[:, None]], 1)


def test_sampling_is_seeded_and_stops():
    model = _model("reference")
    prompt = np.zeros((4, 3), np.int64)
    a = generate(model, prompt, 20, temperature=1.0, seed=5, stop_id=7)
    b = generate(model, prompt, 20, temperature=1.0, seed=5, stop_id=7)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    for row, n in zip(a.tokens, a.lengths):
        if n < a.tokens.shape[1]:
            assert row[n - 1] == 7 and np.all(row[n:] == 0)
