// Paddle custom-op registration of the CPU routed-experts kernels.
//
//   moe_experts_cpu(x, w_gate_up, w_down, weights, ids; capacity) -> (y, h, order, offsets)
//   moe_experts_cpu_grad(x, w_gate_up, w_down, weights, h, order, offsets, d y)
//       -> (d x, d w_gate_up, d w_down, d weights)
// h, order and offsets are saved for the backward pass (no gradient flows through them). The
// Python seam (paddle_ernie5/ops/moe_experts.py) casts and validates; the checks here guard direct
// calls. Threads: OMP_NUM_THREADS, the variable Paddle's own CPU kernels follow.
#include <algorithm>
#include <exception>
#include <limits>
#include <vector>

#include "../common/parallel.h"
#include "moe_kernel.h"
#include "paddle/extension.h"

namespace {

void check_float(const paddle::Tensor& t, const char* name, size_t rank) {
  PD_CHECK(t.is_cpu(), "moe_experts_cpu: ", name, " must be on the CPU");
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, "moe_experts_cpu: ", name, " must be float32");
  PD_CHECK(t.shape().size() == rank, "moe_experts_cpu: ", name, " must be ", rank, "-D");
}

moe::Dims make_dims(const paddle::Tensor& x, const paddle::Tensor& w_gate_up,
                    const paddle::Tensor& w_down, const paddle::Tensor& weights, int64_t capacity) {
  check_float(x, "x", 2);
  check_float(w_gate_up, "w_gate_up", 3);
  check_float(w_down, "w_down", 3);
  check_float(weights, "weights", 2);
  const auto xs = x.shape(), gs = w_gate_up.shape(), ds = w_down.shape(), ws = weights.shape();
  moe::Dims d{xs[0], xs[1], gs[0], gs[2] / 2, ws[1], capacity, ernie5par::env_threads()};
  PD_CHECK(gs[1] == d.M && gs[2] == 2 * d.F, "moe_experts_cpu: w_gate_up must be [E, M, 2F]");
  PD_CHECK(ds[0] == d.E && ds[1] == d.F && ds[2] == d.M,
           "moe_experts_cpu: w_down must be [E, F, M] matching w_gate_up");
  PD_CHECK(ws[0] == d.T && d.K >= 1, "moe_experts_cpu: weights must be [T, K]");
  PD_CHECK(d.T * d.K <= std::numeric_limits<int32_t>::max(),
           "moe_experts_cpu: T * K must fit in int32");
  PD_CHECK(capacity >= 0, "moe_experts_cpu: capacity must be >= 0 (0 = dropless)");
  return d;
}

std::vector<paddle::Tensor> MoEExpertsForward(const paddle::Tensor& x,
                                              const paddle::Tensor& w_gate_up,
                                              const paddle::Tensor& w_down,
                                              const paddle::Tensor& weights,
                                              const paddle::Tensor& ids, int64_t capacity) {
  const moe::Dims d = make_dims(x, w_gate_up, w_down, weights, capacity);
  PD_CHECK(ids.dtype() == paddle::DataType::INT64 && ids.shape() == weights.shape(),
           "moe_experts_cpu: ids must be int64 [T, K] like weights");
  const int64_t n = d.T * d.K;
  auto y = paddle::empty({d.T, d.M}, paddle::DataType::FLOAT32, x.place());
  auto h = paddle::empty({n, 2 * d.F}, paddle::DataType::FLOAT32, x.place());
  auto order = paddle::empty({n}, paddle::DataType::INT32, x.place());
  auto offsets = paddle::empty({d.E + 1}, paddle::DataType::INT32, x.place());
  // Scratch from Paddle's caching allocator: a fresh buffer per call would pay page faults.
  auto out = paddle::empty({n, d.M}, paddle::DataType::FLOAT32, x.place());
  try {
    moe::route(d, ids.data<int64_t>(), order.data<int32_t>(), offsets.data<int32_t>());
    moe::forward(d, x.data<float>(), w_gate_up.data<float>(), w_down.data<float>(),
                 weights.data<float>(), order.data<int32_t>(), offsets.data<int32_t>(),
                 y.data<float>(), h.data<float>(), out.data<float>());
  } catch (const std::exception& e) {
    PD_THROW("moe_experts_cpu: ", e.what());
  }
  return {y, h, order, offsets};
}

std::vector<paddle::Tensor> MoEExpertsBackward(
    const paddle::Tensor& x, const paddle::Tensor& w_gate_up, const paddle::Tensor& w_down,
    const paddle::Tensor& weights, const paddle::Tensor& h, const paddle::Tensor& order,
    const paddle::Tensor& offsets, const paddle::Tensor& dy, int64_t capacity) {
  const moe::Dims d = make_dims(x, w_gate_up, w_down, weights, capacity);
  PD_CHECK(dy.initialized() && dy.shape() == x.shape() &&
               dy.dtype() == paddle::DataType::FLOAT32,
           "moe_experts_cpu_grad: d y must be float32 shaped like x");
  auto dx = paddle::empty(x.shape(), paddle::DataType::FLOAT32, x.place());
  auto dgu = paddle::empty(w_gate_up.shape(), paddle::DataType::FLOAT32, x.place());
  auto dd = paddle::empty(w_down.shape(), paddle::DataType::FLOAT32, x.place());
  auto dw = paddle::empty(weights.shape(), paddle::DataType::FLOAT32, x.place());
  auto dx_rows = paddle::empty({d.T * d.K, d.M}, paddle::DataType::FLOAT32, x.place());
  const int64_t partial_floats = moe::backward_scratch_floats(d, offsets.data<int32_t>());
  auto partial = paddle::empty({std::max<int64_t>(1, partial_floats)}, paddle::DataType::FLOAT32,
                               x.place());
  try {
    moe::backward(d, x.data<float>(), w_gate_up.data<float>(), w_down.data<float>(),
                  weights.data<float>(), order.data<int32_t>(), offsets.data<int32_t>(),
                  h.data<float>(), dy.data<float>(), dx.data<float>(), dgu.data<float>(),
                  dd.data<float>(), dw.data<float>(), dx_rows.data<float>(), partial.data<float>());
  } catch (const std::exception& e) {
    PD_THROW("moe_experts_cpu: ", e.what());
  }
  return {dx, dgu, dd, dw};
}

int64_t product(int64_t a, int64_t b) { return a < 0 || b < 0 ? -1 : a * b; }

std::vector<std::vector<int64_t>> ForwardShape(const std::vector<int64_t>& x,
                                               const std::vector<int64_t>& w_gate_up,
                                               const std::vector<int64_t>& w_down,
                                               const std::vector<int64_t>& weights,
                                               const std::vector<int64_t>& ids) {
  const int64_t n = product(weights[0], weights[1]);
  return {x, {n, w_gate_up[2]}, {n}, {w_gate_up[0] < 0 ? -1 : w_gate_up[0] + 1}};
}

std::vector<paddle::DataType> ForwardDtype(const paddle::DataType& x, const paddle::DataType&,
                                           const paddle::DataType&, const paddle::DataType&,
                                           const paddle::DataType&) {
  return {x, paddle::DataType::FLOAT32, paddle::DataType::INT32, paddle::DataType::INT32};
}

std::vector<std::vector<int64_t>> BackwardShape(
    const std::vector<int64_t>& x, const std::vector<int64_t>& w_gate_up,
    const std::vector<int64_t>& w_down, const std::vector<int64_t>& weights,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&) {
  return {x, w_gate_up, w_down, weights};
}

}  // namespace

PD_BUILD_OP(moe_experts_cpu)
    .Inputs({"X", "WGateUp", "WDown", "Weights", "Ids"})
    .Outputs({"Y", "H", "Order", "Offsets"})
    .Attrs({"capacity: int64_t"})
    .SetKernelFn(PD_KERNEL(MoEExpertsForward))
    .SetInferShapeFn(PD_INFER_SHAPE(ForwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(ForwardDtype));

PD_BUILD_GRAD_OP(moe_experts_cpu)
    .Inputs({"X", "WGateUp", "WDown", "Weights", "H", "Order", "Offsets", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X"), paddle::Grad("WGateUp"), paddle::Grad("WDown"),
              paddle::Grad("Weights")})
    .Attrs({"capacity: int64_t"})
    .SetKernelFn(PD_KERNEL(MoEExpertsBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(BackwardShape));
