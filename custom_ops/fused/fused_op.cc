// Paddle custom-op registration of the fused RMSNorm / RoPE / SwiGLU CPU kernels.
//
//   fused_rms_norm(x, w; eps) -> (y, inv_rms)         x [..., M], w [M], inv_rms [rows]
//   fused_rms_norm_grad(x, w, inv_rms, d y) -> (d x, d w)
//   fused_rope_qkv(qkv, cos, sin; num_heads, num_kv_heads) -> (q, k, v)
//       qkv [B, S, H + 2K, D], cos/sin [B, S, 1, D]; q [B, S, H, D], k and v [B, S, K, D]
//   fused_rope_qkv_grad(cos, sin, d q, d k, d v) -> d qkv
//   fused_swiglu(x) -> y                              x [..., 2F] = [a | b], y [..., F]
//   fused_swiglu_grad(x, d y) -> d x
// The Python seam (paddle_ernie5/ops/fused.py) decides when these run and makes inputs contiguous;
// the checks here guard direct calls. Threads: OMP_NUM_THREADS, the variable Paddle's own CPU
// kernels follow (Paddle sets it to 1 at import when it is unset), at most one per 1M values.
#include <algorithm>
#include <vector>

#include "../common/parallel.h"
#include "fused_kernel.h"
#include "paddle/extension.h"

namespace {

// Threads for a call touching `floats` values: OMP_NUM_THREADS, but at most one per kGrainFloats.
// These kernels stream memory at a fraction of a nanosecond per value (a [2048, 128] RMSNorm is
// ~0.05 ms on one core), while starting a parallel region wakes sleeping workers: microseconds on
// an idle machine, but 5-15 ms measured per call on a 2-core machine shared with other processes.
// So a second thread is used only when its share is ~1M values, and a decoding step's few rows stay
// on one thread.
constexpr int64_t kGrainFloats = int64_t{1} << 20;

int threads_for(int64_t floats) {
  const int64_t most = std::min<int64_t>(ernie5par::env_threads(), floats / kGrainFloats);
  return static_cast<int>(std::max<int64_t>(1, most));
}

void check_float(const paddle::Tensor& t, const char* op, const char* name) {
  PD_CHECK(t.initialized() && t.is_cpu(), op, ": ", name, " must be a CPU tensor");
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, op, ": ", name, " must be float32");
}

// The gradient of an output the loss does not use arrives uninitialised: treat it as zero.
const float* optional_grad(const paddle::Tensor& grad, const std::vector<int64_t>& shape,
                           const char* op) {
  if (!grad.initialized()) return nullptr;
  PD_CHECK(grad.shape() == shape && grad.dtype() == paddle::DataType::FLOAT32, op,
           ": unexpected gradient shape or dtype");
  return grad.data<float>();
}

int64_t leading_rows(const std::vector<int64_t>& shape) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) {
    rows = shape[i] < 0 || rows < 0 ? -1 : rows * shape[i];
  }
  return rows;
}

// ---------------------------------------------------------------------------------- RMSNorm

std::vector<paddle::Tensor> RmsNormForward(const paddle::Tensor& x, const paddle::Tensor& w,
                                           float eps) {
  check_float(x, "fused_rms_norm", "x");
  check_float(w, "fused_rms_norm", "weight");
  PD_CHECK(!x.shape().empty() && w.shape().size() == 1 && w.shape()[0] == x.shape().back(),
           "fused_rms_norm: weight must be [M] for x [..., M]");
  const int64_t M = x.shape().back(), rows = leading_rows(x.shape());
  auto y = paddle::empty(x.shape(), paddle::DataType::FLOAT32, x.place());
  auto inv_rms = paddle::empty({rows}, paddle::DataType::FLOAT32, x.place());
  fused::rms_norm_forward(rows, M, x.data<float>(), w.data<float>(), eps, y.data<float>(),
                          inv_rms.data<float>(), threads_for(x.numel()));
  return {y, inv_rms};
}

std::vector<paddle::Tensor> RmsNormBackward(const paddle::Tensor& x, const paddle::Tensor& w,
                                            const paddle::Tensor& inv_rms,
                                            const paddle::Tensor& dy) {
  check_float(x, "fused_rms_norm_grad", "x");
  check_float(dy, "fused_rms_norm_grad", "d y");
  PD_CHECK(dy.shape() == x.shape(), "fused_rms_norm_grad: d y must be shaped like x");
  const int64_t M = x.shape().back(), rows = leading_rows(x.shape());
  PD_CHECK(inv_rms.numel() == rows, "fused_rms_norm_grad: inv_rms must hold one value per row");
  auto dx = paddle::empty(x.shape(), paddle::DataType::FLOAT32, x.place());
  auto dw = paddle::empty(w.shape(), paddle::DataType::FLOAT32, x.place());
  fused::rms_norm_backward(rows, M, x.data<float>(), w.data<float>(), inv_rms.data<float>(),
                           dy.data<float>(), dx.data<float>(), dw.data<float>(),
                           threads_for(x.numel()));
  return {dx, dw};
}

std::vector<std::vector<int64_t>> RmsNormForwardShape(const std::vector<int64_t>& x,
                                                      const std::vector<int64_t>&) {
  return {x, {leading_rows(x)}};
}

std::vector<paddle::DataType> RmsNormForwardDtype(const paddle::DataType& x,
                                                  const paddle::DataType&) {
  return {x, paddle::DataType::FLOAT32};
}

std::vector<std::vector<int64_t>> RmsNormBackwardShape(const std::vector<int64_t>& x,
                                                       const std::vector<int64_t>& w,
                                                       const std::vector<int64_t>&,
                                                       const std::vector<int64_t>&) {
  return {x, w};
}

// ------------------------------------------------------------------------------------- RoPE

// B, S, D from a cos/sin table [B, S, 1, D] (or [B, S, D]); T = B * S tokens.
fused::RopeDims rope_dims(const paddle::Tensor& cos, const paddle::Tensor& sin, int64_t num_heads,
                          int64_t num_kv_heads, const char* op) {
  check_float(cos, op, "cos");
  check_float(sin, op, "sin");
  const auto cs = cos.shape();
  PD_CHECK(cs == sin.shape(), op, ": cos and sin shapes differ");
  PD_CHECK((cs.size() == 4 && cs[2] == 1) || cs.size() == 3, op,
           ": cos/sin must be [B, S, 1, D] or [B, S, D]");
  PD_CHECK(num_heads >= 1 && num_kv_heads >= 1, op, ": num_heads and num_kv_heads must be >= 1");
  const int64_t D = cs.back();
  PD_CHECK(D >= 2 && D % 2 == 0, op, ": head_dim must be even");
  return {cs[0] * cs[1], num_heads, num_kv_heads, D};
}

std::vector<paddle::Tensor> RopeQkvForward(const paddle::Tensor& qkv, const paddle::Tensor& cos,
                                           const paddle::Tensor& sin, int64_t num_heads,
                                           int64_t num_kv_heads) {
  const char* op = "fused_rope_qkv";
  check_float(qkv, op, "qkv");
  const fused::RopeDims d = rope_dims(cos, sin, num_heads, num_kv_heads, op);
  const auto s = qkv.shape(), cs = cos.shape();
  PD_CHECK(s.size() == 4 && s[0] == cs[0] && s[1] == cs[1] && s[2] == d.H + 2 * d.K &&
               s[3] == d.D,
           op, ": qkv must be [B, S, H + 2K, D] matching cos/sin [B, S, 1, D]");
  auto q = paddle::empty({s[0], s[1], d.H, d.D}, paddle::DataType::FLOAT32, qkv.place());
  auto k = paddle::empty({s[0], s[1], d.K, d.D}, paddle::DataType::FLOAT32, qkv.place());
  auto v = paddle::empty({s[0], s[1], d.K, d.D}, paddle::DataType::FLOAT32, qkv.place());
  fused::rope_qkv_forward(d, qkv.data<float>(), cos.data<float>(), sin.data<float>(),
                          q.data<float>(), k.data<float>(), v.data<float>(),
                          threads_for(qkv.numel()));
  return {q, k, v};
}

std::vector<paddle::Tensor> RopeQkvBackward(const paddle::Tensor& cos, const paddle::Tensor& sin,
                                            const paddle::Tensor& dq, const paddle::Tensor& dk,
                                            const paddle::Tensor& dv, int64_t num_heads,
                                            int64_t num_kv_heads) {
  const char* op = "fused_rope_qkv_grad";
  const fused::RopeDims d = rope_dims(cos, sin, num_heads, num_kv_heads, op);
  const auto cs = cos.shape();
  const int64_t B = cs[0], S = cs[1];
  auto dqkv = paddle::empty({B, S, d.H + 2 * d.K, d.D}, paddle::DataType::FLOAT32, cos.place());
  fused::rope_qkv_backward(d, optional_grad(dq, {B, S, d.H, d.D}, op),
                           optional_grad(dk, {B, S, d.K, d.D}, op),
                           optional_grad(dv, {B, S, d.K, d.D}, op), cos.data<float>(),
                           sin.data<float>(), dqkv.data<float>(), threads_for(dqkv.numel()));
  return {dqkv};
}

std::vector<std::vector<int64_t>> RopeQkvForwardShape(const std::vector<int64_t>& qkv,
                                                      const std::vector<int64_t>&,
                                                      const std::vector<int64_t>&,
                                                      int64_t num_heads, int64_t num_kv_heads) {
  return {{qkv[0], qkv[1], num_heads, qkv[3]},
          {qkv[0], qkv[1], num_kv_heads, qkv[3]},
          {qkv[0], qkv[1], num_kv_heads, qkv[3]}};
}

std::vector<paddle::DataType> RopeQkvForwardDtype(const paddle::DataType& qkv,
                                                  const paddle::DataType&,
                                                  const paddle::DataType&) {
  return {qkv, qkv, qkv};
}

std::vector<std::vector<int64_t>> RopeQkvBackwardShape(
    const std::vector<int64_t>& cos, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>&, int64_t num_heads,
    int64_t num_kv_heads) {
  return {{cos[0], cos[1], num_heads + 2 * num_kv_heads, cos.back()}};
}

// ----------------------------------------------------------------------------------- SwiGLU

int64_t swiglu_half(const paddle::Tensor& x, const char* op) {
  check_float(x, op, "x");
  PD_CHECK(!x.shape().empty() && x.shape().back() % 2 == 0, op,
           ": the last dim of x must be even ([a | b])");
  return x.shape().back() / 2;
}

std::vector<paddle::Tensor> SwigluForward(const paddle::Tensor& x) {
  const int64_t F = swiglu_half(x, "fused_swiglu");
  auto shape = x.shape();
  shape.back() = F;
  auto y = paddle::empty(shape, paddle::DataType::FLOAT32, x.place());
  fused::swiglu_forward(leading_rows(x.shape()), F, x.data<float>(), y.data<float>(),
                        threads_for(x.numel()));
  return {y};
}

std::vector<paddle::Tensor> SwigluBackward(const paddle::Tensor& x, const paddle::Tensor& dy) {
  const int64_t F = swiglu_half(x, "fused_swiglu_grad");
  check_float(dy, "fused_swiglu_grad", "d y");
  auto shape = x.shape();
  shape.back() = F;
  PD_CHECK(dy.shape() == shape, "fused_swiglu_grad: d y must be [..., F] for x [..., 2F]");
  auto dx = paddle::empty(x.shape(), paddle::DataType::FLOAT32, x.place());
  fused::swiglu_backward(leading_rows(x.shape()), F, x.data<float>(), dy.data<float>(),
                         dx.data<float>(), threads_for(x.numel()));
  return {dx};
}

std::vector<std::vector<int64_t>> SwigluForwardShape(const std::vector<int64_t>& x) {
  auto y = x;
  if (!y.empty() && y.back() > 0) y.back() /= 2;
  return {y};
}

std::vector<paddle::DataType> SwigluForwardDtype(const paddle::DataType& x) { return {x}; }

std::vector<std::vector<int64_t>> SwigluBackwardShape(const std::vector<int64_t>& x,
                                                      const std::vector<int64_t>&) {
  return {x};
}

}  // namespace

PD_BUILD_OP(fused_rms_norm)
    .Inputs({"X", "W"})
    .Outputs({"Y", "InvRms"})
    .Attrs({"eps: float"})
    .SetKernelFn(PD_KERNEL(RmsNormForward))
    .SetInferShapeFn(PD_INFER_SHAPE(RmsNormForwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(RmsNormForwardDtype));

PD_BUILD_GRAD_OP(fused_rms_norm)
    .Inputs({"X", "W", "InvRms", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X"), paddle::Grad("W")})
    .SetKernelFn(PD_KERNEL(RmsNormBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(RmsNormBackwardShape));

PD_BUILD_OP(fused_rope_qkv)
    .Inputs({"QKV", "Cos", "Sin"})
    .Outputs({"Q", "K", "V"})
    .Attrs({"num_heads: int64_t", "num_kv_heads: int64_t"})
    .SetKernelFn(PD_KERNEL(RopeQkvForward))
    .SetInferShapeFn(PD_INFER_SHAPE(RopeQkvForwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(RopeQkvForwardDtype));

PD_BUILD_GRAD_OP(fused_rope_qkv)
    .Inputs({"Cos", "Sin", paddle::Grad("Q"), paddle::Grad("K"), paddle::Grad("V")})
    .Outputs({paddle::Grad("QKV")})
    .Attrs({"num_heads: int64_t", "num_kv_heads: int64_t"})
    .SetKernelFn(PD_KERNEL(RopeQkvBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(RopeQkvBackwardShape));

PD_BUILD_OP(fused_swiglu)
    .Inputs({"X"})
    .Outputs({"Y"})
    .SetKernelFn(PD_KERNEL(SwigluForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SwigluForwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SwigluForwardDtype));

PD_BUILD_GRAD_OP(fused_swiglu)
    .Inputs({"X", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X")})
    .SetKernelFn(PD_KERNEL(SwigluBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(SwigluBackwardShape));
