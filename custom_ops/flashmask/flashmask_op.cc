// Paddle custom-op registration of the CPU FlashMask kernels.
//
//   flashmask_cpu(q, k, v, idx, [block_mask]; causal, softmax_scale) -> (out, lse)
//   flashmask_cpu_grad(q, k, v, idx, [block_mask], out, lse, d out, d lse) -> (d q, d k, d v)
// block_mask (optional): [B, 1|Hk|H, ceil(Sq/128), ceil(Sk/128)] int32, nonzero = block kept.
// The Python seam (paddle_ernie5/ops/flashmask.py) validates arguments and fills a default idx;
// the checks here guard direct calls. Threads: OMP_NUM_THREADS, the variable Paddle's own CPU
// kernels follow (Paddle sets it to 1 at import when it is unset).
#include <cstdlib>
#include <exception>
#include <vector>

#include "flashmask_kernel.h"
#include "paddle/extension.h"

namespace {

int num_threads() {
  const char* env = std::getenv("OMP_NUM_THREADS");
  const int n = env != nullptr ? std::atoi(env) : 0;
  return n > 0 ? n : 1;
}

flashmask::Shape make_shape(const paddle::Tensor& q, const paddle::Tensor& k,
                            const paddle::Tensor& v, const paddle::Tensor& idx,
                            const paddle::optional<paddle::Tensor>& block, bool causal,
                            float softmax_scale) {
  for (const paddle::Tensor* t : {&q, &k, &v}) {
    PD_CHECK(t->is_cpu(), "flashmask_cpu: tensors must be on the CPU");
    PD_CHECK(t->dtype() == paddle::DataType::FLOAT32, "flashmask_cpu: q, k, v must be float32");
    PD_CHECK(t->shape().size() == 4, "flashmask_cpu: q, k, v must be 4-D [B, S, heads, D]");
  }
  PD_CHECK(idx.dtype() == paddle::DataType::INT32,
           "flashmask_cpu: startend_row_indices must be int32");
  PD_CHECK(idx.shape().size() == 4, "flashmask_cpu: startend_row_indices must be 4-D");
  const auto qs = q.shape(), ks = k.shape(), is = idx.shape();
  flashmask::Shape s{qs[0], qs[1], ks[1], qs[2], ks[2], qs[3], is[1], is[3],
                     causal, softmax_scale, num_threads()};
  PD_CHECK(ks == v.shape(), "flashmask_cpu: k and v shapes differ");
  PD_CHECK(ks[0] == s.B && ks[3] == s.D, "flashmask_cpu: q and k disagree on batch or head dim");
  PD_CHECK(s.Hk > 0 && s.H % s.Hk == 0,
           "flashmask_cpu: query heads must be a multiple of kv heads");
  PD_CHECK(is[0] == s.B && is[2] == s.Sk && (s.Hm == 1 || s.Hm == s.Hk || s.Hm == s.H),
           "flashmask_cpu: startend_row_indices must be [B, 1|Hk|H, Sk, C]");
  PD_CHECK(causal ? (s.C == 1 || s.C == 2) : (s.C == 2 || s.C == 4),
           "flashmask_cpu: last dim of startend_row_indices must be 1|2 (causal) or 2|4");
  if (block) {
    const auto bs = block->shape();
    PD_CHECK(block->is_cpu() && block->dtype() == paddle::DataType::INT32,
             "flashmask_cpu: block_mask must be an int32 CPU tensor");
    PD_CHECK(bs.size() == 4 && bs[0] == s.B && (bs[1] == 1 || bs[1] == s.Hk || bs[1] == s.H) &&
                 bs[2] == s.nbq() && bs[3] == s.nbk(),
             "flashmask_cpu: block_mask must be [B, 1|Hk|H, ceil(Sq/128), ceil(Sk/128)]");
    s.Hb = bs[1];
  }
  return s;
}

const int32_t* block_data(const paddle::optional<paddle::Tensor>& block) {
  return block ? block->data<int32_t>() : nullptr;
}

// The gradient of an output the loss does not use arrives uninitialised: treat it as zero.
const float* optional_data(const paddle::Tensor& grad, const std::vector<int64_t>& shape) {
  if (!grad.initialized()) return nullptr;
  PD_CHECK(grad.shape() == shape && grad.dtype() == paddle::DataType::FLOAT32,
           "flashmask_cpu_grad: unexpected gradient shape or dtype");
  return grad.data<float>();
}

std::vector<paddle::Tensor> FlashMaskForward(const paddle::Tensor& q, const paddle::Tensor& k,
                                             const paddle::Tensor& v, const paddle::Tensor& idx,
                                             const paddle::optional<paddle::Tensor>& block,
                                             bool causal, float softmax_scale) {
  const flashmask::Shape s = make_shape(q, k, v, idx, block, causal, softmax_scale);
  auto out = paddle::empty(q.shape(), paddle::DataType::FLOAT32, q.place());
  auto lse = paddle::empty({s.B, s.H, s.Sq}, paddle::DataType::FLOAT32, q.place());
  try {
    flashmask::forward(s, q.data<float>(), k.data<float>(), v.data<float>(), idx.data<int32_t>(),
                       block_data(block), out.data<float>(), lse.data<float>());
  } catch (const std::exception& e) {
    PD_THROW("flashmask_cpu: ", e.what());
  }
  return {out, lse};
}

std::vector<paddle::Tensor> FlashMaskBackward(const paddle::Tensor& q, const paddle::Tensor& k,
                                              const paddle::Tensor& v, const paddle::Tensor& idx,
                                              const paddle::optional<paddle::Tensor>& block,
                                              const paddle::Tensor& out, const paddle::Tensor& lse,
                                              const paddle::Tensor& dout,
                                              const paddle::Tensor& dlse, bool causal,
                                              float softmax_scale) {
  const flashmask::Shape s = make_shape(q, k, v, idx, block, causal, softmax_scale);
  auto dq = paddle::empty(q.shape(), paddle::DataType::FLOAT32, q.place());
  auto dk = paddle::empty(k.shape(), paddle::DataType::FLOAT32, k.place());
  auto dv = paddle::empty(v.shape(), paddle::DataType::FLOAT32, v.place());
  try {
    flashmask::backward(s, q.data<float>(), k.data<float>(), v.data<float>(),
                        idx.data<int32_t>(), block_data(block), out.data<float>(),
                        lse.data<float>(),
                        optional_data(dout, q.shape()), optional_data(dlse, {s.B, s.H, s.Sq}),
                        dq.data<float>(), dk.data<float>(), dv.data<float>());
  } catch (const std::exception& e) {
    PD_THROW("flashmask_cpu: ", e.what());
  }
  return {dq, dk, dv};
}

std::vector<std::vector<int64_t>> ForwardShape(
    const std::vector<int64_t>& q, const std::vector<int64_t>& k, const std::vector<int64_t>& v,
    const std::vector<int64_t>& idx, const paddle::optional<std::vector<int64_t>>& block) {
  return {q, {q[0], q[2], q[1]}};
}

std::vector<paddle::DataType> ForwardDtype(const paddle::DataType& q, const paddle::DataType& k,
                                           const paddle::DataType& v,
                                           const paddle::DataType& idx,
                                           const paddle::optional<paddle::DataType>& block) {
  return {q, paddle::DataType::FLOAT32};
}

std::vector<std::vector<int64_t>> BackwardShape(
    const std::vector<int64_t>& q, const std::vector<int64_t>& k, const std::vector<int64_t>& v,
    const std::vector<int64_t>& idx, const paddle::optional<std::vector<int64_t>>& block,
    const std::vector<int64_t>& out,
    const std::vector<int64_t>& lse, const std::vector<int64_t>& dout,
    const std::vector<int64_t>& dlse) {
  return {q, k, v};
}

}  // namespace

PD_BUILD_OP(flashmask_cpu)
    .Inputs({"Q", "K", "V", "Idx", paddle::Optional("BlockMask")})
    .Outputs({"Out", "LSE"})
    .Attrs({"causal: bool", "softmax_scale: float"})
    .SetKernelFn(PD_KERNEL(FlashMaskForward))
    .SetInferShapeFn(PD_INFER_SHAPE(ForwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(ForwardDtype));

PD_BUILD_GRAD_OP(flashmask_cpu)
    .Inputs({"Q", "K", "V", "Idx", paddle::Optional("BlockMask"), "Out", "LSE",
             paddle::Grad("Out"), paddle::Grad("LSE")})
    .Outputs({paddle::Grad("Q"), paddle::Grad("K"), paddle::Grad("V")})
    .Attrs({"causal: bool", "softmax_scale: float"})
    .SetKernelFn(PD_KERNEL(FlashMaskBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(BackwardShape));
