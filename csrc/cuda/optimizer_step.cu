// CUDA kernels of the optimizer steps, sgd_step and adam_step (formulas: formulas.h, after
// fused_accum/kernels/reference.py), launched by multi-tensor apply (multi_tensor_apply.cuh).
// Lists in Meta: SGD {params, accs, momentum_buffers, masters, steps}; Adam {params, accs,
// exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps}.  Step counts are incremented by a
// separate kernel afterwards, so that every block of a tensor reads the same one.  Every value
// that may change between calls (lr, scales, flags, step counts) is read on the device: no host
// synchronisation.
#include <torch/csrc/stable/accelerator.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "kernel_utils.cuh"
#include "multi_tensor_apply.cuh"
#include "ops.cuh"

namespace fused_accum {
namespace cuda {
namespace {

namespace f = formulas;

// The fp32 working value of a parameter's elements and its write-back: the parameter itself, its
// fp32 master (while the parameter holds its rounding), or its compact master (bfloat16
// parameter + int16 remainder; formulas.h).
template <typename P>
__device__ __forceinline__ float master_unless_written(P held, float master) {
  return f::master_holds(bits_of(held), bits_of(from_f<P>(master))) ? master : to_f(held);
}

template <typename P, bool kCompact>
struct Working {
  P* param;
  float* master;   // fp32 masters, or null
  int16_t* rem;    // compact remainders (kCompact only)
  bool stochastic; // bf16 parameter without master, rounded stochastically
  uint32_t key;    // the tensor's rounding key
  int64_t base;    // index in the tensor of this chunk's element 0

  __device__ __forceinline__ P round(float p, int64_t i) const {
    if constexpr (std::is_same_v<P, __nv_bfloat16>) {
      if (stochastic) return __ushort_as_bfloat16(f::stochastic_bf16(p, key, base + i));
    }
    return from_f<P>(p);
  }

  __device__ __forceinline__ Vec<float> load(int64_t i) const {
    Vec<float> out;
    if constexpr (kCompact) {
      const Vec<uint16_t> hv = load_vec(reinterpret_cast<const uint16_t*>(param) + i);
      const Vec<int16_t> rv = load_vec(rem + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) out.v[k] = f::compact_join(hv.v[k], rv.v[k]);
    } else if (master) {
      const Vec<P> held = load_vec(param + i);
      out = load_vec(master + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) out.v[k] = master_unless_written(held.v[k], out.v[k]);
    } else {
      const Vec<P> raw = load_vec(param + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) out.v[k] = to_f(raw.v[k]);
    }
    return out;
  }

  __device__ __forceinline__ void store(int64_t i, const Vec<float>& p) const {
    if constexpr (kCompact) {
      Vec<uint16_t> hv;
      Vec<int16_t> rv;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const f::CompactPair pair = f::compact_split(p.v[k]);
        hv.v[k] = pair.high;
        rv.v[k] = pair.rem;
      }
      store_vec(reinterpret_cast<uint16_t*>(param) + i, hv);
      store_vec(rem + i, rv);
    } else {
      Vec<P> out;
#pragma unroll
      for (int k = 0; k < kVec; ++k) out.v[k] = round(p.v[k], i + k);
      if (master) store_vec(master + i, p);
      store_vec(param + i, out);
    }
  }

  __device__ __forceinline__ float load1(int64_t i) const {
    if constexpr (kCompact) return f::compact_join(reinterpret_cast<const uint16_t*>(param)[i], rem[i]);
    return master ? master_unless_written(param[i], master[i]) : to_f(param[i]);
  }

  __device__ __forceinline__ void store1(int64_t i, float p) const {
    if constexpr (kCompact) {
      const f::CompactPair pair = f::compact_split(p);
      rem[i] = pair.rem;
      reinterpret_cast<uint16_t*>(param)[i] = pair.high;
    } else {
      if (master) master[i] = p;
      param[i] = round(p, i);
    }
  }
};

template <typename P, bool kCompact, int N>
__device__ __forceinline__ Working<P, kCompact> working(const Meta<N>& meta, const Chunk& c,
                                                        int master_list, int64_t rounding_seed) {
  float* master = kCompact ? nullptr : slice<float>(meta, master_list, c);
  const float step = *static_cast<const float*>(meta.ptr[N - 1][c.t]);
  return {slice<P>(meta, 0, c), master, kCompact ? slice<int16_t>(meta, master_list, c) : nullptr,
          rounding_seed >= 0 && master == nullptr && !kCompact,
          f::rounding_key(rounding_seed, step, meta.id[c.t]), c.begin};
}

struct SgdHyper {
  float momentum, one_minus_dampening, weight_decay;
  bool nesterov, maximize;
};

template <typename P, bool kCompact>
__global__ void __launch_bounds__(kThreads) sgd_kernel(Meta<5> meta, SgdHyper h, const float* lr_ptr,
                                                      const float* scale_ptr, const float* found_inf,
                                                      int64_t rounding_seed) {
  if (*found_inf != 0.0f) return;
  const Chunk c = locate(meta, blockIdx.x);
  const Working<P, kCompact> w = working<P, kCompact>(meta, c, 3, rounding_seed);
  const float* acc = slice<const float>(meta, 1, c);
  float* buf = slice<float>(meta, 2, c);
  const bool first_step = *static_cast<const float*>(meta.ptr[4][c.t]) == 0.0f;
  const float lr = *lr_ptr, scale = *scale_ptr;
  auto update = [&](float a, float p, float b, float& b_out) {
    float g = a * scale;
    if (h.maximize) g = -g;
    if (h.weight_decay != 0.0f) g = f::l2_decay(g, h.weight_decay, p);
    if (buf) {
      b_out = f::sgd_momentum(b, g, h.momentum, h.one_minus_dampening, first_step);
      g = f::sgd_direction(g, b_out, h.momentum, h.nesterov);
    }
    return p - lr * g;
  };
  for_chunk(c, meta.flags[c.t] & kAligned, [&](int64_t i, int count) {
    if (count == kVec) {
      const Vec<float> av = load_vec(acc + i);
      Vec<float> pv = w.load(i), bv = {};
      if (buf) bv = load_vec(buf + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) pv.v[k] = update(av.v[k], pv.v[k], bv.v[k], bv.v[k]);
      if (buf) store_vec(buf + i, bv);
      w.store(i, pv);
    } else {
      float b_out = 0.0f;
      const float p = update(acc[i], w.load1(i), buf ? buf[i] : 0.0f, b_out);
      if (buf) buf[i] = b_out;
      w.store1(i, p);
    }
  });
}

struct AdamHyper {
  float beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay;
  double beta1_d, beta2_d;
  float lerp_back;   // 1 - (1 - beta1) in fp32: torch.lerp's second form, for weights >= 0.5
  bool amsgrad, maximize, decoupled;
};

template <typename P, bool kCompact>
__global__ void __launch_bounds__(kThreads) adam_kernel(Meta<7> meta, AdamHyper h, const float* lr_ptr,
                                                       const float* scale_ptr, const float* found_inf,
                                                       int64_t rounding_seed) {
  if (*found_inf != 0.0f) return;
  const Chunk c = locate(meta, blockIdx.x);
  const Working<P, kCompact> w = working<P, kCompact>(meta, c, 5, rounding_seed);
  const float* acc = slice<const float>(meta, 1, c);
  float* m = slice<float>(meta, 2, c);
  float* v = slice<float>(meta, 3, c);
  float* vmax = slice<float>(meta, 4, c);
  // Bias corrections in double from the step count, as the reference computes them.
  const double step = static_cast<double>(*static_cast<const float*>(meta.ptr[6][c.t])) + 1.0;
  const float lr = *lr_ptr, scale = *scale_ptr;
  const float step_size = f::adam_step_size(lr, h.beta1_d, step);
  const float bc2_sqrt = f::adam_bc2_sqrt(h.beta2_d, step);
  const float decay = f::decoupled_decay(lr, h.weight_decay);
  const bool small_weight = f::lerp_small_weight(h.one_minus_beta1);
  auto update = [&](float a, float p, float& mk, float& vk, float& vmaxk) {
    float g = a * scale;
    if (h.maximize) g = -g;
    if (h.weight_decay != 0.0f) {
      if (h.decoupled) p *= decay;
      else g = f::l2_decay(g, h.weight_decay, p);
    }
    mk = f::adam_exp_avg(mk, g, h.one_minus_beta1, h.lerp_back, small_weight);
    vk = f::adam_exp_avg_sq(vk, g, h.beta2, h.one_minus_beta2);
    float second = vk;
    if (vmax) {
      second = f::nan_maximum(vk, vmaxk);
      vmaxk = second;
    }
    return f::adam_update(p, mk, second, step_size, bc2_sqrt, h.eps);
  };
  for_chunk(c, meta.flags[c.t] & kAligned, [&](int64_t i, int count) {
    if (count == kVec) {
      const Vec<float> av = load_vec(acc + i);
      Vec<float> mv = load_vec(m + i), vv = load_vec(v + i), xv = {}, pv = w.load(i);
      if (vmax) xv = load_vec(vmax + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) pv.v[k] = update(av.v[k], pv.v[k], mv.v[k], vv.v[k], xv.v[k]);
      store_vec(m + i, mv);
      store_vec(v + i, vv);
      if (vmax) store_vec(vmax + i, xv);
      w.store(i, pv);
    } else {
      float mk = m[i], vk = v[i], xk = vmax ? vmax[i] : 0.0f;
      const float p = update(acc[i], w.load1(i), mk, vk, xk);
      m[i] = mk;
      v[i] = vk;
      if (vmax) vmax[i] = xk;
      w.store1(i, p);
    }
  });
}

template <int N>
__global__ void increment_steps_kernel(Meta<N> meta, int list, const float* found_inf) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < meta.count && *found_inf == 0.0f) *static_cast<float*>(meta.ptr[list][t]) += 1.0f;
}

// Launches kernel(meta, ...) for params grouped by dtype, kMaxTensors at a time, then increments
// their step counts.
template <int N, typename Launch>
void launch_steps(const char* op, const std::vector<Tensor>& params,
                  const std::vector<const std::vector<Tensor>*>& lists, const Tensor& found_inf,
                  const Launch& launch) {
  const int32_t device = params[0].get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  for (const auto& group : by_dtype(params)) {
    dispatch_float_types(group.first, op, "params", [&](auto* tag) {
      multi_tensor_apply<N>(lists, group.second, N - 1, [&](Meta<N>& meta, int32_t blocks, size_t) {
        if (blocks > 0) {
          launch(tag, meta, blocks, stream);
          check_launch(op);
        }
        increment_steps_kernel<N><<<(meta.count + 255) / 256, 256, 0, stream>>>(
            meta, N - 1, static_cast<const float*>(found_inf.data_ptr()));
        check_launch(op);
      });
    });
  }
}

// Masters are all fp32, or all int16 remainders of bfloat16 parameters (compact); returns which.
bool check_masters(const std::vector<Tensor>& masters, const std::vector<Tensor>& params, const char* op) {
  if (masters.empty()) return false;
  const bool compact = masters[0].scalar_type() == ScalarType::Short;
  check_list(masters, params, op, "masters", false);
  for (size_t i = 0; i < masters.size(); ++i)
    STD_TORCH_CHECK(compact ? (masters[i].scalar_type() == ScalarType::Short &&
                               params[i].scalar_type() == ScalarType::BFloat16)
                            : masters[i].scalar_type() == ScalarType::Float,
                    "fused_accum.", op, ": masters must all be float32, or all int16 remainders of "
                    "bfloat16 parameters (compact masters); masters[", i, "] is not");
  return compact;
}

void check_steps(const std::vector<Tensor>& steps, const std::vector<Tensor>& params, const char* op) {
  STD_TORCH_CHECK(steps.size() == params.size(), "fused_accum.", op, ": one step count per tensor");
  for (const auto& s : steps) check_scalar(s, op, "steps[i]");
}

// The arguments every step op takes; returns whether the masters are compact.
bool check_step_args(const char* op, const std::vector<Tensor>& params, const std::vector<Tensor>& accs,
                     const std::vector<Tensor>& masters, const std::vector<Tensor>& steps,
                     const Tensor& lr, const Tensor& grad_scale, const Tensor& found_inf) {
  check_list(params, params, op, "params", false);
  check_list(accs, params, op, "accs", true);
  check_steps(steps, params, op);
  for (const Tensor* t : {&lr, &grad_scale, &found_inf}) check_scalar(*t, op, "a scalar argument");
  return check_masters(masters, params, op);
}

}  // namespace

void sgd_step(std::vector<Tensor> params, std::vector<Tensor> accs,
              std::vector<Tensor> momentum_buffers, std::vector<Tensor> steps,
              std::vector<Tensor> masters, Tensor lr, double momentum, double dampening,
              double weight_decay, bool nesterov, bool maximize, Tensor grad_scale,
              Tensor found_inf, int64_t rounding_seed) {
  if (params.empty()) return;
  const bool compact = check_step_args("sgd_step", params, accs, masters, steps, lr, grad_scale, found_inf);
  STD_TORCH_CHECK(momentum == 0 || !momentum_buffers.empty(),
                  "fused_accum.sgd_step: momentum != 0 needs momentum_buffers");
  if (momentum != 0) check_list(momentum_buffers, params, "sgd_step", "momentum_buffers", true);
  const SgdHyper h{static_cast<float>(momentum), f::one_minus(dampening),
                   static_cast<float>(weight_decay), nesterov, maximize};
  const std::vector<Tensor> no_buffers;
  const auto* buffers = momentum != 0 ? &momentum_buffers : &no_buffers;
  launch_steps<5>("sgd_step", params, {&params, &accs, buffers, &masters, &steps}, found_inf,
                  [&](auto* tag, const Meta<5>& meta, int32_t blocks, cudaStream_t stream) {
                    using P = std::remove_pointer_t<decltype(tag)>;
                    auto kernel = sgd_kernel<P, false>;
                    if constexpr (std::is_same_v<P, __nv_bfloat16>) {
                      if (compact) kernel = sgd_kernel<P, true>;   // check_masters: bf16 only
                    }
                    kernel<<<blocks, kThreads, 0, stream>>>(
                        meta, h, static_cast<const float*>(lr.data_ptr()),
                        static_cast<const float*>(grad_scale.data_ptr()),
                        static_cast<const float*>(found_inf.data_ptr()), rounding_seed);
                  });
}

void adam_step(std::vector<Tensor> params, std::vector<Tensor> accs, std::vector<Tensor> exp_avgs,
               std::vector<Tensor> exp_avg_sqs, std::vector<Tensor> max_exp_avg_sqs,
               std::vector<Tensor> steps, std::vector<Tensor> masters, Tensor lr, double beta1,
               double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
               bool decoupled_weight_decay, Tensor grad_scale, Tensor found_inf,
               int64_t rounding_seed) {
  if (params.empty()) return;
  const bool compact = check_step_args("adam_step", params, accs, masters, steps, lr, grad_scale, found_inf);
  check_list(exp_avgs, params, "adam_step", "exp_avgs", true);
  check_list(exp_avg_sqs, params, "adam_step", "exp_avg_sqs", true);
  STD_TORCH_CHECK(!amsgrad || !max_exp_avg_sqs.empty(), "fused_accum.adam_step: amsgrad needs max_exp_avg_sqs");
  if (amsgrad) check_list(max_exp_avg_sqs, params, "adam_step", "max_exp_avg_sqs", true);
  const float one_minus_beta1 = f::one_minus(beta1);
  const AdamHyper h{static_cast<float>(beta2), one_minus_beta1, f::one_minus(beta2),
                    static_cast<float>(eps), static_cast<float>(weight_decay), beta1, beta2,
                    f::lerp_back(one_minus_beta1), amsgrad, maximize, decoupled_weight_decay};
  const std::vector<Tensor> none;
  const auto* vmax = amsgrad ? &max_exp_avg_sqs : &none;
  launch_steps<7>("adam_step", params, {&params, &accs, &exp_avgs, &exp_avg_sqs, vmax, &masters, &steps},
                  found_inf, [&](auto* tag, const Meta<7>& meta, int32_t blocks, cudaStream_t stream) {
                    using P = std::remove_pointer_t<decltype(tag)>;
                    auto kernel = adam_kernel<P, false>;
                    if constexpr (std::is_same_v<P, __nv_bfloat16>) {
                      if (compact) kernel = adam_kernel<P, true>;   // check_masters: bf16 only
                    }
                    kernel<<<blocks, kThreads, 0, stream>>>(
                        meta, h, static_cast<const float*>(lr.data_ptr()),
                        static_cast<const float*>(grad_scale.data_ptr()),
                        static_cast<const float*>(found_inf.data_ptr()), rounding_seed);
                  });
}

}  // namespace cuda
}  // namespace fused_accum
