// CUDA kernels of accumulate and norm (formulas: fused_accum/kernels/reference.py), launched by
// multi-tensor apply (multi_tensor_apply.cuh).  Reductions (sum of squares, non-finite flags) go
// through one partial per chunk and a single-block finishing kernel that adds them in chunk order,
// so the results are deterministic; an accumulate without a sum of squares needs no partials, and
// each block raises the 0/1 non-finite flag itself (one launch).  Every value that may change
// between calls (the weight, flags) is read on the device: no host synchronisation.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "kernel_utils.cuh"
#include "multi_tensor_apply.cuh"
#include "ops.cuh"

namespace fused_accum {
namespace cuda {
namespace {

// kNorm: each block leaves its sum of squares and non-finite flag in `partial` for finish_kernel
// (a second launch, and the partials, are what a folded norm costs).  Without it, one launch: a
// block that saw a non-finite value raises found_inf itself.
template <typename G, bool kNorm>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(Meta<2> meta, const float* weight,
                                                             float* partial, int32_t chunk_base,
                                                             float* found_inf) {
  __shared__ float shared[kThreads / 32];
  const Chunk c = locate(meta, blockIdx.x);
  const G* g = slice<const G>(meta, 0, c);
  float* acc = slice<float>(meta, 1, c);
  const bool first = meta.flags[c.t] & kFirst;
  const float w = *weight;
  float sq = 0.0f, bad = 0.0f;
  for_chunk(c, meta.flags[c.t] & kAligned, [&](int64_t i, int count) {
    if (count == kVec) {
      const Vec<G> gv = load_vec(g + i);
      Vec<float> av;
      if (!first) av = load_vec(acc + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float x = w * to_f(gv.v[k]);
        const float a = first ? x : av.v[k] + x;
        av.v[k] = a;
        if constexpr (kNorm) sq += a * a;
        bad += formulas::non_finite_probe(a);
      }
      store_vec(acc + i, av);
    } else {
      const float x = w * to_f(g[i]);
      const float a = first ? x : acc[i] + x;
      acc[i] = a;
      if constexpr (kNorm) sq += a * a;
      bad += formulas::non_finite_probe(a);
    }
  });
  if constexpr (kNorm) {
    sq = block_sum(sq, shared);
    bad = block_sum(bad, shared);
    if (threadIdx.x == 0) {
      partial[2 * (chunk_base + blockIdx.x)] = sq;
      partial[2 * (chunk_base + blockIdx.x) + 1] = bad;
    }
  } else {
    bad = block_sum(bad, shared);
    if (threadIdx.x == 0 && !(bad == 0.0f)) atomicExch(found_inf, 1.0f);
  }
}

__global__ void __launch_bounds__(kThreads) norm_kernel(Meta<1> meta, float* partial, int32_t chunk_base) {
  __shared__ float shared[kThreads / 32];
  const Chunk c = locate(meta, blockIdx.x);
  const float* a = slice<const float>(meta, 0, c);
  float sq = 0.0f;
  for_chunk(c, meta.flags[c.t] & kAligned, [&](int64_t i, int count) {
    if (count == kVec) {
      const Vec<float> av = load_vec(a + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) sq += av.v[k] * av.v[k];
    } else {
      sq += a[i] * a[i];
    }
  });
  sq = block_sum(sq, shared);
  if (threadIdx.x == 0) {
    partial[2 * (chunk_base + blockIdx.x)] = sq;
    partial[2 * (chunk_base + blockIdx.x) + 1] = 0.0f;
  }
}

// Adds the per-chunk partials in chunk order: sumsq += sum of squares; found_inf = 1 if any
// partial flag is not zero.
__global__ void __launch_bounds__(kThreads) finish_kernel(const float* partial, int32_t chunks,
                                                          float* sumsq, float* found_inf) {
  __shared__ double shared_sq[kThreads];
  __shared__ float shared_bad[kThreads];
  double sq = 0.0;
  float bad = 0.0f;
  const int32_t per_thread = (chunks + kThreads - 1) / kThreads;
  const int32_t begin = threadIdx.x * per_thread, end = min(chunks, begin + per_thread);
  for (int32_t i = begin; i < end; ++i) {
    sq += partial[2 * i];
    bad += partial[2 * i + 1];
  }
  shared_sq[threadIdx.x] = sq;
  shared_bad[threadIdx.x] = bad;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    float any_bad = 0.0f;
    for (int i = 0; i < kThreads; ++i) {
      total += shared_sq[i];
      any_bad += shared_bad[i];
    }
    if (sumsq != nullptr) *sumsq += static_cast<float>(total);
    if (found_inf != nullptr && !(any_bad == 0.0f)) *found_inf = 1.0f;
  }
}

Tensor partial_buffer(const Tensor& like, int64_t chunks) {
  return torch::stable::new_empty(like, {2 * std::max<int64_t>(chunks, 1)}, ScalarType::Float);
}

}  // namespace

void accumulate(std::vector<Tensor> grads, std::vector<Tensor> accs, std::vector<int64_t> first,
                Tensor weight, Tensor found_inf, std::optional<Tensor> sumsq) {
  if (accs.empty()) return;
  check_list(grads, accs, "accumulate", "grads", false);
  check_list(accs, accs, "accumulate", "accs", true);
  STD_TORCH_CHECK(first.size() == accs.size(), "fused_accum.accumulate: one first flag per tensor");
  check_scalar(weight, "accumulate", "weight");
  check_scalar(found_inf, "accumulate", "found_inf");
  if (sumsq.has_value()) check_scalar(*sumsq, "accumulate", "sumsq");
  const int32_t device = accs[0].get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  const bool fold = sumsq.has_value();
  float* found_ptr = static_cast<float*>(found_inf.data_ptr());
  Tensor partial;
  float* partial_ptr = nullptr;
  if (fold) {
    partial = partial_buffer(accs[0], total_chunks(accs));
    partial_ptr = static_cast<float*>(partial.data_ptr());
  }
  int32_t chunk_base = 0;
  for (const auto& group : by_dtype(grads)) {
    const std::vector<int64_t>& index = group.second;
    dispatch_float_types(group.first, "accumulate", "grads", [&](auto* tag) {
      using G = std::remove_pointer_t<decltype(tag)>;
      multi_tensor_apply<2>({&grads, &accs}, index, 2, [&](Meta<2>& meta, int32_t blocks, size_t b) {
        for (int t = 0; t < meta.count; ++t)
          if (first[index[b + t]]) meta.flags[t] |= kFirst;
        if (blocks == 0) return;
        const float* w = static_cast<const float*>(weight.data_ptr());
        if (fold) {
          accumulate_kernel<G, true><<<blocks, kThreads, 0, stream>>>(meta, w, partial_ptr,
                                                                      chunk_base, found_ptr);
        } else {
          accumulate_kernel<G, false><<<blocks, kThreads, 0, stream>>>(meta, w, nullptr, 0,
                                                                       found_ptr);
        }
        check_launch("accumulate");
        chunk_base += blocks;
      });
    });
  }
  if (fold) {
    finish_kernel<<<1, kThreads, 0, stream>>>(partial_ptr, chunk_base,
                                              static_cast<float*>(sumsq->data_ptr()), found_ptr);
    check_launch("accumulate");
  }
}

void norm(std::vector<Tensor> accs, Tensor sumsq) {
  if (accs.empty()) return;
  check_list(accs, accs, "norm", "accs", true);
  check_scalar(sumsq, "norm", "sumsq");
  const int32_t device = accs[0].get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  Tensor partial = partial_buffer(accs[0], total_chunks(accs));
  float* partial_ptr = static_cast<float*>(partial.data_ptr());
  int32_t chunk_base = 0;
  multi_tensor_apply<1>({&accs}, iota(accs.size()), 1, [&](Meta<1>& meta, int32_t blocks, size_t) {
    if (blocks == 0) return;
    norm_kernel<<<blocks, kThreads, 0, stream>>>(meta, partial_ptr, chunk_base);
    check_launch("norm");
    chunk_base += blocks;
  });
  finish_kernel<<<1, kThreads, 0, stream>>>(partial_ptr, chunk_base,
                                            static_cast<float*>(sumsq.data_ptr()), nullptr);
  check_launch("norm");
}

}  // namespace cuda
}  // namespace fused_accum
