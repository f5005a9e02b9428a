// CUDA kernels of the fused_accum op set (schemas: fused_accum/kernels/schemas.py; formulas:
// fused_accum/kernels/reference.py).
//
// Written against the LibTorch stable ABI alone (no ATen/c10 CUDA headers), so that the file
// compiles against a CPU build of torch, as CI does, and the binary runs on torch 2.11 and later.
//
// Multi-tensor apply: one launch covers up to kMaxTensors tensors of a bucket.  The tensors are
// cut into chunks of kChunk elements, one block per chunk; a block finds its tensor by binary
// search over the per-tensor chunk offsets, all of which travel in the kernel's parameters
// (CUDA 12.1+ allows 32 KB of them on sm_70 and newer).  Each thread moves kVec elements per
// iteration with aligned vector loads and stores (16 or 32 bytes) where the tensor's pointers
// allow it, else element by element.  Reductions (sum of squares, non-finite flags) go through
// one partial per chunk and a single-block finishing kernel that adds them in chunk order, so the
// results are deterministic; an accumulate without a sum of squares needs no partials, and each
// block raises the 0/1 non-finite flag itself (one launch).  Every value that may change between calls (weights, lr, scales,
// flags, step counts) is read on the device: no host synchronisation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace fused_accum {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int kMaxTensors = 256;
constexpr int kThreads = 512;
constexpr int kVec = 8;
// Elements per block: two vector steps of the block.  At 64K (16 steps) a 64 MB fp32 gradient
// made 256 blocks, under half of what an H100 runs at once (132 SMs x 4 blocks), and each
// resident block walked its own 256 KB region (ncu, 256 MB on an H200: 68% of DRAM bandwidth,
// add_ 89%).  At 8K a large tensor gets several blocks per SM, and the blocks resident at once
// sweep memory close together.
constexpr int64_t kChunk = 8 * 1024;
static_assert(kChunk % (kThreads * kVec) == 0,
              "a chunk is whole vector steps of a block, so every chunk starts vector-aligned");
constexpr uint8_t kFirst = 1, kAligned = 2;

// ---------------------------------------------------------------------------------------------
// Host helpers

cudaStream_t current_stream(int32_t device) {
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

void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  STD_TORCH_CHECK(err == cudaSuccess, "fused_accum.", op, ": CUDA launch failed: ",
                  cudaGetErrorString(err));
}

void check_scalar(const Tensor& t, const char* op, const char* name) {
  STD_TORCH_CHECK(t.is_cuda() && t.numel() == 1 && t.scalar_type() == ScalarType::Float,
                  "fused_accum.", op, ": ", name, " must be a one-element float32 CUDA tensor");
}

void check_list(const std::vector<Tensor>& list, const std::vector<Tensor>& like, const char* op,
                const char* name, bool fp32) {
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

bool aligned(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 32 == 0; }

template <int N>
struct Meta {
  void* ptr[N][kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t chunk_start[kMaxTensors + 1];
  int32_t id[kMaxTensors];   // position of the tensor in the op's lists
  uint8_t flags[kMaxTensors];
  int32_t count;
};

// Fills ``meta`` with tensors [begin, end) of ``lists`` (empty lists give null pointers) and
// returns the number of chunks, i.e. of blocks to launch.  The first ``element_lists`` lists hold
// arrays of numel elements and decide whether vector access is possible; the rest hold one
// scalar per tensor (step counts).
template <int N>
int32_t fill_meta(Meta<N>& meta, const std::vector<const std::vector<Tensor>*>& lists,
                  const std::vector<int64_t>& index, size_t begin, size_t end,
                  int element_lists = N) {
  meta.count = static_cast<int32_t>(end - begin);
  meta.chunk_start[0] = 0;
  for (size_t k = begin; k < end; ++k) {
    const int t = static_cast<int>(k - begin);
    const int64_t i = index[k];
    bool all_aligned = true;
    for (int l = 0; l < N; ++l) {
      const auto* list = lists[l];
      void* p = (list == nullptr || list->empty()) ? nullptr : (*list)[i].data_ptr();
      meta.ptr[l][t] = p;
      if (l < element_lists) all_aligned = all_aligned && aligned(p);
    }
    meta.numel[t] = (*lists[0])[i].numel();
    meta.id[t] = static_cast<int32_t>(i);
    meta.flags[t] = all_aligned ? kAligned : 0;
    const int64_t chunks = (meta.numel[t] + kChunk - 1) / kChunk;
    meta.chunk_start[t + 1] = meta.chunk_start[t] + static_cast<int32_t>(chunks);
  }
  return meta.chunk_start[meta.count];
}

std::vector<int64_t> iota(size_t n) {
  std::vector<int64_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<int64_t>(i);
  return v;
}

// Indices of ``tensors`` grouped by dtype: one launch family per dtype.
std::vector<std::pair<ScalarType, std::vector<int64_t>>> by_dtype(const std::vector<Tensor>& tensors) {
  std::vector<std::pair<ScalarType, std::vector<int64_t>>> groups;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const ScalarType type = tensors[i].scalar_type();
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == type; });
    if (it == groups.end()) groups.push_back({type, {static_cast<int64_t>(i)}});
    else it->second.push_back(static_cast<int64_t>(i));
  }
  return groups;
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

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

template <typename T>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* p) { return *reinterpret_cast<const Vec<T>*>(p); }
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T>& v) { *reinterpret_cast<Vec<T>*>(p) = v; }

// The tensor and element range of this block's chunk.
struct Chunk {
  int t;
  int64_t begin, n;
};

template <int N>
__device__ __forceinline__ Chunk locate(const Meta<N>& meta, int32_t chunk) {
  int lo = 0, hi = meta.count - 1;
  while (lo < hi) {  // last t with chunk_start[t] <= chunk
    const int mid = (lo + hi + 1) / 2;
    if (meta.chunk_start[mid] <= chunk) lo = mid;
    else hi = mid - 1;
  }
  const int64_t begin = static_cast<int64_t>(chunk - meta.chunk_start[lo]) * kChunk;
  return {lo, begin, min(kChunk, meta.numel[lo] - begin)};
}

// This block's part of list ``list`` (null where the list is absent).
template <typename T, int N>
__device__ __forceinline__ T* slice(const Meta<N>& meta, int list, const Chunk& c) {
  T* p = static_cast<T*>(meta.ptr[list][c.t]);
  return p ? p + c.begin : nullptr;
}

// Runs body(i, count) over this block's chunk: count == kVec for aligned vector steps, 1 for the
// rest.  body must handle both.
template <typename Body>
__device__ __forceinline__ void for_chunk(const Chunk& c, bool vectorized, const Body& body) {
  int64_t done = 0;
  if (vectorized) {
    const int64_t full = c.n / kVec * kVec;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < full; i += blockDim.x * kVec) body(i, kVec);
    done = full;
  }
  for (int64_t i = done + threadIdx.x; i < c.n; i += blockDim.x) body(i, 1);
}

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

// ---------------------------------------------------------------------------------------------
// accumulate and norm

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
        bad += a * 0.0f;  // NaN exactly when a is inf or NaN
      }
      store_vec(acc + i, av);
    } else {
      const float x = w * to_f(g[i]);
      const float a = first ? x : acc[i] + x;
      acc[i] = a;
      if constexpr (kNorm) sq += a * a;
      bad += a * 0.0f;
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

int64_t total_chunks(const std::vector<Tensor>& tensors) {
  int64_t chunks = 0;
  for (const auto& t : tensors) chunks += (t.numel() + kChunk - 1) / kChunk;
  return chunks;
}

void accumulate_cuda(std::vector<Tensor> grads, std::vector<Tensor> accs, std::vector<int64_t> first,
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
      for (size_t b = 0; b < index.size(); b += kMaxTensors) {
        const size_t e = std::min(index.size(), b + kMaxTensors);
        Meta<2> meta;
        const int32_t blocks = fill_meta(meta, {&grads, &accs}, index, b, e);
        for (size_t k = b; k < e; ++k)
          if (first[index[k]]) meta.flags[k - b] |= kFirst;
        if (blocks == 0) continue;
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
      }
    });
  }
  if (fold) {
    finish_kernel<<<1, kThreads, 0, stream>>>(partial_ptr, chunk_base,
                                              static_cast<float*>(sumsq->data_ptr()), found_ptr);
    check_launch("accumulate");
  }
}

void norm_cuda(std::vector<Tensor> accs, Tensor sumsq) {
  if (accs.empty()) return;
  check_list(accs, accs, "norm", "accs", true);
  check_scalar(sumsq, "norm", "sumsq");
  const int32_t device = accs[0].get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  Tensor partial = partial_buffer(accs[0], total_chunks(accs));
  float* partial_ptr = static_cast<float*>(partial.data_ptr());
  const std::vector<int64_t> index = iota(accs.size());
  int32_t chunk_base = 0;
  for (size_t b = 0; b < index.size(); b += kMaxTensors) {
    Meta<1> meta;
    const int32_t blocks = fill_meta(meta, {&accs}, index, b, std::min(index.size(), b + kMaxTensors));
    if (blocks == 0) continue;
    norm_kernel<<<blocks, kThreads, 0, stream>>>(meta, partial_ptr, chunk_base);
    check_launch("norm");
    chunk_base += blocks;
  }
  finish_kernel<<<1, kThreads, 0, stream>>>(partial_ptr, chunk_base,
                                            static_cast<float*>(sumsq.data_ptr()), nullptr);
  check_launch("norm");
}

// The fp32 working value of a parameter's elements and its write-back: the parameter itself, its
// fp32 master (while the parameter holds its rounding), or its compact master (bfloat16
// parameter + int16 remainder, u = (p << 16) + r as bits, p rounded to nearest with ties away
// from zero, a NaN held as (0x7FC0, 0); see reference.py).  A pair whose u does not round back to
// p was written since the last step (+-0 over a negative remainder, +-inf over a positive one:
// NaN bit patterns; NaN parameters): its master is p, the remainder dropped.
constexpr uint32_t kCanonicalNan = 0x7FC00000u;
__device__ __forceinline__ uint32_t canonical_nan(uint32_t u) {
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? kCanonicalNan : u;
}
__device__ __forceinline__ uint32_t compact_high(uint32_t u) {
  return ((canonical_nan(u) + 0x8000u) >> 16) & 0xFFFFu;
}

__device__ __forceinline__ float combine(uint16_t high, int16_t rem) {
  const uint32_t h = high;
  const uint32_t u = (h << 16) + static_cast<uint32_t>(static_cast<int32_t>(rem));
  return __uint_as_float(compact_high(u) == h ? u : h << 16);
}

__device__ __forceinline__ void split(float p, uint16_t& high, int16_t& rem) {
  const uint32_t u = canonical_nan(__float_as_uint(p));
  const uint32_t h = compact_high(u);
  high = static_cast<uint16_t>(h);
  rem = static_cast<int16_t>(static_cast<uint16_t>(u - (h << 16)));
}

// Stochastic rounding of bf16 parameters without masters (see reference.py): 16 random bits from
// a counter-based hash of a per-tensor key (seed, step, position) and the element index.
__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

__device__ __forceinline__ uint32_t rounding_key(int64_t seed, float step, int32_t id) {
  const uint64_t s = static_cast<uint64_t>(seed) + 0x9E3779B9ull * static_cast<uint64_t>(step + 1.0f) +
                     0x85EBCA6Bull * static_cast<uint64_t>(id);
  return mix32(static_cast<uint32_t>(s));
}

// A parameter element's bits.
__device__ __forceinline__ uint32_t bits_of(float x) { return __float_as_uint(x); }
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ uint32_t bits_of(__half x) { return __half_as_ushort(x); }

// The fp32 master, unless the parameter no longer holds the master's rounding as the step
// writes it: then it was written since the last step (load_state_dict, an initialiser, clamp_)
// and its value is updated.
template <typename P>
__device__ __forceinline__ float master_unless_written(P held, float master) {
  return bits_of(held) == bits_of(from_f<P>(master)) ? master : to_f(held);
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
      if (stochastic) {
        const uint32_t u = __float_as_uint(p);
        const uint32_t r = mix32(key ^ static_cast<uint32_t>(base + i)) & 0xFFFFu;
        const uint16_t high = p != p ? uint16_t{0x7FC0} : static_cast<uint16_t>(((u + r) >> 16) & 0xFFFFu);
        return __ushort_as_bfloat16(high);
      }
    }
    return from_f<P>(p);
  }

  __device__ __forceinline__ Vec<float> load(int64_t i) const {
    Vec<float> out;
    if constexpr (kCompact) {
      const Vec<uint16_t> hv = load_vec(reinterpret_cast<const uint16_t*>(param) + i);
      const Vec<int16_t> rv = load_vec(rem + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) out.v[k] = combine(hv.v[k], rv.v[k]);
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
      for (int k = 0; k < kVec; ++k) split(p.v[k], hv.v[k], rv.v[k]);
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
    if constexpr (kCompact) return combine(reinterpret_cast<const uint16_t*>(param)[i], rem[i]);
    return master ? master_unless_written(param[i], master[i]) : to_f(param[i]);
  }

  __device__ __forceinline__ void store1(int64_t i, float p) const {
    if constexpr (kCompact) {
      uint16_t h;
      split(p, h, rem[i]);
      reinterpret_cast<uint16_t*>(param)[i] = h;
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
          rounding_key(rounding_seed, step, meta.id[c.t]), c.begin};
}

// ---------------------------------------------------------------------------------------------
// Optimizer steps.  Lists in Meta: SGD {params, accs, momentum_buffers, masters, steps}; Adam
// {params, accs, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps}.  Step counts are
// incremented by a separate kernel afterwards, so that every block of a tensor reads the same one.

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
    if (h.weight_decay != 0.0f) g += h.weight_decay * p;
    if (buf) {
      b_out = first_step ? g : h.momentum * b + h.one_minus_dampening * g;
      g = h.nesterov ? g + h.momentum * b_out : b_out;
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
  const float step_size = static_cast<float>(lr / (1.0 - pow(h.beta1_d, step)));
  const float bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(h.beta2_d, step)));
  // float64 from the fp32 lr and weight decay the reference also starts from, rounded once
  const float decay = static_cast<float>(1.0 - static_cast<double>(lr) * h.weight_decay);
  auto update = [&](float a, float p, float& mk, float& vk, float& vmaxk) {
    float g = a * scale;
    if (h.maximize) g = -g;
    if (h.weight_decay != 0.0f) {
      if (h.decoupled) p *= decay;
      else g += h.weight_decay * p;
    }
    // torch.lerp(m, g, w): m + w * (g - m) for w < 0.5, g - (g - m) * (1 - w) otherwise
    mk = h.one_minus_beta1 < 0.5f ? mk + h.one_minus_beta1 * (g - mk) : g - (g - mk) * h.lerp_back;
    vk = h.beta2 * vk + (g * g) * h.one_minus_beta2;   // the reference's order
    float second = vk;
    if (vmax) {   // torch.maximum: a NaN on either side wins (fmaxf would drop one)
      second = (vk > vmaxk || vk != vk) ? vk : vmaxk;
      vmaxk = second;
    }
    return p - step_size * mk / (sqrtf(second) / bc2_sqrt + h.eps);
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
    const std::vector<int64_t>& index = group.second;
    dispatch_float_types(group.first, op, "params", [&](auto* tag) {
      for (size_t b = 0; b < index.size(); b += kMaxTensors) {
        Meta<N> meta;
        const int32_t blocks = fill_meta(meta, lists, index, b, std::min(index.size(), b + kMaxTensors),
                                         N - 1);
        if (blocks > 0) {
          launch(tag, meta, blocks, stream);
          check_launch(op);
        }
        increment_steps_kernel<N><<<(meta.count + 255) / 256, 256, 0, stream>>>(
            meta, N - 1, static_cast<const float*>(found_inf.data_ptr()));
        check_launch(op);
      }
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

void sgd_step_cuda(std::vector<Tensor> params, std::vector<Tensor> accs,
                   std::vector<Tensor> momentum_buffers, std::vector<Tensor> steps,
                   std::vector<Tensor> masters, Tensor lr, double momentum, double dampening,
                   double weight_decay, bool nesterov, bool maximize, Tensor grad_scale,
                   Tensor found_inf, int64_t rounding_seed) {
  if (params.empty()) return;
  const bool compact = check_step_args("sgd_step", params, accs, masters, steps, lr, grad_scale, found_inf);
  STD_TORCH_CHECK(momentum == 0 || !momentum_buffers.empty(),
                  "fused_accum.sgd_step: momentum != 0 needs momentum_buffers");
  if (momentum != 0) check_list(momentum_buffers, params, "sgd_step", "momentum_buffers", true);
  const SgdHyper h{static_cast<float>(momentum), static_cast<float>(1.0 - dampening),
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

void adam_step_cuda(std::vector<Tensor> params, std::vector<Tensor> accs, std::vector<Tensor> exp_avgs,
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
  const AdamHyper h{static_cast<float>(beta2), static_cast<float>(1.0 - beta1),
                    static_cast<float>(1.0 - beta2), static_cast<float>(eps),
                    static_cast<float>(weight_decay), beta1, beta2,
                    1.0f - static_cast<float>(1.0 - beta1), amsgrad, maximize,
                    decoupled_weight_decay};
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

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fused_accum, CUDA, m) {
  m.impl("accumulate", TORCH_BOX(&accumulate_cuda));
  m.impl("norm", TORCH_BOX(&norm_cuda));
  m.impl("sgd_step", TORCH_BOX(&sgd_step_cuda));
  m.impl("adam_step", TORCH_BOX(&adam_step_cuda));
}

}  // namespace fused_accum
