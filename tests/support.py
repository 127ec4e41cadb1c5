"""Paths shared by tests (importable as `support` through pytest.ini's pythonpath)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")


def load_tool(name: str):
    """tools/<name>.py imported as a module (the tools are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def launch_workers(worker: str, nproc: int, out, *args, result: str = "rank{r}.json") -> list:
    """Run tests/parallel/<worker> on `nproc` gloo processes under paddle.distributed.launch with
    `args`, and return every rank's JSON result (`result` with {r} the rank). A launch that fails,
    hangs past 300 s or leaves a result missing fails the test with the workers' logs."""
    import glob
    import json
    import subprocess
    import sys

    import pytest

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PADDLE_TRAINERS_NUM", None)
    cmd = [
        sys.executable,
        "-m",
        "paddle.distributed.launch",
        "--nproc_per_node",
        str(nproc),
        "--log_dir",
        str(out / "log"),
        os.path.join(ROOT, "tests", "parallel", worker),
        *map(str, args),
    ]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        failed = proc.returncode != 0
    except subprocess.TimeoutExpired:
        proc, failed = None, True
    paths = [out / result.format(r=r) for r in range(nproc)]
    if failed or not all(p.exists() for p in paths):
        logs = "".join(
            f"\n--- {p}\n" + open(p, errors="replace").read()[-4000:]
            for p in sorted(glob.glob(str(out / "log" / "*")))
        )
        launcher = "" if proc is None else proc.stdout[-2000:] + proc.stderr[-2000:]
        pytest.fail(
            f"{nproc}-process launch failed (rc={None if proc is None else proc.returncode})"
            f"{launcher}{logs}"
        )
    return [json.loads(p.read_text()) for p in paths]


def small_moe_config(vocab: int, layers: int = 3, experts: int = 6, **attention):
    """A 32-wide MoE ModelConfig (top-2 of `experts`, a shared expert, the first layer dense);
    `attention` overrides AttentionConfig's fields (default 4 query heads, 2 kv heads, head_dim
    8)."""
    from paddle_ernie5.config import AttentionConfig, ModelConfig, MoEConfig

    attention = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 8, **attention}
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_layers=layers,
        attention=AttentionConfig(**attention),
        moe=MoEConfig(
            num_experts=experts,
            top_k=2,
            expert_hidden=16,
            shared_expert_hidden=8,
            first_dense_layers=1,
        ),
    )


def small_moe_model(vocab: int, layers: int = 3, **attention):
    """`small_moe_config`'s model with 6 experts, seeded, in eval mode (for decoding tests)."""
    import paddle

    from paddle_ernie5.model.model import Ernie5Model

    paddle.seed(0)
    model = Ernie5Model(small_moe_config(vocab, layers, **attention))
    model.eval()
    return model
