import os

import pytest
from support import RECIPES

from paddle_ernie5.config import load_config
from paddle_ernie5.eval.elastic_grid import _sliced_counts, grid_shapes
from paddle_ernie5.model.model import Ernie5Model
from paddle_ernie5.model.slicing import slice_state
from paddle_ernie5.model.view import evenly_spaced_layers


def test_grid_shapes_cover_each_axis_and_hit_the_target_fractions():
    cfg = load_config(os.path.join(RECIPES, "pretrain_tiny.yaml")).model
    shapes = grid_shapes(cfg)
    labels = [s[0] for s in shapes]
    assert labels[0] == "full" and "top-k 25%" in labels and "experts 50%" in labels
    assert len({s[1:] for s in shapes}) == len(shapes)
    _, l, e, k = shapes[-1]
    full, sub = (
        _sliced_counts(cfg, cfg.num_layers, cfg.moe.num_experts, cfg.moe.top_k),
        _sliced_counts(cfg, l, e, k),
    )
    assert abs(sub["activated"] / full["activated"] - 0.5) < 0.1
    assert abs(sub["total"] / full["total"] - 0.35) < 0.1


@pytest.mark.parametrize("shape", [(3, 16, 2), (2, 8, 1), (4, 32, 4)])
def test_sliced_counts_equal_the_exported_models_parameters(shape):
    cfg = load_config(os.path.join(RECIPES, "pretrain_tiny.yaml")).model
    layers, experts, top_k = shape
    kept = evenly_spaced_layers(cfg.num_layers, layers)
    full = Ernie5Model(cfg)
    state = {k: v.numpy() for k, v in full.state_dict().items()}
    moe_layers = [i for i, _ in full.moe_layers() if i in kept]
    sliced, sub_cfg = slice_state(
        state, cfg, kept, {i: tuple(range(experts)) for i in moe_layers}, top_k
    )
    assert Ernie5Model(sub_cfg).num_params() == _sliced_counts(cfg, layers, experts, top_k)["total"]
    assert (
        sum(v.size for k, v in sliced.items() if "selection_bias" not in k)
        == _sliced_counts(cfg, layers, experts, top_k)["total"]
    )
