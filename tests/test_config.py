import glob
import os
import subprocess
import sys

import pytest

from paddle_ernie5 import config as C
from paddle_ernie5.model.params import count_params

from support import RECIPES, ROOT

ALL_RECIPES = sorted(glob.glob(os.path.join(RECIPES, "*.yaml")))


def test_there_are_recipes():
    names = {os.path.basename(p) for p in ALL_RECIPES}
    assert {"debug.yaml", "pretrain_tiny.yaml", "ernie5_large.yaml"} <= names


@pytest.mark.parametrize("path", ALL_RECIPES, ids=os.path.basename)
def test_every_recipe_loads_and_builds(path):
    cfg = C.load_config(path)
    p = count_params(cfg.model)
    assert 0 < p["activated"] < p["total"]
    if cfg.build_only:
        return  # sized, never allocated
    assert p["total"] < 50e6, "non-build-only recipes must fit a laptop"
    from paddle_ernie5.model.model import Ernie5Model

    assert Ernie5Model(cfg.model).num_params() == p["total"]


def test_large_recipe_is_ernie5_shaped():
    cfg = C.load_config(os.path.join(RECIPES, "ernie5_large.yaml"))
    p = count_params(cfg.model)
    assert cfg.build_only
    assert p["total"] > 1e12
    assert p["activated"] / p["total"] < 0.03
    assert cfg.model.max_seq_len == 8192


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {hidden_size: 96, moe: {top_k: 3}}\ntrain: {lr: 0.01}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel: {moe: {num_experts: 12}}\n")
    cfg = C.load_config(str(tmp_path / "b.yaml"), ["train.lr=0.002", "model.moe.top_k=2",
                                                   "model.attention.rope_sections=[0.5, 0.25, 0.25]"])
    assert cfg.name == "b"
    assert cfg.model.hidden_size == 96
    assert (cfg.model.moe.num_experts, cfg.model.moe.top_k) == (12, 2)
    assert cfg.train.lr == 0.002
    assert cfg.model.attention.rope_sections == (0.5, 0.25, 0.25)
    with pytest.raises(Exception):
        cfg.train.lr = 1.0  # frozen


def test_resolved_config_round_trips(tmp_path):
    cfg = C.load_config(os.path.join(RECIPES, "pretrain_tiny.yaml"), ["model.moe.top_k=2"])
    C.save_config(cfg, str(tmp_path / "config.yaml"))
    again = C.load_config(str(tmp_path / "config.yaml"))
    assert again == cfg


@pytest.mark.parametrize("override,needle", [
    ("model.moe.topk=2", "unknown key 'model.moe.topk' (did you mean model.moe.top_k?)"),
    ("model.moe.top_k=99", "model.moe.top_k=99 is invalid: allowed 1 <= top_k <= num_experts=32"),
    ("train.lr=fast", "train.lr='fast' has the wrong type: expected a number"),
    ("train.max_steps=1.5", "train.max_steps=1.5 has the wrong type: expected an integer"),
    ("model.attention.num_kv_heads=3", "model.attention.num_kv_heads=3 is invalid"),
    ("data.seq_len=4096", "data.seq_len=4096 is invalid: allowed <= model.max_seq_len=256"),
    ("parallel.ep=5", "parallel.ep=5 is invalid: allowed a divisor of model.moe.num_experts=32"),
    ("train.schedule=linear", "train.schedule='linear' is invalid: allowed wsd or cosine"),
    ("train", "override 'train' is malformed"),
])
def test_bad_values_raise_one_clear_error(override, needle):
    with pytest.raises(C.ConfigError) as e:
        C.load_config(os.path.join(RECIPES, "pretrain_tiny.yaml"), [override])
    assert needle in str(e.value)


def test_cli_exits_2_with_one_line_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "paddle_ernie5.cli", "train",
                           os.path.join(RECIPES, "debug.yaml"), f"train.run_dir={run_dir}",
                           "model.moe.top_k=9"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == ["ernie5: config error: model.moe.top_k=9 is invalid: allowed 1 <= top_k <= "
                     "num_experts=8"]
    assert not run_dir.exists()


def test_cli_refuses_missing_recipe_and_build_only_training():
    for args in (["train", "recipes/nope.yaml"], ["train", "recipes/ernie5_large.yaml"]):
        proc = subprocess.run([sys.executable, "-m", "paddle_ernie5.cli", *args], capture_output=True,
                              text=True, cwd=ROOT)
        assert proc.returncode == 2
        assert proc.stderr.startswith("ernie5: config error:")
