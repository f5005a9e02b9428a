// The CUDA implementations of the op schemas in fused_accum/kernels/schemas.py, registered in
// registration.cu: accumulate.cu (accumulate, norm) and optimizer_step.cu (sgd_step, adam_step).
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fused_accum {
namespace cuda {

void accumulate(std::vector<torch::stable::Tensor> grads, std::vector<torch::stable::Tensor> accs,
                std::vector<int64_t> first, torch::stable::Tensor weight,
                torch::stable::Tensor found_inf, std::optional<torch::stable::Tensor> sumsq);

void norm(std::vector<torch::stable::Tensor> accs, torch::stable::Tensor sumsq);

void sgd_step(std::vector<torch::stable::Tensor> params, std::vector<torch::stable::Tensor> accs,
              std::vector<torch::stable::Tensor> momentum_buffers,
              std::vector<torch::stable::Tensor> steps, std::vector<torch::stable::Tensor> masters,
              torch::stable::Tensor lr, double momentum, double dampening, double weight_decay,
              bool nesterov, bool maximize, torch::stable::Tensor grad_scale,
              torch::stable::Tensor found_inf, int64_t rounding_seed);

void adam_step(std::vector<torch::stable::Tensor> params, std::vector<torch::stable::Tensor> accs,
               std::vector<torch::stable::Tensor> exp_avgs,
               std::vector<torch::stable::Tensor> exp_avg_sqs,
               std::vector<torch::stable::Tensor> max_exp_avg_sqs,
               std::vector<torch::stable::Tensor> steps, std::vector<torch::stable::Tensor> masters,
               torch::stable::Tensor lr, double beta1, double beta2, double eps,
               double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
               torch::stable::Tensor grad_scale, torch::stable::Tensor found_inf,
               int64_t rounding_seed);

}  // namespace cuda
}  // namespace fused_accum
