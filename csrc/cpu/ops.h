// The CPU implementations of the op schemas in fused_accum/kernels/schemas.py, registered in
// registration.cpp: accumulate.cpp (accumulate, norm) and optimizer_step.cpp (sgd_step, adam_step).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace fused_accum {
namespace cpu {

// accumulate: acc = (first ? 0 : acc) + w * float(g); flag non-finite results; optional sum acc^2
void accumulate(at::TensorList grads, at::TensorList accs, at::IntArrayRef first,
                const at::Tensor& weight, const at::Tensor& found_inf,
                const std::optional<at::Tensor>& sumsq);

// norm: sumsq += sum acc^2
void norm(at::TensorList accs, const at::Tensor& sumsq);

void sgd_step(at::TensorList params, at::TensorList accs, at::TensorList momentum_buffers,
              at::TensorList steps, at::TensorList masters, const at::Tensor& lr, double momentum,
              double dampening, double weight_decay, bool nesterov, bool maximize,
              const at::Tensor& grad_scale, const at::Tensor& found_inf, int64_t rounding_seed);

void adam_step(at::TensorList params, at::TensorList accs, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
               at::TensorList masters, const at::Tensor& lr, double beta1, double beta2,
               double eps, double weight_decay, bool amsgrad, bool maximize,
               bool decoupled_weight_decay, const at::Tensor& grad_scale,
               const at::Tensor& found_inf, int64_t rounding_seed);

}  // namespace cpu
}  // namespace fused_accum
