import dataclasses
import glob
import os
import subprocess
import sys

import pytest
from support import RECIPES, ROOT

from paddle_ernie5 import config as C
from paddle_ernie5.model.params import count_params

ALL_RECIPES = sorted(glob.glob(os.path.join(RECIPES, "*.yaml")))


def test_there_are_recipes():
    names = {os.path.basename(p) for p in ALL_RECIPES}
    assert {"debug.yaml", "pretrain_tiny.yaml", "ernie5_large.yaml"} <= names


@pytest.mark.parametrize("path", ALL_RECIPES, ids=os.path.basename)
def test_every_recipe_loads_and_builds(path, capsys):
    cfg = C.load_config(path)
    assert capsys.readouterr().err == ""  # no recipe uses a deprecated key
    assert cfg == C.replace(cfg)  # validates again unchanged
    assert isinstance(cfg, C.RECIPE_CLASSES[cfg.component])
    if not isinstance(cfg, C.Config):
        assert isinstance(cfg.train, C.LoopConfig) and not isinstance(cfg.train, C.TrainConfig)
        return  # a separately trained component: no backbone to build
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
    (tmp_path / "a.yaml").write_text(
        "model: {hidden_size: 96, moe: {top_k: 3}}\ntrain: {lr: 0.01}\n"
    )
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel: {moe: {num_experts: 12}}\n")
    cfg = C.load_config(
        str(tmp_path / "b.yaml"),
        ["train.lr=0.002", "model.moe.top_k=2", "model.attention.rope_sections=[0.5, 0.25, 0.25]"],
    )
    assert cfg.name == "b"
    assert cfg.model.hidden_size == 96
    assert (cfg.model.moe.num_experts, cfg.model.moe.top_k) == (12, 2)
    assert cfg.train.lr == 0.002
    assert cfg.model.attention.rope_sections == (0.5, 0.25, 0.25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # frozen


def test_resolved_config_round_trips(tmp_path):
    cfg = C.load_config(os.path.join(RECIPES, "pretrain_tiny.yaml"), ["model.moe.top_k=2"])
    C.save_config(cfg, str(tmp_path / "config.yaml"))
    again = C.load_config(str(tmp_path / "config.yaml"))
    assert again == cfg


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.moe.topk=2", "unknown key 'model.moe.topk' (did you mean model.moe.top_k?)"),
        (
            "model.moe.top_k=99",
            "model.moe.top_k=99 is invalid: allowed 1 <= top_k <= num_experts=32",
        ),
        ("train.lr=fast", "train.lr='fast' has the wrong type: expected a number"),
        ("train.max_steps=1.5", "train.max_steps=1.5 has the wrong type: expected an integer"),
        ("model.attention.num_kv_heads=3", "model.attention.num_kv_heads=3 is invalid"),
        ("data.seq_len=4096", "data.seq_len=4096 is invalid: allowed <= model.max_seq_len=256"),
        (
            "parallel.ep=5",
            "parallel.ep=5 is invalid: allowed a divisor of model.moe.num_experts=32",
        ),
        ("train.schedule=linear", "train.schedule='linear' is invalid: allowed wsd or cosine"),
        ("train", "override 'train' is malformed"),
    ],
)
def test_bad_values_raise_one_clear_error(override, needle):
    with pytest.raises(C.ConfigError) as e:
        C.load_config(os.path.join(RECIPES, "pretrain_tiny.yaml"), [override])
    assert needle in str(e.value)


def test_numbers_yaml_reads_as_strings_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-3 (no dot) as a string; a float field takes it as the number it spells."""
    recipe = tmp_path / "r.yaml"
    base = os.path.join(RECIPES, "pretrain_tiny.yaml")
    recipe.write_text(f"base: {base}\ntrain: {{lr: 2e-3}}\n")
    assert C.load_config(str(recipe)).train.lr == 2e-3
    cfg = C.load_config(base, ["model.moe.bias_update_rate=1e-4"])
    assert cfg.model.moe.bias_update_rate == 1e-4
    with pytest.raises(C.ConfigError, match="expected an integer"):
        C.load_config(os.path.join(RECIPES, "pretrain_tiny.yaml"), ["train.max_steps=1e3"])


def test_cli_exits_2_with_one_line_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "paddle_ernie5.cli",
            "train",
            os.path.join(RECIPES, "debug.yaml"),
            f"train.run_dir={run_dir}",
            "model.moe.top_k=9",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == [
        "ernie5: config error: model.moe.top_k=9 is invalid: allowed 1 <= top_k <= num_experts=8"
    ]
    assert not run_dir.exists()


def test_cli_refuses_missing_recipe_and_build_only_training():
    for args in (["train", "recipes/nope.yaml"], ["train", "recipes/ernie5_large.yaml"]):
        proc = subprocess.run(
            [sys.executable, "-m", "paddle_ernie5.cli", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert proc.returncode == 2
        assert proc.stderr.startswith("ernie5: config error:")


# ---------------------------------------------------------------------------------------------
# The package imports no paddle
# ---------------------------------------------------------------------------------------------

_NO_PADDLE = """
import glob, importlib.abc, os, sys

class NoPaddle(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "paddle" or name.startswith("paddle."):
            raise ImportError(f"paddle is blocked in this test ({name})")
        return None

sys.meta_path.insert(0, NoPaddle())
import paddle_ernie5.config as C

names = []
for path in sorted(glob.glob(os.path.join("recipes", "*.yaml"))):
    names.append(f"{C.load_config(path).component}:{os.path.basename(path)}")
assert not [m for m in sys.modules if m == "paddle" or m.startswith("paddle.")]
print(len(names))
"""


def test_config_imports_and_loads_every_recipe_without_paddle():
    proc = subprocess.run(
        [sys.executable, "-c", _NO_PADDLE], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) == len(ALL_RECIPES)


# ---------------------------------------------------------------------------------------------
# `component:` and the deprecated `task:`
# ---------------------------------------------------------------------------------------------

DEPRECATED = "recipe key 'task' is deprecated; use 'component'"


def test_recipes_name_their_component_with_the_new_key():
    for path in ALL_RECIPES:
        with open(path, encoding="utf-8") as f:
            keys = [line.split(":")[0] for line in f if line[:1].isalpha()]
        assert "task" not in keys, path
    assert set(C.COMPONENTS) == set(C.RECIPE_CLASSES)
    assert "TASKS" not in dir(C)


def test_deprecated_task_key_still_loads_with_one_line_on_stderr(tmp_path, capsys):
    base = os.path.join(RECIPES, "pretrain_tiny.yaml")
    (tmp_path / "old.yaml").write_text(f"base: {base}\ntask: sft\n")
    cfg = C.load_config(str(tmp_path / "old.yaml"))
    assert cfg.component == "sft" and isinstance(cfg, C.Config)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and DEPRECATED in lines[0] and "old.yaml" in lines[0]
    # a component recipe written with the old key
    (tmp_path / "codec.yaml").write_text(
        f"base: {base}\ntask: audio_codec\ntrain: {{run_dir: runs/x}}\n"
    )
    cfg = C.load_config(str(tmp_path / "codec.yaml"))
    assert cfg.component == "audio_codec" and isinstance(cfg, C.ComponentConfig)
    assert DEPRECATED in capsys.readouterr().err


def test_deprecated_task_override_still_works(capsys):
    cfg = C.load_config(os.path.join(RECIPES, "debug.yaml"), ["task=rl"])
    assert cfg.component == "rl"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and DEPRECATED in err[0] and "task=rl" in err[0]
    # the new key prints nothing
    assert C.load_config(os.path.join(RECIPES, "debug.yaml"), ["component=rl"]) == cfg
    assert capsys.readouterr().err == ""


def test_task_and_component_together_or_an_unknown_component_are_errors(tmp_path):
    (tmp_path / "both.yaml").write_text("task: sft\ncomponent: rl\n")
    with pytest.raises(C.ConfigError, match="sets both 'task' and 'component'"):
        C.load_config(str(tmp_path / "both.yaml"))
    with pytest.raises(
        C.ConfigError,
        match=r"config.component='pretrian' is invalid: allowed "
        r"one of pretrain, visual_tokenizer",
    ):
        C.load_config(os.path.join(RECIPES, "debug.yaml"), ["component=pretrian"])


# ---------------------------------------------------------------------------------------------
# Component recipes: their own loop settings
# ---------------------------------------------------------------------------------------------


def test_component_recipe_keeps_the_loop_settings_and_drops_inherited_backbone_ones():
    # audio_codec.yaml is based on pretrain_tiny.yaml, whose train: also sets eval_every
    cfg = C.load_config(os.path.join(RECIPES, "audio_codec.yaml"))
    assert type(cfg) is C.ComponentConfig and type(cfg.train) is C.LoopConfig
    tr = cfg.train
    assert (tr.run_dir, tr.max_steps, tr.batch_size, tr.schedule, tr.clip_norm) == (
        "runs/audio_codec",
        800,
        16,
        "cosine",
        0.0,
    )
    assert not hasattr(tr, "eval_every") and not hasattr(cfg, "elastic")
    assert cfg.data.seq_len == 256  # data is inherited (components read data.cache_dir)
    assert cfg.build_only is False
    merger = C.load_config(os.path.join(RECIPES, "vision_merger.yaml"))
    assert type(merger) is C.MergerComponentConfig
    assert merger.model.modalities == ("text", "image", "video")  # the merger reads model.vision
    assert merger.train.clip.mode == "global"
    # the same loop values a TrainConfig would have held (same names, same defaults)
    full = C.TrainConfig(**{f: getattr(tr, f) for f in ("run_dir", "max_steps", "lr", "seed")})
    assert isinstance(full, C.LoopConfig) and full.clip_norm == C.LoopConfig().clip_norm


def test_a_resolved_component_config_round_trips(tmp_path):
    cfg = C.load_config(os.path.join(RECIPES, "vision_merger.yaml"), ["train.max_steps=70"])
    C.save_config(cfg, str(tmp_path / "config.yaml"))
    assert C.load_config(str(tmp_path / "config.yaml")) == cfg
    assert C.config_hash(cfg) != C.config_hash(C.replace(cfg, name="other"))


def test_switching_the_component_by_override_keeps_only_its_keys(tmp_path):
    cfg = C.load_config(
        os.path.join(RECIPES, "debug.yaml"), ["component=speech_judge", "speech_judge.channels=16"]
    )
    assert type(cfg) is C.ComponentConfig and cfg.train.run_dir == "runs/debug"
    assert cfg.speech_judge.channels == 16 and cfg.train.max_steps == 8


@pytest.mark.parametrize(
    "recipe,override,key",
    [
        ("audio_codec.yaml", "train.eval_every=5", "train.eval_every"),
        ("visual_tokenizer.yaml", "train.init_from=runs/x", "train.init_from"),
        ("vision_merger.yaml", "train.grad_accum=2", "train.grad_accum"),
        ("speech_judge.yaml", "train.simreg.enabled=true", "train.simreg"),
        ("vision_judge.yaml", "train.clip.beta=0.9", "train.clip.beta"),
        ("vision_judge.yaml", "elastic.enabled=true", "elastic"),
    ],
)
def test_component_recipe_with_a_backbone_only_key_is_a_clear_error(recipe, override, key):
    with pytest.raises(C.ConfigError) as e:
        C.load_config(os.path.join(RECIPES, recipe), [override])
    msg = str(e.value)
    assert msg.startswith(
        f"{key} is only read by the backbone trainers (component pretrain, sft, "
        "rl), not by component "
    )
    assert "remove it" in msg


def test_backbone_only_key_written_in_a_component_recipe_file(tmp_path):
    (tmp_path / "vt.yaml").write_text(
        f"base: {os.path.join(RECIPES, 'visual_tokenizer.yaml')}\ntrain: {{eval_every: 100}}\n"
    )
    with pytest.raises(
        C.ConfigError,
        match=r"^train.eval_every is only read by the backbone "
        r".*component 'visual_tokenizer'",
    ):
        C.load_config(str(tmp_path / "vt.yaml"))


def test_component_loops_clip_globally_and_typos_stay_unknown_keys():
    with pytest.raises(C.ConfigError, match=r"train.clip.mode='adagc' is invalid: allowed global"):
        C.load_config(os.path.join(RECIPES, "vision_merger.yaml"), ["train.clip.mode=adagc"])
    with pytest.raises(
        C.ConfigError,
        match=r"train.clip.mode='adagc' is invalid: allowed global "
        r"for component 'sft'",
    ):
        C.load_config(os.path.join(RECIPES, "sft_tiny.yaml"), ["train.clip.mode=adagc"])
    with pytest.raises(
        C.ConfigError,
        match=r"unknown key 'train.max_step' \(did you mean "
        r"train.max_steps\?\)",
    ):
        C.load_config(os.path.join(RECIPES, "audio_codec.yaml"), ["train.max_step=3"])


def test_cli_config_and_plan_on_a_component_recipe(tmp_path):
    recipe = os.path.join(RECIPES, "speech_judge.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "paddle_ernie5.cli", "config", recipe],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "component: speech_judge" in proc.stdout and "# parameters" not in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "paddle_ernie5.cli", "plan", recipe],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("ernie5: config error: recipe") and "speech_judge" in proc.stderr


def test_deprecated_rl_tasks_key_becomes_rl_families(tmp_path, capsys):
    base = os.path.join(RECIPES, "rl_tiny.yaml")
    (tmp_path / "old.yaml").write_text(f"base: {base}\nrl:\n  tasks: [counting]\n")
    cfg = C.load_config(str(tmp_path / "old.yaml"))
    assert cfg.rl.families == ("counting",)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "recipe key 'rl.tasks' is deprecated; use 'rl.families'" in err[0]
    cfg = C.load_config(base, ["rl.tasks=[arithmetic]"])
    assert cfg.rl.families == ("arithmetic",) and "rl.tasks=[arithmetic]" in capsys.readouterr().err
    with pytest.raises(C.ConfigError, match="sets both 'rl.tasks' and 'rl.families'"):
        C.load_config(base, ["rl.tasks=[arithmetic]", "rl.families=[counting]"])


def _chained_recipes() -> list[tuple[str, str]]:
    """(recipe, the recipe whose run directory its train.init_from names); a start from a
    conversion's output (convert-dha, convert-moue) has no such recipe."""
    cfgs = {os.path.basename(p): C.load_config(p) for p in ALL_RECIPES}
    by_dir = {os.path.normpath(c.train.run_dir): name for name, c in cfgs.items()}
    return [
        (name, by_dir[os.path.normpath(c.train.init_from)])
        for name, c in cfgs.items()
        if getattr(c.train, "init_from", "") and os.path.normpath(c.train.init_from) in by_dir
    ]


def test_the_recipe_chains_include_the_multimodal_rl_one():
    chains = _chained_recipes()
    assert ("rl_multimodal_tiny.yaml", "multimodal_tiny.yaml") in chains
    assert ("rl_tiny.yaml", "sft_tiny.yaml") in chains


@pytest.mark.parametrize("child,parent", _chained_recipes(), ids=lambda x: x)
def test_a_recipe_started_from_another_recipes_run_builds_the_same_tensors(child, parent):
    """A chain such as multimodal_tiny -> rl_multimodal_tiny: `train.init_from` refuses a
    checkpoint whose tensors differ, so the two recipes must build the same model state."""
    from paddle_ernie5.model.model import Ernie5Model

    def shapes(name):
        model = Ernie5Model(C.load_config(os.path.join(RECIPES, name)).model)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    mine, theirs = shapes(child), shapes(parent)
    assert sorted(set(mine) ^ set(theirs)) == []
    assert mine == theirs
