"""Which attention and expert backend a setting means, for each place, dtype and build. The device
facts are arguments, so the GPU rows run on this CPU-only machine."""

import paddle
import pytest

from paddle_ernie5.ops import flashmask, moe_experts

F32, BF16, F16 = paddle.float32, paddle.bfloat16, paddle.float16

ATTENTION = [
    # backend, on_gpu, dtype, gpu_build -> chosen
    ("auto", False, F32, False, "cpu"),
    ("auto", False, BF16, False, "cpu"),
    ("auto", False, F32, True, "cpu"),  # a GPU build running on its CPU
    ("auto", True, BF16, True, "paddle"),
    ("auto", True, F16, True, "paddle"),
    ("auto", True, F32, True, "reference"),  # never the CPU op on GPU tensors
    ("paddle", True, BF16, True, "paddle"),
    ("paddle", True, F16, True, "paddle"),
    ("reference", True, F32, True, "reference"),
    ("reference", False, F32, False, "reference"),
    ("cpu", False, F32, False, "cpu"),
    ("cpu", False, BF16, True, "cpu"),
]
ATTENTION_REFUSED = [
    ("paddle", False, BF16, False, RuntimeError, "CUDA build"),
    ("paddle", False, BF16, True, RuntimeError, "on the CPU"),
    ("paddle", True, F32, True, RuntimeError, "float16/bfloat16"),
    ("cpu", True, BF16, True, RuntimeError, "needs CPU tensors"),
    ("cpu", True, F32, True, RuntimeError, "needs CPU tensors"),
    ("flash", False, F32, False, ValueError, "unknown"),
]
EXPERTS = [
    ("auto", False, "cpu_op"),
    ("auto", True, "grouped"),
    ("grouped", False, "grouped"),
    ("grouped", True, "grouped"),
    ("cpu_op", False, "cpu_op"),
]


@pytest.mark.parametrize("backend,on_gpu,dtype,gpu_build,chosen", ATTENTION)
def test_attention_resolution(backend, on_gpu, dtype, gpu_build, chosen):
    assert flashmask.resolve(backend, on_gpu, dtype, gpu_build) == chosen


@pytest.mark.parametrize("backend,on_gpu,dtype,gpu_build,error,message", ATTENTION_REFUSED)
def test_attention_resolution_refuses(backend, on_gpu, dtype, gpu_build, error, message):
    with pytest.raises(error, match=message):
        flashmask.resolve(backend, on_gpu, dtype, gpu_build)


@pytest.mark.parametrize("backend,on_gpu,chosen", EXPERTS)
def test_expert_resolution(backend, on_gpu, chosen):
    assert moe_experts.resolve(backend, on_gpu) == chosen


def test_expert_resolution_refuses():
    with pytest.raises(RuntimeError, match="needs CPU tensors"):
        moe_experts.resolve("cpu_op", True)
    with pytest.raises(ValueError, match="unknown"):
        moe_experts.resolve("fast", False)


@pytest.mark.filterwarnings("ignore:amp_guard can only be enabled")
def test_cpu_tensors_resolve_as_the_table_says_and_cpu_autocast_casts_nothing():
    q = paddle.zeros([1, 4, 2, 8])
    assert flashmask.resolve_backend("auto", q) == "cpu"
    assert moe_experts.resolve_backend("auto", q) == "cpu_op"
    with paddle.amp.auto_cast(level="O1", dtype="bfloat16"):
        cast = flashmask.autocast_inputs(q, q, q)
    assert all(t is q for t in cast)
