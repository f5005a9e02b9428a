// Multi-tensor apply (apex's shape): one launch covers up to kMaxTensors tensors of a bucket.
// The tensors are cut into chunks of kChunk elements, one block per chunk; a block finds its
// tensor by binary search over the per-tensor chunk offsets, all of which travel in the kernel's
// parameters (the Meta struct; CUDA 12.1+ allows 32 KB of them on sm_70 and newer).  Each thread
// moves kVec elements per iteration with aligned vector loads and stores (16 or 32 bytes) where
// the tensor's pointers allow it, else element by element.
#pragma once

#include <cuda_runtime.h>

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace fused_accum {
namespace cuda {

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
// Host side: the launch argument and its filling

// N lists of up to kMaxTensors tensors (list l, tensor t: ptr[l][t]) and their chunking.
template <int N>
struct Meta {
  void* ptr[N][kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t chunk_start[kMaxTensors + 1];
  int32_t id[kMaxTensors];   // position of the tensor in the op's lists
  uint8_t flags[kMaxTensors];
  int32_t count;
};

inline bool aligned(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 32 == 0; }

// Fills ``meta`` with tensors [begin, end) of ``lists`` (empty lists give null pointers) and
// returns the number of chunks, i.e. of blocks to launch.  The first ``element_lists`` lists hold
// arrays of numel elements and decide whether vector access is possible; the rest hold one
// scalar per tensor (step counts).
template <int N>
int32_t fill_meta(Meta<N>& meta, const std::vector<const std::vector<torch::stable::Tensor>*>& lists,
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

// Calls launch(meta, blocks, begin) for the tensors ``index`` of ``lists``, kMaxTensors at a
// time (blocks may be 0: all of them empty); meta's flags may be amended before the launch.
template <int N, typename Launch>
void multi_tensor_apply(const std::vector<const std::vector<torch::stable::Tensor>*>& lists,
                        const std::vector<int64_t>& index, int element_lists, const Launch& launch) {
  for (size_t b = 0; b < index.size(); b += kMaxTensors) {
    Meta<N> meta;
    const int32_t blocks = fill_meta(meta, lists, index, b, std::min(index.size(), b + kMaxTensors),
                                     element_lists);
    launch(meta, blocks, b);
  }
}

inline std::vector<int64_t> iota(size_t n) {
  std::vector<int64_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<int64_t>(i);
  return v;
}

// Indices of ``tensors`` grouped by dtype: one launch family per dtype.
inline std::vector<std::pair<torch::headeronly::ScalarType, std::vector<int64_t>>> by_dtype(
    const std::vector<torch::stable::Tensor>& tensors) {
  std::vector<std::pair<torch::headeronly::ScalarType, std::vector<int64_t>>> groups;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const torch::headeronly::ScalarType type = tensors[i].scalar_type();
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == type; });
    if (it == groups.end()) groups.push_back({type, {static_cast<int64_t>(i)}});
    else it->second.push_back(static_cast<int64_t>(i));
  }
  return groups;
}

inline int64_t total_chunks(const std::vector<torch::stable::Tensor>& tensors) {
  int64_t chunks = 0;
  for (const auto& t : tensors) chunks += (t.numel() + kChunk - 1) / kChunk;
  return chunks;
}

// ---------------------------------------------------------------------------------------------
// Device side: a block's chunk, and vector access to it

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

}  // namespace cuda
}  // namespace fused_accum
