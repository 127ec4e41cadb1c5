import os

import numpy as np
import paddle
import pytest
from support import RECIPES

from paddle_ernie5.config import load_config
from paddle_ernie5.io import checkpoint
from paddle_ernie5.model.inputs import to_model_batch
from paddle_ernie5.model.model import Ernie5Model
from paddle_ernie5.model.slicing import ExportError
from paddle_ernie5.model.view import evenly_spaced_layers
from paddle_ernie5.train.elastic import ElasticSampler, LoadAccumulator
from paddle_ernie5.train.export import export_from_checkpoint
from paddle_ernie5.train.trainer import Trainer, read_metrics


def test_evenly_spaced_layers_rule():
    assert evenly_spaced_layers(8, 8) == tuple(range(8))
    assert evenly_spaced_layers(8, 4) == (0, 2, 5, 7)
    assert evenly_spaced_layers(16, 12)[0] == 0 and evenly_spaced_layers(16, 12)[-1] == 15
    assert evenly_spaced_layers(4, 1) == (3,)


def test_sampling_frequencies_match_the_configured_probabilities():
    # The sampler's default probabilities (the recipe's elastic block tunes some of them).
    from paddle_ernie5.config import ElasticConfig

    d = ElasticConfig()
    cfg = load_config(
        os.path.join(RECIPES, "pretrain_tiny.yaml"),
        [
            "elastic.enabled=true",
            f"elastic.depth_full_prob={d.depth_full_prob}",
            f"elastic.min_layers={d.min_layers}",
        ],
    )
    e, m = cfg.elastic, cfg.model
    sampler = ElasticSampler(e, m, seed=7)
    n = 20000
    views = [sampler.sample() for _ in range(n)]
    for attr, p_full in (
        ("layers", e.depth_full_prob),
        ("experts", e.width_full_prob),
        ("top_k", e.topk_full_prob),
    ):
        full = sum(getattr(v, attr) is None for v in views)
        sigma = np.sqrt(n * p_full * (1 - p_full))
        assert abs(full - n * p_full) < 3 * sigma, (attr, full / n)
    # Reduced draws are uniform over their ranges and respect the bounds.
    ks = np.array([v.top_k for v in views if v.top_k is not None])
    assert set(ks) == set(range(1, m.moe.top_k))
    sizes = np.array([len(v.experts) for v in views if v.experts is not None])
    assert sizes.min() >= m.moe.top_k and sizes.max() <= m.moe.num_experts - 1
    counts = np.bincount(sizes - m.moe.top_k)
    expected = len(sizes) / counts.size
    assert np.all(np.abs(counts - expected) < 3 * np.sqrt(expected) + 1)
    depths = {len(v.layers) for v in views if v.layers is not None}
    assert depths == set(range(e.min_layers, m.num_layers))


def test_sampler_is_reproducible_and_resumable():
    cfg = load_config(os.path.join(RECIPES, "debug.yaml"), ["elastic.enabled=true"])
    a = ElasticSampler(cfg.elastic, cfg.model, seed=3)
    first = [a.sample() for _ in range(10)]
    state = a.state_dict()
    rest = [a.sample() for _ in range(10)]
    b = ElasticSampler(cfg.elastic, cfg.model, seed=3)
    assert [b.sample() for _ in range(10)] == first
    c = ElasticSampler(cfg.elastic, cfg.model, seed=99)
    c.load_state_dict(state)
    assert [c.sample() for _ in range(10)] == rest


def test_load_accumulator_averages_over_micro_batches_where_an_expert_was_allowed():
    acc = LoadAccumulator()
    acc.add(0, np.array([4, 4, 0, 0]), np.array([True, True, False, False]))
    acc.add(0, np.array([2, 2, 2, 2]), None)
    load, seen = acc.mean_load(0)
    np.testing.assert_allclose(load, [3, 3, 2, 2])
    assert seen.all()


def test_elastic_run_is_reproducible(debug_config, tmp_path):
    losses = []
    for name in ("a", "b"):
        cfg = debug_config(
            "elastic.enabled=true",
            "elastic.depth_full_prob=0.5",
            f"train.run_dir={tmp_path / name}",
        )
        Trainer(cfg, log=lambda *_: None).fit()
        losses.append(
            [
                (m["loss"], m["train/grad_norm"])
                for m in read_metrics(cfg.train.run_dir)
                if "loss" in m
            ]
        )
    assert losses[0] == losses[1]


@pytest.fixture(scope="module")
def trained_run(data_cache, tmp_path_factory):
    """One short elastic run shared by the export tests (read-only for them)."""
    run_dir = tmp_path_factory.mktemp("elastic_run")
    cfg = load_config(
        os.path.join(RECIPES, "debug.yaml"),
        [
            f"data.cache_dir={data_cache}",
            f"train.run_dir={run_dir}",
            "train.visualdl=false",
            "elastic.enabled=true",
            "train.max_steps=6",
            "train.save_every=6",
            "model.num_layers=3",
            "model.moe.first_dense_layers=1",
            "model.moe.top_k=3",
            "model.attention.backend=reference",
        ],
    )
    Trainer(cfg, log=lambda *_: None).fit()
    return cfg


@pytest.mark.parametrize("layers,experts,top_k", [(2, 4, 2), (3, 8, 3), (1, 3, 1), (3, 5, 2)])
def test_exported_submodel_equals_the_elastic_view(trained_run, tmp_path, layers, experts, top_k):
    cfg = trained_run
    out = str(tmp_path / f"export_{layers}_{experts}_{top_k}")
    view = export_from_checkpoint(
        cfg.train.run_dir, layers, experts, top_k, out, log=lambda *_: None
    )

    full = Ernie5Model(cfg.model)
    full.set_state_dict(
        {
            k: paddle.to_tensor(v)
            for k, v in checkpoint.load_model_weights(cfg.train.run_dir).items()
        }
    )
    sub_cfg = load_config(os.path.join(out, "config.yaml"))
    assert (sub_cfg.model.num_layers, sub_cfg.model.moe.num_experts, sub_cfg.model.moe.top_k) == (
        layers,
        experts,
        top_k,
    )
    sub = Ernie5Model(sub_cfg.model)
    sub.set_state_dict(
        {k: paddle.to_tensor(v) for k, v in checkpoint.load_model_weights(out).items()}
    )
    assert sub.num_params() < full.num_params() or (layers, experts) == (3, 8)

    trainer = Trainer(cfg, log=lambda *_: None)
    np_batch = trainer.loader.next_batch()
    batch = to_model_batch(np_batch)
    full.eval(), sub.eval()
    want = full(batch, view).logits.numpy()
    got = sub(batch).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_exported_model_seeds_further_training(trained_run, tmp_path):
    out = str(tmp_path / "sub")
    export_from_checkpoint(trained_run.train.run_dir, 2, 4, 2, out, log=lambda *_: None)
    cfg = load_config(
        os.path.join(out, "config.yaml"), ["train.max_steps=2", "train.visualdl=false"]
    )
    logs = []
    Trainer(cfg, log=logs.append).fit()
    assert any("initialised model weights from" in l for l in logs)


@pytest.mark.parametrize(
    "layers,experts,top_k,needle",
    [
        (2, 99, 2, "--experts 99: the model has 8 experts per layer"),
        (2, 4, 5, "--top-k 5: allowed 1..min(--experts=4, trained top_k=3)"),
        (7, 4, 2, "--layers 7: the model has 3 layers"),
    ],
)
def test_impossible_export_is_refused(trained_run, tmp_path, layers, experts, top_k, needle):
    with pytest.raises(
        ExportError, match=needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
    ):
        export_from_checkpoint(
            trained_run.train.run_dir, layers, experts, top_k, str(tmp_path / "x")
        )
    assert not (tmp_path / "x").exists()


def _kl_reference(student_logits, teacher_logits, labels):
    """KL(teacher || student) per target position via paddle's kl_div, averaged over the targets."""
    import paddle.nn.functional as F

    from paddle_ernie5.model.losses import IGNORE

    kl = F.kl_div(
        F.log_softmax(student_logits, -1), F.softmax(teacher_logits.detach(), -1), reduction="none"
    ).sum(-1)
    valid = (labels != IGNORE).astype("float32")
    return (kl * valid).sum() / valid.sum()


def test_distillation_kl_is_zero_for_the_teacher_and_does_not_train_it():
    from paddle_ernie5.model.losses import IGNORE, distillation_kl

    paddle.seed(0)
    teacher = paddle.randn([2, 5, 7])
    teacher.stop_gradient = False
    student = paddle.randn([2, 5, 7])
    student.stop_gradient = False
    labels = paddle.to_tensor([[1, 2, IGNORE, 3, 4], [IGNORE, IGNORE, 0, 1, 2]])
    assert float(distillation_kl(teacher, teacher, labels)) == pytest.approx(0.0, abs=1e-6)
    kd = distillation_kl(student, teacher, labels)
    assert float(kd) == pytest.approx(float(_kl_reference(student, teacher, labels)), rel=1e-5)
    kd.backward()
    assert teacher.grad is None and float(student.grad.abs().sum()) > 0
    np.testing.assert_array_equal(student.grad.numpy()[0, 2], 0)  # no target, no signal


@pytest.mark.parametrize("sub_weight,distill", [(0.5, 0.0), (1.0, 0.0), (0.5, 2.0)])
def test_full_every_step_trains_the_full_model_beside_each_sub_model(
    debug_config, sub_weight, distill
):
    """With full_every_step the step's gradient is the weighted mean (1 : sub_loss_weight) of the
    full model's and the sub-model's gradients on the same micro-batch; the logged loss is the full
    model's. With distill_weight the sub-model's loss adds that weight x KL(full || sub), the full
    model detached."""
    from paddle_ernie5.model.losses import compute_loss
    from paddle_ernie5.model.view import FULL_VIEW

    always_sub = [
        "elastic.enabled=true",
        "elastic.depth_full_prob=0",
        "elastic.width_full_prob=0",
        "elastic.topk_full_prob=0",
        "train.clip_norm=0",
        f"elastic.sub_loss_weight={sub_weight}",
        f"elastic.distill_weight={distill}",
    ]
    cfg = debug_config(*always_sub)
    sampler = ElasticSampler(cfg.elastic, cfg.model, seed=1)
    views = sampler.sample_views()
    assert len(views) == 2 and views[0] == FULL_VIEW and views[1] != FULL_VIEW
    alone = ElasticSampler(
        debug_config(*always_sub, "elastic.full_every_step=false").elastic, cfg.model, 1
    )
    assert alone.sample_views() == [views[1]]

    trainer = Trainer(cfg, log=lambda *_: None)
    model = trainer.model
    state = trainer.elastic.state_dict()
    views = trainer.elastic.sample_views()  # the views train_step will draw
    trainer.elastic.load_state_dict(state)
    batch = to_model_batch(
        trainer.loader.batch_at(0) if hasattr(trainer.loader, "batch_at") else _peek(trainer.loader)
    )
    grads = []
    with paddle.no_grad():
        teacher = model(batch, FULL_VIEW).logits
    for view in views:
        out = model(batch, view)
        loss = compute_loss(out, batch["labels"], cfg.model).total
        if view != FULL_VIEW and distill:
            loss = loss + distill * _kl_reference(out.logits, teacher, batch["labels"])
        loss.backward()
        grads.append(
            {p.name: p.grad.numpy().copy() for p in model.parameters() if p.grad is not None}
        )
        model.clear_gradients()
    full_loss = float(compute_loss(model(batch, FULL_VIEW), batch["labels"], cfg.model).total)
    captured = {}
    orig_step = trainer.optimizer.step

    def spy():
        captured.update(
            {p.name: p.grad.numpy().copy() for p in model.parameters() if p.grad is not None}
        )
        orig_step()

    trainer.optimizer.step = spy
    metrics = trainer.train_step()
    assert metrics["loss"] == pytest.approx(full_loss, rel=1e-5)
    assert "elastic/sub_loss" in metrics
    assert ("elastic/distill_kl" in metrics) == (distill > 0)
    name = model.embed.text_table().weight.name
    expected = (grads[0][name] + sub_weight * grads[1].get(name, 0.0)) / (1.0 + sub_weight)
    np.testing.assert_allclose(captured[name], expected, rtol=1e-4, atol=1e-7)


def _peek(loader):
    state = loader.state_dict()
    batch = loader.next_batch()
    loader.load_state_dict(state)
    return batch
