// The scalar formulas of fused_accum/kernels/reference.py (the executable specification), written
// once for the CPU kernels (csrc/cpu/, host C++) and the CUDA kernels (csrc/cuda/, device code):
// element conversions, compact masters, the stochastic-rounding hash, and the optimizer updates.
// Every backend must agree with the reference bit for bit, so each formula keeps the reference's
// order of operations; both builds round every product before adding it (-ffp-contract=off,
// nvcc --fmad=false), so the compiler may not fuse them either.
//
// Under nvcc the functions are __host__ __device__.  Where the device has an instruction for a
// formula (bf16/fp16 conversions, bit casts) the device branch (__CUDA_ARCH__) uses it; it gives
// the same result for every non-NaN value, and for NaN the pattern torch's own kernels give on that
// device.  Everything else is the same code on both.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FUSED_ACCUM_FORMULA __host__ __device__ __forceinline__
#else
#define FUSED_ACCUM_FORMULA inline
#endif

namespace fused_accum {
namespace formulas {

// ---------------------------------------------------------------------------------------------
// Bits and element conversions

FUSED_ACCUM_FORMULA float bits_to_f32(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FUSED_ACCUM_FORMULA uint32_t f32_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// bfloat16 <-> fp32, branch-free so that CPU loops vectorize; rounding is c10's (round to nearest
// even, NaN to 0x7FC0 on the CPU).
FUSED_ACCUM_FORMULA float bf16_to_f32(uint16_t h) {
#ifdef __CUDA_ARCH__
  return __bfloat162float(__ushort_as_bfloat16(h));
#else
  return bits_to_f32(static_cast<uint32_t>(h) << 16);
#endif
}

FUSED_ACCUM_FORMULA uint16_t f32_to_bf16(float f) {
#ifdef __CUDA_ARCH__
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t u = f32_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
#endif
}

// IEEE fp16 <-> fp32 in 32-bit integer and float arithmetic (the branch-free algorithms of the
// FP16 library, also c10's): GCC 12 has no vector type for _Float16 without AVX512-FP16, so a
// cast would keep fp16 loops scalar.  Exact, with round-to-nearest-even like torch's casts; it
// relies on separately rounded products, so it must not be built with -ffp-contract=fast.
FUSED_ACCUM_FORMULA float f16_to_f32(uint16_t h) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * bits_to_f32(0x7800000u);
  const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_to_f32(sign | (two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized)));
#endif
}

FUSED_ACCUM_FORMULA uint16_t f32_to_f16(float f) {
#ifdef __CUDA_ARCH__
  return __half_as_ushort(__float2half_rn(f));
#else
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
#endif
}

// NaN exactly when x is inf or NaN: summed over a range, a non-finite probe (no branch).
FUSED_ACCUM_FORMULA float non_finite_probe(float x) { return x * 0.0f; }

// ---------------------------------------------------------------------------------------------
// Masters.  The fp32 working value of a parameter is its master when there is one, else the
// parameter itself converted; the result of a step is written to both.

// An fp32 master holds while the parameter holds the master's rounding (bits as the step writes
// them); otherwise the parameter was written since the last step (load_state_dict, an
// initialiser, clamp_) and its value is the working value: `master_holds(..) ? master : held`.
FUSED_ACCUM_FORMULA bool master_holds(uint32_t held_bits, uint32_t master_rounded_bits) {
  return held_bits == master_rounded_bits;
}

// Compact masters (bfloat16 parameter + int16 remainder): the fp32 bits u = (p << 16) + r; p is u
// rounded to nearest with ties away from zero, a NaN u is held as (0x7FC0, 0).  A pair whose u
// does not round back to p was written since the last step (+-0 over a negative remainder, +-inf
// over a positive one: NaN bit patterns; NaN parameters): its master is p, the remainder dropped.
// Selects, no branches, so that CPU loops vectorize.
constexpr uint32_t kCanonicalNan = 0x7FC00000u;

FUSED_ACCUM_FORMULA uint32_t canonical_nan(uint32_t u) {
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? kCanonicalNan : u;
}

FUSED_ACCUM_FORMULA uint32_t compact_high(uint32_t u) {
  return ((canonical_nan(u) + 0x8000u) >> 16) & 0xFFFFu;
}

// The master of a (parameter bits, remainder) pair.
FUSED_ACCUM_FORMULA float compact_join(uint32_t high, int16_t rem) {
  const uint32_t u = (high << 16) + static_cast<uint32_t>(static_cast<int32_t>(rem));
  return bits_to_f32(compact_high(u) == high ? u : high << 16);
}

struct CompactPair {
  uint16_t high;   // the bfloat16 parameter's bits
  int16_t rem;
};

// The pair that holds fp32 value p.
FUSED_ACCUM_FORMULA CompactPair compact_split(float p) {
  const uint32_t u = canonical_nan(f32_to_bits(p));
  const uint32_t high = compact_high(u);
  return {static_cast<uint16_t>(high), static_cast<int16_t>(static_cast<uint16_t>(u - (high << 16)))};
}

// ---------------------------------------------------------------------------------------------
// Stochastic rounding of bf16 parameters without masters: 16 random bits from a counter-based
// hash of a per-tensor key (seed, step, position in the op's lists) and the element index.

FUSED_ACCUM_FORMULA uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

FUSED_ACCUM_FORMULA uint32_t rounding_key(int64_t seed, float step, int64_t tensor_id) {
  const uint64_t s = static_cast<uint64_t>(seed) + 0x9E3779B9ull * static_cast<uint64_t>(step + 1.0f) +
                     0x85EBCA6Bull * static_cast<uint64_t>(tensor_id);
  return mix32(static_cast<uint32_t>(s));
}

// The bfloat16 bits of p rounded up with probability (the bits below bf16's) / 2^16.
FUSED_ACCUM_FORMULA uint16_t stochastic_bf16(float p, uint32_t key, int64_t index) {
  const uint32_t u = f32_to_bits(p);
  const uint32_t r = mix32(key ^ static_cast<uint32_t>(index)) & 0xFFFFu;
  const uint32_t high = ((u + r) >> 16) & 0xFFFFu;
  return p != p ? uint16_t{0x7FC0} : static_cast<uint16_t>(high);
}

// ---------------------------------------------------------------------------------------------
// Optimizer updates.  Complements such as 1 - beta are taken in double and rounded once, as
// torch does: 1 - 0.999f would carry 0.999f's rounding error (1e-5 relative) into every update.

FUSED_ACCUM_FORMULA float one_minus(double x) { return static_cast<float>(1.0 - x); }

// L2 weight decay, added to the gradient.  (Only where weight_decay != 0: 0 * inf is NaN.)
FUSED_ACCUM_FORMULA float l2_decay(float g, float weight_decay, float p) { return g + weight_decay * p; }

// SGD's momentum buffer, and the direction a step takes with it.
FUSED_ACCUM_FORMULA float sgd_momentum(float buf, float g, float momentum, float one_minus_dampening,
                                       bool first_step) {
  return first_step ? g : momentum * buf + one_minus_dampening * g;
}

FUSED_ACCUM_FORMULA float sgd_direction(float g, float buf, float momentum, bool nesterov) {
  return nesterov ? g + momentum * buf : buf;
}

// torch.lerp(m, g, w) with w = 1 - beta1: m + w * (g - m) for w < 0.5, else g - (g - m) * back,
// back = 1 - w in fp32 (lerp_back).  The CPU makes the form a compile-time choice (a per-element
// select stops its loop vectorizing).
FUSED_ACCUM_FORMULA bool lerp_small_weight(float w) { return w < 0.5f; }
FUSED_ACCUM_FORMULA float lerp_back(float w) { return 1.0f - w; }

FUSED_ACCUM_FORMULA float adam_exp_avg(float m, float g, float w, float back, bool small_weight) {
  return small_weight ? m + w * (g - m) : g - (g - m) * back;
}

FUSED_ACCUM_FORMULA float adam_exp_avg_sq(float v, float g, float beta2, float one_minus_beta2) {
  return beta2 * v + (g * g) * one_minus_beta2;   // the reference's order
}

// torch.maximum: a NaN on either side wins (std::max and fmaxf would drop one).
FUSED_ACCUM_FORMULA float nan_maximum(float v, float vmax) { return (v > vmax || v != v) ? v : vmax; }

FUSED_ACCUM_FORMULA float adam_update(float p, float m, float second, float step_size, float bc2_sqrt,
                                      float eps) {
#ifdef __CUDA_ARCH__
  return p - step_size * m / (sqrtf(second) / bc2_sqrt + eps);
#else
  return p - step_size * m / (std::sqrt(second) / bc2_sqrt + eps);
#endif
}

// Bias corrections, in double from the step count about to be taken (count + 1), rounded once.
FUSED_ACCUM_FORMULA float adam_step_size(double lr, double beta1, double step) {
#ifdef __CUDA_ARCH__
  return static_cast<float>(lr / (1.0 - pow(beta1, step)));
#else
  return static_cast<float>(lr / (1.0 - std::pow(beta1, step)));
#endif
}

FUSED_ACCUM_FORMULA float adam_bc2_sqrt(double beta2, double step) {
#ifdef __CUDA_ARCH__
  return static_cast<float>(sqrt(1.0 - pow(beta2, step)));
#else
  return static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step)));
#endif
}

// AdamW's factor on the parameter: float64 from the fp32 lr and weight decay the reference also
// starts from, rounded once.
FUSED_ACCUM_FORMULA float decoupled_decay(double lr, float weight_decay) {
  return static_cast<float>(1.0 - lr * weight_decay);
}

}  // namespace formulas
}  // namespace fused_accum
