// CPU kernels of the optimizer steps, sgd_step and adam_step (formulas: formulas.h, after
// fused_accum/kernels/reference.py).  The fp32 working value of a parameter is its master when
// there is one (an fp32 master only while the parameter holds its rounding, a compact one only
// while its bits round back to the parameter), else the parameter itself converted; the result
// is written to both.  Inner loops are `omp simd` loops: options that would branch per element
// are compile-time flags, or folded into factors that are exact when unused (maximize into the
// sign of scale, decoupled decay into a factor of 1; L2 decay cannot be a factor, since 0 * p is
// NaN for an infinite p: SGD's is a loop-invariant condition, which the compiler takes out of the
// loop, and Adam's a compile-time flag: GCC 12 does not unswitch a loop that large, and a
// condition left in it keeps the loop scalar).
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernel_utils.h"
#include "ops.h"

namespace fused_accum {
namespace cpu {
namespace {

namespace f = formulas;

struct StepLists {
  at::TensorList params, accs, masters;
};

void check_step_lists(const char* op, const StepLists& l, at::TensorList steps) {
  check_pairs(op, l.params, "params", l.accs, "accs");
  check_fp32(op, l.accs, "accs");
  TORCH_CHECK(steps.size() == l.params.size(), "fused_accum.", op, ": one step count per tensor");
  for (const auto& s : steps)
    TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat, "fused_accum.", op,
                ": steps must be one-element float32 tensors");
  if (!l.masters.empty()) {
    check_pairs(op, l.params, "params", l.masters, "masters");
    const bool compact = l.masters[0].scalar_type() == at::kShort;
    for (size_t i = 0; i < l.masters.size(); ++i) {
      TORCH_CHECK(compact ? (l.masters[i].scalar_type() == at::kShort &&
                             l.params[i].scalar_type() == at::kBFloat16)
                          : l.masters[i].scalar_type() == at::kFloat,
                  "fused_accum.", op, ": masters must all be float32, or all int16 remainders of "
                  "bfloat16 parameters (compact masters); masters[", i, "] is not");
    }
  }
}

void check_state(const char* op, at::TensorList params, at::TensorList state, const char* name) {
  check_pairs(op, params, "params", state, name);
  check_fp32(op, state, name);
}

// How a parameter's fp32 working value is kept: the parameter itself, an fp32 master, or a
// compact master (bfloat16 parameter + int16 remainder; formulas.h).
enum class Master { kNone, kFp32, kCompact };

Master master_mode(at::TensorList masters) {
  if (masters.empty()) return Master::kNone;
  return masters[0].scalar_type() == at::kShort ? Master::kCompact : Master::kFp32;
}

// Tensor t's masters from element ``begin``: fp32 masters, or compact remainders, or neither.
struct MasterSlice {
  float* fp32;
  int16_t* rem;
};

MasterSlice master_slice(at::TensorList masters, Master mode, int64_t t, int64_t begin) {
  return {mode == Master::kFp32 ? masters[t].data_ptr<float>() + begin : nullptr,
          mode == Master::kCompact ? masters[t].data_ptr<int16_t>() + begin : nullptr};
}

template <typename F>
void with_master_mode(Master mode, const F& fn) {
  switch (mode) {
    case Master::kNone: fn(std::integral_constant<Master, Master::kNone>{}); break;
    case Master::kFp32: fn(std::integral_constant<Master, Master::kFp32>{}); break;
    case Master::kCompact: fn(std::integral_constant<Master, Master::kCompact>{}); break;
  }
}

template <typename P, Master kM>
inline float load_working(const P* param, const float* master, const int16_t* rem, int64_t j) {
  if constexpr (kM == Master::kFp32) {
    const float m = master[j];
    return f::master_holds(held_bits(param, j), stored_bits(param, m)) ? m : load(param, j);
  } else if constexpr (kM == Master::kCompact) {
    return f::compact_join(reinterpret_cast<const uint16_t*>(param)[j], rem[j]);
  } else {
    return load(param, j);
  }
}

template <typename P, Master kM>
inline void store_working(P* param, float* master, int16_t* rem, int64_t j, float p) {
  if constexpr (kM == Master::kCompact) {
    const f::CompactPair pair = f::compact_split(p);
    rem[j] = pair.rem;
    reinterpret_cast<uint16_t*>(param)[j] = pair.high;
  } else {
    if constexpr (kM == Master::kFp32) master[j] = p;
    store(param, j, p);
  }
}

// kStochastic: bf16 parameters without masters, rounded with the tensor's key; base: the index
// of element 0 of this range in the tensor.
struct Rounding {
  uint32_t key;
  int64_t base;
};

template <typename P, Master kM, bool kStochastic>
inline void store_param(P* param, float* master, int16_t* rem, int64_t j, float p, const Rounding& r) {
  if constexpr (kStochastic && kM == Master::kNone && std::is_same_v<P, c10::BFloat16>) {
    reinterpret_cast<uint16_t*>(param)[j] = f::stochastic_bf16(p, r.key, r.base + j);
  } else {
    store_working<P, kM>(param, master, rem, j, p);
  }
}

struct SgdHyper {
  float lr, momentum, one_minus_dampening, weight_decay, scale;
  bool nesterov;
};

template <typename P, Master kM, bool kMomentum, bool kStochastic>
void sgd_range(P* __restrict__ param, float* __restrict__ master, int16_t* __restrict__ rem,
               const float* __restrict__ acc, float* __restrict__ buf, int64_t n, bool first_step,
               const SgdHyper& h, const Rounding& rounding) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float g = acc[j] * h.scale;
    float p = load_working<P, kM>(param, master, rem, j);
    if (h.weight_decay != 0) g = f::l2_decay(g, h.weight_decay, p);   // loop-invariant
    if (kMomentum) {
      const float b = f::sgd_momentum(buf[j], g, h.momentum, h.one_minus_dampening, first_step);
      buf[j] = b;
      g = f::sgd_direction(g, b, h.momentum, h.nesterov);
    }
    p -= h.lr * g;
    store_param<P, kM, kStochastic>(param, master, rem, j, p, rounding);
  }
}

struct AdamHyper {
  float beta2, one_minus_beta1, one_minus_beta2, eps, l2, decay, scale;
  float lerp_back;   // 1 - (1 - beta1) in fp32: torch.lerp's second form, for weights >= 0.5
};

template <typename P, Master kM, bool kAmsgrad, bool kStochastic, bool kLerpSmall, bool kL2>
void adam_range(P* __restrict__ param, float* __restrict__ master, int16_t* __restrict__ rem,
                const float* __restrict__ acc, float* __restrict__ m, float* __restrict__ v,
                float* __restrict__ vmax, int64_t n, float step_size, float bc2_sqrt,
                const AdamHyper& h, const Rounding& rounding) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float g0 = acc[j] * h.scale;
    float p = load_working<P, kM>(param, master, rem, j) * h.decay;
    const float g = kL2 ? f::l2_decay(g0, h.l2, p) : g0;   // without L2 decay, no 0 * p
    const float mj = f::adam_exp_avg(m[j], g, h.one_minus_beta1, h.lerp_back, kLerpSmall);
    const float vj = f::adam_exp_avg_sq(v[j], g, h.beta2, h.one_minus_beta2);
    m[j] = mj;
    v[j] = vj;
    float second = vj;
    if (kAmsgrad) {
      second = f::nan_maximum(vj, vmax[j]);
      vmax[j] = second;
    }
    p = f::adam_update(p, mj, second, step_size, bc2_sqrt, h.eps);
    store_param<P, kM, kStochastic>(param, master, rem, j, p, rounding);
  }
}

}  // namespace

void sgd_step(at::TensorList params, at::TensorList accs, at::TensorList momentum_buffers,
              at::TensorList steps, at::TensorList masters, const at::Tensor& lr, double momentum,
              double dampening, double weight_decay, bool nesterov, bool maximize,
              const at::Tensor& grad_scale, const at::Tensor& found_inf, int64_t rounding_seed) {
  const StepLists lists{params, accs, masters};
  check_step_lists("sgd_step", lists, steps);
  if (!momentum_buffers.empty()) check_state("sgd_step", params, momentum_buffers, "momentum_buffers");
  TORCH_CHECK(momentum == 0 || !momentum_buffers.empty(),
              "fused_accum.sgd_step: momentum != 0 needs momentum_buffers");
  if (scalar_of(found_inf, "found_inf") != 0) return;
  const float scale = scalar_of(grad_scale, "grad_scale");
  const SgdHyper h{scalar_of(lr, "lr"), static_cast<float>(momentum), f::one_minus(dampening),
                   static_cast<float>(weight_decay), maximize ? -scale : scale, nesterov};
  const Master mode = master_mode(masters);
  const bool has_momentum = momentum != 0;
  const auto tasks = make_tasks(params);
  for_each_task(tasks, [&](int64_t, const Task& task) {
    const int64_t t = task.tensor, b = task.begin, n = task.end - task.begin;
    const MasterSlice ms = master_slice(masters, mode, t, b);
    float* buf = has_momentum ? momentum_buffers[t].data_ptr<float>() + b : nullptr;
    const float step = *steps[t].const_data_ptr<float>();
    const bool first_step = step == 0;
    const float* acc = accs[t].const_data_ptr<float>() + b;
    const Rounding rounding{f::rounding_key(rounding_seed, step, t), b};
    dispatch_float_types(params[t].scalar_type(), "params", [&](auto* type_tag) {
      using P = std::remove_pointer_t<decltype(type_tag)>;
      P* param = static_cast<P*>(params[t].data_ptr()) + b;
      with_master_mode(mode, [&](auto m) {
        with_flag(has_momentum, [&](auto mom) {
          with_flag(rounding_seed >= 0, [&](auto sr) {
            sgd_range<P, decltype(m)::value, decltype(mom)::value, decltype(sr)::value>(
                param, ms.fp32, ms.rem, acc, buf, n, first_step, h, rounding);
          });
        });
      });
    });
  });
  for (const auto& s : steps) *s.data_ptr<float>() += 1;
}

void adam_step(at::TensorList params, at::TensorList accs, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
               at::TensorList masters, const at::Tensor& lr, double beta1, double beta2,
               double eps, double weight_decay, bool amsgrad, bool maximize,
               bool decoupled_weight_decay, const at::Tensor& grad_scale,
               const at::Tensor& found_inf, int64_t rounding_seed) {
  const StepLists lists{params, accs, masters};
  check_step_lists("adam_step", lists, steps);
  check_state("adam_step", params, exp_avgs, "exp_avgs");
  check_state("adam_step", params, exp_avg_sqs, "exp_avg_sqs");
  TORCH_CHECK(!amsgrad || !max_exp_avg_sqs.empty(),
              "fused_accum.adam_step: amsgrad needs max_exp_avg_sqs");
  if (amsgrad) check_state("adam_step", params, max_exp_avg_sqs, "max_exp_avg_sqs");
  if (scalar_of(found_inf, "found_inf") != 0) return;
  const double lr_value = scalar_of(lr, "lr");
  const float scale = scalar_of(grad_scale, "grad_scale");
  const float one_minus_beta1 = f::one_minus(beta1);
  const AdamHyper h{static_cast<float>(beta2), one_minus_beta1, f::one_minus(beta2),
                    static_cast<float>(eps),
                    decoupled_weight_decay ? 0.0f : static_cast<float>(weight_decay),
                    decoupled_weight_decay
                        ? f::decoupled_decay(lr_value, static_cast<float>(weight_decay))
                        : 1.0f,
                    maximize ? -scale : scale, f::lerp_back(one_minus_beta1)};
  // Bias corrections per tensor, in double from the step count (as the reference does).
  std::vector<float> step_size(params.size()), bc2_sqrt(params.size());
  for (size_t t = 0; t < params.size(); ++t) {
    const double step = *steps[t].const_data_ptr<float>() + 1.0;
    step_size[t] = f::adam_step_size(lr_value, beta1, step);
    bc2_sqrt[t] = f::adam_bc2_sqrt(beta2, step);
  }
  const Master mode = master_mode(masters);
  const auto tasks = make_tasks(params);
  for_each_task(tasks, [&](int64_t, const Task& task) {
    const int64_t t = task.tensor, b = task.begin, n = task.end - task.begin;
    const MasterSlice ms = master_slice(masters, mode, t, b);
    float* vmax = amsgrad ? max_exp_avg_sqs[t].data_ptr<float>() + b : nullptr;
    const float* acc = accs[t].const_data_ptr<float>() + b;
    float* m = exp_avgs[t].data_ptr<float>() + b;
    float* v = exp_avg_sqs[t].data_ptr<float>() + b;
    dispatch_float_types(params[t].scalar_type(), "params", [&](auto* type_tag) {
      using P = std::remove_pointer_t<decltype(type_tag)>;
      P* param = static_cast<P*>(params[t].data_ptr()) + b;
      const float ss = step_size[t], bc = bc2_sqrt[t];
      const Rounding rounding{f::rounding_key(rounding_seed, *steps[t].const_data_ptr<float>(), t), b};
      with_master_mode(mode, [&](auto mm) {
        with_flag(amsgrad, [&](auto ams) {
          with_flag(rounding_seed >= 0, [&](auto sr) {
            with_flag(f::lerp_small_weight(h.one_minus_beta1), [&](auto small) {
              with_flag(h.l2 != 0, [&](auto l2) {
                adam_range<P, decltype(mm)::value, decltype(ams)::value, decltype(sr)::value,
                           decltype(small)::value, decltype(l2)::value>(
                    param, ms.fp32, ms.rem, acc, m, v, vmax, n, ss, bc, h, rounding);
              });
            });
          });
        });
      });
    });
  });
  for (const auto& s : steps) *s.data_ptr<float>() += 1;
}

}  // namespace cpu
}  // namespace fused_accum
