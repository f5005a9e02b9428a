// CPU kernels of the fused_accum op set (schemas: fused_accum/kernels/schemas.py; formulas:
// fused_accum/kernels/reference.py).  One call handles every tensor of a bucket: the tensors are
// cut into chunks, the chunks run on ATen's thread pool, and per-chunk partial results (sum of
// squares, non-finite flags) are combined in chunk order, so results do not depend on the number
// of threads.  Inner loops are `omp simd` loops (built with -fopenmp-simd): the reductions in them
// may be reordered, which is what lets them vectorize without -ffast-math (that would break the
// non-finite checks and torch's rounding).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace fused_accum {
namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per task: small enough to split 64K tensors across threads

// Element conversions, branch-free so that loops vectorize; bfloat16 rounding is c10's
// (round to nearest even, NaN to 0x7FC0).
inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }
inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

// IEEE fp16 <-> fp32 in 32-bit integer and float arithmetic (the branch-free algorithms of the
// FP16 library, also c10's): GCC 12 has no vector type for _Float16 without AVX512-FP16, so a
// cast would keep fp16 loops scalar.  Exact, with round-to-nearest-even like torch's casts; it
// relies on separately rounded products, so this file must not be built with -ffp-contract=fast.
inline float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * bits_to_f32(0x7800000u);
  const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_to_f32(sign | (two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized)));
}
inline uint16_t f32_to_f16(float f) {
  float base = (std::fabs(f) * bits_to_f32(0x77800000u)) * bits_to_f32(0x08800000u);
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const c10::BFloat16* p, int64_t i) {
  return bf16_to_f32(reinterpret_cast<const uint16_t*>(p)[i]);
}
inline float load(const c10::Half* p, int64_t i) {
  return f16_to_f32(reinterpret_cast<const uint16_t*>(p)[i]);
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(c10::BFloat16* p, int64_t i, float v) {
  reinterpret_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
}
inline void store(c10::Half* p, int64_t i, float v) {
  reinterpret_cast<uint16_t*>(p)[i] = f32_to_f16(v);
}

struct Task {
  int64_t tensor, begin, end;
};

std::vector<Task> make_tasks(at::TensorList tensors) {
  std::vector<Task> tasks;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) tasks.push_back({t, b, std::min(n, b + kChunk)});
  }
  return tasks;
}

template <typename F>
void for_each_task(const std::vector<Task>& tasks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(i, tasks[i]);
  });
}

float scalar_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat && t.is_cpu(),
              "fused_accum: ", name, " must be a one-element float32 CPU tensor");
  return *t.data_ptr<float>();
}

void check_pairs(const char* op, at::TensorList a, const char* a_name, at::TensorList b,
                 const char* b_name) {
  TORCH_CHECK(a.size() == b.size(), "fused_accum.", op, ": ", a.size(), " ", a_name, " but ",
              b.size(), " ", b_name);
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].numel() == b[i].numel(), "fused_accum.", op, ": ", a_name, "[", i, "] has ",
                a[i].numel(), " elements, ", b_name, "[", i, "] has ", b[i].numel());
    TORCH_CHECK(a[i].is_contiguous() && b[i].is_contiguous(), "fused_accum.", op, ": ", a_name,
                "[", i, "] and ", b_name, "[", i, "] must be contiguous");
    TORCH_CHECK(a[i].is_cpu() && b[i].is_cpu(), "fused_accum.", op, ": CPU tensors expected");
  }
}

void check_fp32(const char* op, at::TensorList list, const char* name) {
  for (size_t i = 0; i < list.size(); ++i)
    TORCH_CHECK(list[i].scalar_type() == at::kFloat && list[i].is_contiguous(), "fused_accum.",
                op, ": ", name, "[", i, "] must be a contiguous float32 tensor");
}

template <typename F>
void dispatch_float_types(at::ScalarType type, const char* what, const F& f) {
  switch (type) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<c10::BFloat16*>(nullptr)); break;
    case at::kHalf: f(static_cast<c10::Half*>(nullptr)); break;
    default: TORCH_CHECK(false, "fused_accum: ", what, " must be float32, bfloat16 or float16");
  }
}

// ---------------------------------------------------------------------------------------------
// accumulate: acc = (first ? 0 : acc) + w * float(g); flag non-finite results; optional sum acc^2

template <typename G, bool kFirst>
void accumulate_range(const G* __restrict__ g, float* __restrict__ acc, int64_t n, float w,
                      double& sq_out, bool& bad_out) {
  float sq = 0.0f, nf = 0.0f;
#pragma omp simd reduction(+ : sq, nf)
  for (int64_t j = 0; j < n; ++j) {
    const float c = w * load(g, j);
    const float a = kFirst ? c : acc[j] + c;
    acc[j] = a;
    sq += a * a;
    nf += a * 0.0f;  // NaN exactly when a is inf or NaN
  }
  sq_out = sq;
  bad_out = !(nf == 0.0f);
}

void accumulate_cpu(at::TensorList grads, at::TensorList accs, at::IntArrayRef first,
                    const at::Tensor& weight, const at::Tensor& found_inf,
                    const std::optional<at::Tensor>& sumsq) {
  check_pairs("accumulate", grads, "grads", accs, "accs");
  check_fp32("accumulate", accs, "accs");
  TORCH_CHECK(first.size() == accs.size(), "fused_accum.accumulate: ", first.size(),
              " first flags for ", accs.size(), " tensors");
  const float w = scalar_of(weight, "weight");
  float* flag = found_inf.data_ptr<float>();
  scalar_of(found_inf, "found_inf");
  if (sumsq.has_value()) scalar_of(*sumsq, "sumsq");
  const auto tasks = make_tasks(accs);
  std::vector<double> sq(tasks.size(), 0.0);
  std::vector<char> bad(tasks.size(), 0);
  for_each_task(tasks, [&](int64_t i, const Task& task) {
    const at::Tensor& g = grads[task.tensor];
    float* acc = accs[task.tensor].data_ptr<float>() + task.begin;
    const int64_t n = task.end - task.begin;
    bool b = false;
    dispatch_float_types(g.scalar_type(), "grads", [&](auto* type_tag) {
      using G = std::remove_pointer_t<decltype(type_tag)>;
      const G* src = static_cast<const G*>(g.const_data_ptr()) + task.begin;
      if (first[task.tensor]) accumulate_range<G, true>(src, acc, n, w, sq[i], b);
      else accumulate_range<G, false>(src, acc, n, w, sq[i], b);
    });
    bad[i] = b;
  });
  double total = 0;
  bool any_bad = false;
  for (size_t i = 0; i < tasks.size(); ++i) {
    total += sq[i];
    any_bad = any_bad || bad[i];
  }
  if (any_bad) *flag = 1.0f;
  if (sumsq.has_value()) *sumsq->data_ptr<float>() += static_cast<float>(total);
}

// ---------------------------------------------------------------------------------------------
// norm: sumsq += sum acc^2

void norm_cpu(at::TensorList accs, const at::Tensor& sumsq) {
  check_fp32("norm", accs, "accs");
  scalar_of(sumsq, "sumsq");
  const auto tasks = make_tasks(accs);
  std::vector<double> sq(tasks.size(), 0.0);
  for_each_task(tasks, [&](int64_t i, const Task& task) {
    const float* a = accs[task.tensor].const_data_ptr<float>() + task.begin;
    const int64_t n = task.end - task.begin;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) s += a[j] * a[j];
    sq[i] = s;
  });
  double total = 0;
  for (double s : sq) total += s;
  *sumsq.data_ptr<float>() += static_cast<float>(total);
}

// ---------------------------------------------------------------------------------------------
// Optimizer steps.  The fp32 working value of a parameter is its master when there is one (an
// fp32 master only while the parameter holds its rounding, a compact one only while its bits
// round back to the parameter), else the parameter itself
// converted; the result is written to both.

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

// How a parameter's fp32 working value is kept: the parameter itself, an fp32 master, or a
// compact master (bfloat16 parameter + int16 remainder: u = (p << 16) + r as bits, p rounded to
// nearest with ties away from zero, unless written since; see compact_master and reference.py).
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
void with_master_mode(Master mode, const F& f) {
  switch (mode) {
    case Master::kNone: f(std::integral_constant<Master, Master::kNone>{}); break;
    case Master::kFp32: f(std::integral_constant<Master, Master::kFp32>{}); break;
    case Master::kCompact: f(std::integral_constant<Master, Master::kCompact>{}); break;
  }
}

template <typename F>
void with_flag(bool flag, const F& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

// A parameter element's bits, and the bits store() writes for fp32 v.
inline uint32_t held_bits(const float* p, int64_t j) { return f32_to_bits(p[j]); }
inline uint32_t held_bits(const c10::BFloat16* p, int64_t j) {
  return reinterpret_cast<const uint16_t*>(p)[j];
}
inline uint32_t held_bits(const c10::Half* p, int64_t j) {
  return reinterpret_cast<const uint16_t*>(p)[j];
}
inline uint32_t stored_bits(const float*, float v) { return f32_to_bits(v); }
inline uint32_t stored_bits(const c10::BFloat16*, float v) { return f32_to_bf16(v); }
inline uint32_t stored_bits(const c10::Half*, float v) { return f32_to_f16(v); }

// The fp32 master, unless the parameter no longer holds the master's rounding: then it was
// written since the last step (load_state_dict, an initialiser, clamp_) and its value is updated.
template <typename P>
inline float master_unless_written(const P* param, const float* master, int64_t j) {
  const float m = master[j];
  return held_bits(param, j) == stored_bits(param, m) ? m : load(param, j);
}

// Compact masters (see reference.py): the fp32 bits u = (p << 16) + r; p is u rounded to nearest
// with ties away from zero, a NaN u is held as (0x7FC0, 0).  A pair whose u does not round back
// to p was written since the last step (+-0 over a negative remainder, +-inf over a positive
// one: NaN bit patterns; NaN parameters): its master is p, the remainder dropped.  Selects, no
// branches, so that the loops vectorize.
constexpr uint32_t kCanonicalNan = 0x7FC00000u;
inline uint32_t canonical_nan(uint32_t u) {
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? kCanonicalNan : u;
}
inline uint32_t compact_high(uint32_t u) { return ((canonical_nan(u) + 0x8000u) >> 16) & 0xFFFFu; }

inline float compact_master(uint32_t high, int16_t rem) {
  const uint32_t u = (high << 16) + static_cast<uint32_t>(static_cast<int32_t>(rem));
  return bits_to_f32(compact_high(u) == high ? u : high << 16);
}

template <typename P, Master kM>
inline float load_working(const P* param, const float* master, const int16_t* rem, int64_t j) {
  if constexpr (kM == Master::kFp32) {
    return master_unless_written(param, master, j);
  } else if constexpr (kM == Master::kCompact) {
    return compact_master(reinterpret_cast<const uint16_t*>(param)[j], rem[j]);
  } else {
    return load(param, j);
  }
}

// Stochastic rounding of bf16 parameters without masters (see reference.py): 16 random bits from
// a counter-based hash of a per-tensor key (seed, step, position) and the element index.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

uint32_t rounding_key(int64_t seed, float step, int64_t tensor_id) {
  const uint64_t s = static_cast<uint64_t>(seed) + 0x9E3779B9ull * static_cast<uint64_t>(step + 1.0f) +
                     0x85EBCA6Bull * static_cast<uint64_t>(tensor_id);
  return mix32(static_cast<uint32_t>(s));
}

inline uint16_t stochastic_bf16(float p, uint32_t key, int64_t index) {
  const uint32_t u = f32_to_bits(p);
  const uint32_t r = mix32(key ^ static_cast<uint32_t>(index)) & 0xFFFFu;
  const uint32_t high = ((u + r) >> 16) & 0xFFFFu;
  return p != p ? uint16_t{0x7FC0} : static_cast<uint16_t>(high);
}

template <typename P, Master kM>
inline void store_working(P* param, float* master, int16_t* rem, int64_t j, float p) {
  if constexpr (kM == Master::kCompact) {
    const uint32_t u = canonical_nan(f32_to_bits(p));
    const uint32_t high = compact_high(u);
    rem[j] = static_cast<int16_t>(static_cast<uint16_t>(u - (high << 16)));
    reinterpret_cast<uint16_t*>(param)[j] = static_cast<uint16_t>(high);
  } else {
    if constexpr (kM == Master::kFp32) master[j] = p;
    store(param, j, p);
  }
}

void check_state(const char* op, at::TensorList params, at::TensorList state, const char* name) {
  check_pairs(op, params, "params", state, name);
  check_fp32(op, state, name);
}

// Complements such as 1 - beta are taken in double and rounded once, as torch does: 1 - 0.999f
// would carry 0.999f's rounding error (1e-5 relative) into every update.  Options that would
// branch per element are compile-time flags, or folded into factors that are exact when unused
// (maximize into the sign of scale, decoupled decay into a factor of 1; L2 decay cannot be a
// factor, since 0 * p is NaN for an infinite p: SGD's is a loop-invariant condition, which the
// compiler takes out of the loop, and Adam's a compile-time flag: GCC 12 does not unswitch a
// loop that large, and a condition left in it keeps the loop scalar.
struct SgdHyper {
  float lr, momentum, one_minus_dampening, weight_decay, scale;
  bool nesterov;
};

// kStochastic: bf16 parameters without masters, rounded with the tensor's key; base: the index
// of element 0 of this range in the tensor.
struct Rounding {
  uint32_t key;
  int64_t base;
};

template <typename P, Master kM, bool kStochastic>
inline void store_param(P* param, float* master, int16_t* rem, int64_t j, float p, const Rounding& r) {
  if constexpr (kStochastic && kM == Master::kNone && std::is_same_v<P, c10::BFloat16>) {
    reinterpret_cast<uint16_t*>(param)[j] = stochastic_bf16(p, r.key, r.base + j);
  } else {
    store_working<P, kM>(param, master, rem, j, p);
  }
}

template <typename P, Master kM, bool kMomentum, bool kStochastic>
void sgd_range(P* __restrict__ param, float* __restrict__ master, int16_t* __restrict__ rem,
               const float* __restrict__ acc, float* __restrict__ buf, int64_t n, bool first_step,
               const SgdHyper& h, const Rounding& rounding) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float g = acc[j] * h.scale;
    float p = load_working<P, kM>(param, master, rem, j);
    if (h.weight_decay != 0) g += h.weight_decay * p;   // loop-invariant: 0 * inf would be NaN
    if (kMomentum) {
      const float b = first_step ? g : h.momentum * buf[j] + h.one_minus_dampening * g;
      buf[j] = b;
      g = h.nesterov ? g + h.momentum * b : b;
    }
    p -= h.lr * g;
    store_param<P, kM, kStochastic>(param, master, rem, j, p, rounding);
  }
}

void sgd_step_cpu(at::TensorList params, at::TensorList accs, at::TensorList momentum_buffers,
                  at::TensorList steps, at::TensorList masters, const at::Tensor& lr,
                  double momentum, double dampening, double weight_decay, bool nesterov,
                  bool maximize, const at::Tensor& grad_scale, const at::Tensor& found_inf,
                  int64_t rounding_seed) {
  const StepLists lists{params, accs, masters};
  check_step_lists("sgd_step", lists, steps);
  if (!momentum_buffers.empty()) check_state("sgd_step", params, momentum_buffers, "momentum_buffers");
  TORCH_CHECK(momentum == 0 || !momentum_buffers.empty(),
              "fused_accum.sgd_step: momentum != 0 needs momentum_buffers");
  if (scalar_of(found_inf, "found_inf") != 0) return;
  const float scale = scalar_of(grad_scale, "grad_scale");
  const SgdHyper h{scalar_of(lr, "lr"), static_cast<float>(momentum),
                   static_cast<float>(1.0 - dampening), static_cast<float>(weight_decay),
                   maximize ? -scale : scale, nesterov};
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
    const Rounding rounding{rounding_key(rounding_seed, step, t), b};
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
    const float g = kL2 ? g0 + h.l2 * p : g0;   // without L2 decay, no 0 * p: NaN for an infinite p
    // torch.lerp(m, g, w): m + w * (g - m) for w < 0.5, g - (g - m) * (1 - w) otherwise
    // (the form is a compile-time choice: a per-element select stops the loop vectorizing)
    const float mj = kLerpSmall ? m[j] + h.one_minus_beta1 * (g - m[j])
                                : g - (g - m[j]) * h.lerp_back;
    const float vj = h.beta2 * v[j] + (g * g) * h.one_minus_beta2;   // the reference's order
    m[j] = mj;
    v[j] = vj;
    float second = vj;
    if (kAmsgrad) {   // torch.maximum: a NaN on either side wins (std::max would drop one)
      second = (vj > vmax[j] || vj != vj) ? vj : vmax[j];
      vmax[j] = second;
    }
    p -= step_size * mj / (std::sqrt(second) / bc2_sqrt + h.eps);
    store_param<P, kM, kStochastic>(param, master, rem, j, p, rounding);
  }
}

void adam_step_cpu(at::TensorList params, at::TensorList accs, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                   at::TensorList steps, at::TensorList masters, const at::Tensor& lr,
                   double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                   bool maximize, bool decoupled_weight_decay, const at::Tensor& grad_scale,
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
  const AdamHyper h{static_cast<float>(beta2), static_cast<float>(1.0 - beta1),
                    static_cast<float>(1.0 - beta2), static_cast<float>(eps),
                    decoupled_weight_decay ? 0.0f : static_cast<float>(weight_decay),
                    // float64 from the fp32 lr and weight decay, rounded once (as the reference)
                    decoupled_weight_decay
                        ? static_cast<float>(1.0 - lr_value * static_cast<float>(weight_decay))
                        : 1.0f,
                    maximize ? -scale : scale,
                    1.0f - static_cast<float>(1.0 - beta1)};
  // Bias corrections per tensor, in double from the step count (as the reference does).
  std::vector<float> step_size(params.size()), bc2_sqrt(params.size());
  for (size_t t = 0; t < params.size(); ++t) {
    const double step = *steps[t].const_data_ptr<float>() + 1.0;
    step_size[t] = static_cast<float>(lr_value / (1.0 - std::pow(beta1, step)));
    bc2_sqrt[t] = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step)));
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
      const Rounding rounding{rounding_key(rounding_seed, *steps[t].const_data_ptr<float>(), t), b};
      with_master_mode(mode, [&](auto mm) {
        with_flag(amsgrad, [&](auto ams) {
          with_flag(rounding_seed >= 0, [&](auto sr) {
            with_flag(h.one_minus_beta1 < 0.5f, [&](auto small) {
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

}  // namespace

TORCH_LIBRARY_IMPL(fused_accum, CPU, m) {
  m.impl("accumulate", &accumulate_cpu);
  m.impl("norm", &norm_cpu);
  m.impl("sgd_step", &sgd_step_cpu);
  m.impl("adam_step", &adam_step_cpu);
}

}  // namespace fused_accum
