// What the CUDA kernels share besides multi-tensor apply: the current stream, argument checks,
// dtype dispatch, element conversions (formulas.h) and a block reduction.  The LibTorch stable
// ABI alone (no ATen/c10 CUDA headers), so that the sources compile against a CPU build of torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <vector>

#include "fused_accum/formulas.h"

namespace fused_accum {
namespace cuda {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// ---------------------------------------------------------------------------------------------
// Host helpers

inline cudaStream_t current_stream(int32_t device) {
// torch < 2.13 headers do not define TORCH_VERSION_2_13_0 (an undefined macro reads as 0 here).
#if defined(TORCH_VERSION_2_13_0) && TORCH_FEATURE_VERSION >= TORCH_VERSION_2_13_0
  return static_cast<cudaStream_t>(
      torch::stable::accelerator::getCurrentStream(device).nativeHandle());
#else
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(device, &stream) == AOTI_TORCH_SUCCESS,
                  "fused_accum: could not get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
#endif
}

inline void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  STD_TORCH_CHECK(err == cudaSuccess, "fused_accum.", op, ": CUDA launch failed: ",
                  cudaGetErrorString(err));
}

inline void check_scalar(const Tensor& t, const char* op, const char* name) {
  STD_TORCH_CHECK(t.is_cuda() && t.numel() == 1 && t.scalar_type() == ScalarType::Float,
                  "fused_accum.", op, ": ", name, " must be a one-element float32 CUDA tensor");
}

inline void check_list(const std::vector<Tensor>& list, const std::vector<Tensor>& like,
                       const char* op, const char* name, bool fp32) {
  STD_TORCH_CHECK(list.size() == like.size(), "fused_accum.", op, ": ", list.size(), " ", name,
                  " for ", like.size(), " tensors");
  for (size_t i = 0; i < list.size(); ++i) {
    STD_TORCH_CHECK(list[i].is_cuda() && list[i].is_contiguous(), "fused_accum.", op, ": ",
                    name, "[", i, "] must be a contiguous CUDA tensor");
    STD_TORCH_CHECK(list[i].numel() == like[i].numel(), "fused_accum.", op, ": ", name, "[", i,
                    "] has ", list[i].numel(), " elements, expected ", like[i].numel());
    STD_TORCH_CHECK(list[i].get_device_index() == like[0].get_device_index(), "fused_accum.", op,
                    ": all tensors must be on one device");
    STD_TORCH_CHECK(!fp32 || list[i].scalar_type() == ScalarType::Float, "fused_accum.", op,
                    ": ", name, "[", i, "] must be float32");
  }
}

template <typename F>
void dispatch_float_types(ScalarType type, const char* op, const char* what, const F& f) {
  switch (type) {
    case ScalarType::Float: f(static_cast<float*>(nullptr)); break;
    case ScalarType::BFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    case ScalarType::Half: f(static_cast<__half*>(nullptr)); break;
    default: STD_TORCH_CHECK(false, "fused_accum.", op, ": ", what, " must be float32, bfloat16 or float16");
  }
}

// ---------------------------------------------------------------------------------------------
// Device helpers

// An element as fp32, fp32 as an element, and an element's bits (formulas.h's conversions).
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return formulas::bf16_to_f32(__bfloat16_as_ushort(x)); }
__device__ __forceinline__ float to_f(__half x) { return formulas::f16_to_f32(__half_as_ushort(x)); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __ushort_as_bfloat16(formulas::f32_to_bf16(x));
}
template <> __device__ __forceinline__ __half from_f<__half>(float x) {
  return __ushort_as_half(formulas::f32_to_f16(x));
}

__device__ __forceinline__ uint32_t bits_of(float x) { return formulas::f32_to_bits(x); }
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ uint32_t bits_of(__half x) { return __half_as_ushort(x); }

// The sum of v over the block, valid in thread 0; shared holds a float per warp.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : 0.0f;
  if (warp == 0)
    for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();
  return v;  // valid in thread 0
}

}  // namespace cuda
}  // namespace fused_accum
