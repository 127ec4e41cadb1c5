// Paddle custom-op registration of the CPU output projection + cross-entropy kernels.
//
//   linear_ce_cpu(h, w, labels; transposed, ignore_index) -> (loss, lse)
//   linear_ce_cpu_grad(h, w, labels, lse, d loss; transposed, ignore_index) -> (d h, d w)
// lse (the per-row logsumexp) is saved for the backward pass; no gradient flows through it. The
// Python seam (paddle_ernie5/ops/linear_ce.py) validates and casts; the checks here guard direct
// calls. Threads: OMP_NUM_THREADS, the variable Paddle's own CPU kernels follow.
#include <algorithm>
#include <exception>
#include <vector>

#include "../common/parallel.h"
#include "linear_ce_kernel.h"
#include "paddle/extension.h"

namespace {

void check_float(const paddle::Tensor& t, const char* name, size_t rank) {
  PD_CHECK(t.is_cpu(), "linear_ce_cpu: ", name, " must be on the CPU");
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, "linear_ce_cpu: ", name, " must be float32");
  PD_CHECK(t.shape().size() == rank, "linear_ce_cpu: ", name, " must be ", rank, "-D");
}

lce::Dims make_dims(const paddle::Tensor& h, const paddle::Tensor& w, const paddle::Tensor& labels,
                    bool transposed, int64_t ignore_index) {
  check_float(h, "h", 2);
  check_float(w, "w", 2);
  PD_CHECK(labels.is_cpu() && labels.dtype() == paddle::DataType::INT64 &&
               labels.shape().size() == 1,
           "linear_ce_cpu: labels must be a 1-D int64 CPU tensor");
  const auto hs = h.shape(), ws = w.shape();
  lce::Dims d{hs[0], hs[1], transposed ? ws[0] : ws[1], transposed, ignore_index, ernie5par::env_threads()};
  PD_CHECK((transposed ? ws[1] : ws[0]) == d.M, "linear_ce_cpu: w must be ",
           transposed ? "[V, M]" : "[M, V]", " with M = ", d.M, " (h is [T, M])");
  PD_CHECK(d.V >= 1, "linear_ce_cpu: the vocabulary must not be empty");
  PD_CHECK(labels.shape()[0] == d.T, "linear_ce_cpu: labels must be [T] with T = ", d.T);
  return d;
}

paddle::Tensor scratch(int64_t floats, const paddle::Place& place) {
  // From Paddle's caching allocator: a fresh buffer per call would pay page faults.
  return paddle::empty({std::max<int64_t>(1, floats)}, paddle::DataType::FLOAT32, place);
}

std::vector<paddle::Tensor> LinearCEForward(const paddle::Tensor& h, const paddle::Tensor& w,
                                            const paddle::Tensor& labels, bool transposed,
                                            int64_t ignore_index) {
  const lce::Dims d = make_dims(h, w, labels, transposed, ignore_index);
  auto loss = paddle::empty({d.T}, paddle::DataType::FLOAT32, h.place());
  auto lse = paddle::empty({d.T}, paddle::DataType::FLOAT32, h.place());
  auto work = scratch(lce::forward_scratch_floats(d), h.place());
  try {
    lce::forward(d, h.data<float>(), w.data<float>(), labels.data<int64_t>(), loss.data<float>(),
                 lse.data<float>(), work.data<float>());
  } catch (const std::exception& e) {
    PD_THROW("linear_ce_cpu: ", e.what());
  }
  return {loss, lse};
}

std::vector<paddle::Tensor> LinearCEBackward(const paddle::Tensor& h, const paddle::Tensor& w,
                                             const paddle::Tensor& labels,
                                             const paddle::Tensor& lse,
                                             const paddle::Tensor& dloss, bool transposed,
                                             int64_t ignore_index) {
  const lce::Dims d = make_dims(h, w, labels, transposed, ignore_index);
  PD_CHECK(lse.shape() == labels.shape() && lse.dtype() == paddle::DataType::FLOAT32,
           "linear_ce_cpu_grad: lse must be float32 [T]");
  PD_CHECK(dloss.initialized() && dloss.shape() == labels.shape() &&
               dloss.dtype() == paddle::DataType::FLOAT32,
           "linear_ce_cpu_grad: d loss must be float32 [T]");
  auto dh = paddle::empty(h.shape(), paddle::DataType::FLOAT32, h.place());
  auto dw = paddle::empty(w.shape(), paddle::DataType::FLOAT32, h.place());
  auto work = scratch(lce::backward_scratch_floats(d), h.place());
  try {
    lce::backward(d, h.data<float>(), w.data<float>(), labels.data<int64_t>(), lse.data<float>(),
                  dloss.data<float>(), dh.data<float>(), dw.data<float>(), work.data<float>());
  } catch (const std::exception& e) {
    PD_THROW("linear_ce_cpu: ", e.what());
  }
  return {dh, dw};
}

std::vector<std::vector<int64_t>> ForwardShape(const std::vector<int64_t>& h,
                                               const std::vector<int64_t>&,
                                               const std::vector<int64_t>&) {
  return {{h[0]}, {h[0]}};
}

std::vector<paddle::DataType> ForwardDtype(const paddle::DataType& h, const paddle::DataType&,
                                           const paddle::DataType&) {
  return {h, paddle::DataType::FLOAT32};
}

std::vector<std::vector<int64_t>> BackwardShape(const std::vector<int64_t>& h,
                                                const std::vector<int64_t>& w,
                                                const std::vector<int64_t>&,
                                                const std::vector<int64_t>&,
                                                const std::vector<int64_t>&) {
  return {h, w};
}

}  // namespace

PD_BUILD_OP(linear_ce_cpu)
    .Inputs({"H", "W", "Labels"})
    .Outputs({"Loss", "Lse"})
    .Attrs({"transposed: bool", "ignore_index: int64_t"})
    .SetKernelFn(PD_KERNEL(LinearCEForward))
    .SetInferShapeFn(PD_INFER_SHAPE(ForwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(ForwardDtype));

PD_BUILD_GRAD_OP(linear_ce_cpu)
    .Inputs({"H", "W", "Labels", "Lse", paddle::Grad("Loss")})
    .Outputs({paddle::Grad("H"), paddle::Grad("W")})
    .Attrs({"transposed: bool", "ignore_index: int64_t"})
    .SetKernelFn(PD_KERNEL(LinearCEBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(BackwardShape));
