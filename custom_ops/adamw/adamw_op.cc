// Paddle custom-op registration of the fused AdamW kernels.
//
//   adamw_step(params, grads, moment1, moment2; beta1_pows, beta2_pows, decay, lr, beta1, beta2,
//              epsilon, coeff, grad_scale)
//       params, moment1 and moment2 (lists of tensors) updated in place
//   adamw_sq_norms(grads) -> float64 [len(grads)]: sum of squares of each gradient
//
// The beta powers are per-parameter attributes (the optimizer keeps them on the host and advances
// them after the step, as float32 products like Paddle's). The Python seam
// (paddle_ernie5/ops/adamw.py) passes parameters through `detach()`: Paddle refuses in-place
// custom ops on leaf tensors that require gradients, and a detached tensor shares the storage.
// Threads: OMP_NUM_THREADS, the variable Paddle's own CPU kernels follow.
#include <exception>
#include <vector>

#include "../common/parallel.h"
#include "adamw_kernel.h"
#include "paddle/extension.h"

namespace {

void check_float(const paddle::Tensor& t, const char* op, const char* name, size_t i,
                 int64_t numel) {
  PD_CHECK(t.initialized() && t.is_cpu() && t.dtype() == paddle::DataType::FLOAT32 &&
               t.is_contiguous(),
           op, ": ", name, "[", i, "] must be an initialized, contiguous float32 CPU tensor");
  PD_CHECK(t.numel() == numel, op, ": ", name, "[", i, "] has ", t.numel(), " elements, the ",
           "parameter ", numel);
}

void AdamWStep(std::vector<paddle::Tensor>& params, const std::vector<paddle::Tensor>& grads,
               std::vector<paddle::Tensor>& moment1, std::vector<paddle::Tensor>& moment2,
               const std::vector<float>& beta1_pows, const std::vector<float>& beta2_pows,
               const std::vector<int>& decay, float lr, float beta1, float beta2, float epsilon,
               float coeff, float grad_scale) {
  const size_t n = params.size();
  PD_CHECK(grads.size() == n && moment1.size() == n && moment2.size() == n &&
               beta1_pows.size() == n && beta2_pows.size() == n && decay.size() == n,
           "adamw_step: params, grads, moment1, moment2, beta1_pows, beta2_pows and decay must "
           "have one entry per parameter");
  std::vector<adamw::Slot> slots(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    check_float(params[i], "adamw_step", "params", i, numel);
    check_float(grads[i], "adamw_step", "grads", i, numel);
    check_float(moment1[i], "adamw_step", "moment1", i, numel);
    check_float(moment2[i], "adamw_step", "moment2", i, numel);
    slots[i] = {params[i].data<float>(), grads[i].data<float>(), moment1[i].data<float>(),
                moment2[i].data<float>(), numel};
  }
  const adamw::Hyper h{lr, beta1, beta2, epsilon, coeff, grad_scale};
  try {
    adamw::step(slots, beta1_pows, beta2_pows, decay, h, ernie5par::env_threads());
  } catch (const std::exception& e) {
    PD_THROW("adamw_step: ", e.what());
  }
}

std::vector<paddle::Tensor> GradSqNorms(const std::vector<paddle::Tensor>& grads) {
  std::vector<const float*> ptrs(grads.size());
  std::vector<int64_t> sizes(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    check_float(grads[i], "adamw_sq_norms", "grads", i, grads[i].numel());
    ptrs[i] = grads[i].data<float>();
    sizes[i] = grads[i].numel();
  }
  auto out = paddle::empty({static_cast<int64_t>(grads.size())}, paddle::DataType::FLOAT64,
                           paddle::CPUPlace());
  try {
    adamw::sq_norms(ptrs, sizes, out.data<double>(), ernie5par::env_threads());
  } catch (const std::exception& e) {
    PD_THROW("adamw_sq_norms: ", e.what());
  }
  return {out};
}

std::vector<std::vector<int64_t>> SqNormsShape(const std::vector<std::vector<int64_t>>& grads) {
  return {{static_cast<int64_t>(grads.size())}};
}

std::vector<paddle::DataType> SqNormsDtype(const std::vector<paddle::DataType>&) {
  return {paddle::DataType::FLOAT64};
}

}  // namespace

PD_BUILD_OP(adamw_step)
    .Inputs({paddle::Vec("Params"), paddle::Vec("Grads"), paddle::Vec("Moment1"),
             paddle::Vec("Moment2")})
    .Outputs({paddle::Vec("ParamsOut"), paddle::Vec("Moment1Out"), paddle::Vec("Moment2Out")})
    .Attrs({"beta1_pows: std::vector<float>", "beta2_pows: std::vector<float>",
            "decay: std::vector<int>", "lr: float", "beta1: float", "beta2: float",
            "epsilon: float", "coeff: float", "grad_scale: float"})
    .SetInplaceMap({{paddle::Vec("Params"), paddle::Vec("ParamsOut")},
                    {paddle::Vec("Moment1"), paddle::Vec("Moment1Out")},
                    {paddle::Vec("Moment2"), paddle::Vec("Moment2Out")}})
    .SetKernelFn(PD_KERNEL(AdamWStep));

PD_BUILD_OP(adamw_sq_norms)
    .Inputs({paddle::Vec("Grads")})
    .Outputs({"SqNorms"})
    .SetKernelFn(PD_KERNEL(GradSqNorms))
    .SetInferShapeFn(PD_INFER_SHAPE(SqNormsShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SqNormsDtype));
