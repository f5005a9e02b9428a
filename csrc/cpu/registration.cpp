// Registers the CPU kernels (ops.h) for the schemas of fused_accum/kernels/schemas.py.
#include <torch/library.h>

#include "ops.h"

namespace fused_accum {

TORCH_LIBRARY_IMPL(fused_accum, CPU, m) {
  m.impl("accumulate", &cpu::accumulate);
  m.impl("norm", &cpu::norm);
  m.impl("sgd_step", &cpu::sgd_step);
  m.impl("adam_step", &cpu::adam_step);
}

}  // namespace fused_accum
