// Registers the CUDA kernels (ops.cuh) for the schemas of fused_accum/kernels/schemas.py, on the
// LibTorch stable ABI: the library runs on torch 2.11 and later.
#include <torch/csrc/stable/library.h>

#include "ops.cuh"

namespace fused_accum {

STABLE_TORCH_LIBRARY_IMPL(fused_accum, CUDA, m) {
  m.impl("accumulate", TORCH_BOX(&cuda::accumulate));
  m.impl("norm", TORCH_BOX(&cuda::norm));
  m.impl("sgd_step", TORCH_BOX(&cuda::sgd_step));
  m.impl("adam_step", TORCH_BOX(&cuda::adam_step));
}

}  // namespace fused_accum
