// CPU kernels of accumulate and norm (formulas: fused_accum/kernels/reference.py).  Inner loops
// are `omp simd` loops (built with -fopenmp): the reductions in them may be reordered, which is
// what lets them vectorize without -ffast-math (that would break the non-finite checks and
// torch's rounding).
#include <optional>
#include <type_traits>
#include <vector>

#include "kernel_utils.h"
#include "ops.h"

namespace fused_accum {
namespace cpu {
namespace {

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
    nf += formulas::non_finite_probe(a);
  }
  sq_out = sq;
  bad_out = !(nf == 0.0f);
}

}  // namespace

void accumulate(at::TensorList grads, at::TensorList accs, at::IntArrayRef first,
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

void norm(at::TensorList accs, const at::Tensor& sumsq) {
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

}  // namespace cpu
}  // namespace fused_accum
