// What the CPU kernels share: element access by dtype (the conversions of formulas.h), bucket
// chunking onto ATen's thread pool, and argument checks.  One call handles every tensor of a
// bucket: the tensors are cut into chunks, the chunks run on ATen's thread pool, and per-chunk
// partial results (sum of squares, non-finite flags) are combined in chunk order, so results do
// not depend on the number of threads.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "fused_accum/formulas.h"

namespace fused_accum {
namespace cpu {

constexpr int64_t kChunk = 1 << 14;  // elements per task: small enough to split 64K tensors across threads

// Element i of an fp32, bfloat16 or float16 array as fp32, and v stored into one.
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const c10::BFloat16* p, int64_t i) {
  return formulas::bf16_to_f32(reinterpret_cast<const uint16_t*>(p)[i]);
}
inline float load(const c10::Half* p, int64_t i) {
  return formulas::f16_to_f32(reinterpret_cast<const uint16_t*>(p)[i]);
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(c10::BFloat16* p, int64_t i, float v) {
  reinterpret_cast<uint16_t*>(p)[i] = formulas::f32_to_bf16(v);
}
inline void store(c10::Half* p, int64_t i, float v) {
  reinterpret_cast<uint16_t*>(p)[i] = formulas::f32_to_f16(v);
}

// A parameter element's bits, and the bits store() writes for fp32 v.
inline uint32_t held_bits(const float* p, int64_t j) { return formulas::f32_to_bits(p[j]); }
inline uint32_t held_bits(const c10::BFloat16* p, int64_t j) {
  return reinterpret_cast<const uint16_t*>(p)[j];
}
inline uint32_t held_bits(const c10::Half* p, int64_t j) {
  return reinterpret_cast<const uint16_t*>(p)[j];
}
inline uint32_t stored_bits(const float*, float v) { return formulas::f32_to_bits(v); }
inline uint32_t stored_bits(const c10::BFloat16*, float v) { return formulas::f32_to_bf16(v); }
inline uint32_t stored_bits(const c10::Half*, float v) { return formulas::f32_to_f16(v); }

struct Task {
  int64_t tensor, begin, end;
};

inline std::vector<Task> make_tasks(at::TensorList tensors) {
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

inline float scalar_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat && t.is_cpu(),
              "fused_accum: ", name, " must be a one-element float32 CPU tensor");
  return *t.data_ptr<float>();
}

inline void check_pairs(const char* op, at::TensorList a, const char* a_name, at::TensorList b,
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

inline void check_fp32(const char* op, at::TensorList list, const char* name) {
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

template <typename F>
void with_flag(bool flag, const F& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

}  // namespace cpu
}  // namespace fused_accum
