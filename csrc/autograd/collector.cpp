// The gradient collector: a C++ hook per parameter that takes the gradient autograd has just
// accumulated (leaving .grad empty) and queues it, so that a gradient runs no Python code of its
// own.  Python is called once per backward pass (at its first gradient: `on_start(task)`, which
// may refuse the pass by raising), whenever the queue of a pass holds `bound` bytes
// (`on_full(task)`: accumulate them now), and, when asked, for every gradient (`on_each(slot)`:
// data parallelism's chunk bookkeeping in a window's last micro-batch).  What to do with each
// gradient (adopt it, accumulate it, fold its norm) stays in Python (fused_accum/gradients.py),
// which takes a pass's queue with `take(task)`, grouped by bucket so that its bookkeeping is a
// few list operations per bucket, not a call per gradient.
//
// The hooks are registered with `param.register_post_accumulate_grad_hook(collector.hook(...))`:
// they live on the tensor, like any user's hook, and hold no AccumulateGrad node.  A node kept
// alive (as a post hook on it would need) keeps the CUDA stream that was current when it was
// made, so a backward pass on another stream, a CUDA graph capture among them, would make that
// stream wait on the legacy default stream (torch warns "The AccumulateGrad node's stream does
// not match", and capture fails).  The price is one C call from autograd per gradient, with no
// Python code behind it.
//
// Built as its own Python module against the installed torch (full C++ API); without it,
// fused_accum falls back to a Python hook per parameter.
#include <torch/extension.h>

#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>

#include <memory>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace fused_accum {
namespace {

namespace py = pybind11;

struct Entry {
  int64_t task;
  int64_t slot;
  at::Tensor grad;
};

struct Slot {
  int64_t bucket, index;   // where Python keeps the parameter
};

class SlotHook;

class Collector : public std::enable_shared_from_this<Collector> {
 public:
  Collector(py::object on_start, py::object on_full, int64_t bound)
      : on_start_(std::move(on_start)), on_full_(std::move(on_full)), bound_(bound) {}

  ~Collector() {
    py::gil_scoped_acquire gil;   // the callbacks are released here, wherever the last owner was
    on_start_ = py::object();
    on_full_ = py::object();
    on_each_ = py::object();
  }

  // The hook of slot `slot`, parameter `index` of bucket `bucket`, for Python to register with
  // register_post_accumulate_grad_hook (whose handle removes it).
  SlotHook hook(int64_t slot, int64_t bucket, int64_t index);

  // What backward pass `task` queued, as [(bucket, [index], [gradient])], buckets in order of
  // first arrival and each bucket's gradients in arrival order; empties its queue.
  py::list take(int64_t task) {
    std::vector<int64_t> order;
    std::vector<std::pair<std::vector<int64_t>, std::vector<at::Tensor>>> groups;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      std::vector<Entry> rest;
      for (auto& e : queue_) {
        if (e.task != task) {
          rest.push_back(std::move(e));
          continue;
        }
        const Slot& where = slots_.at(e.slot);
        size_t g = 0;
        while (g < order.size() && order[g] != where.bucket) ++g;
        if (g == order.size()) {
          order.push_back(where.bucket);
          groups.emplace_back();
        }
        bytes_ -= static_cast<int64_t>(e.grad.nbytes());
        groups[g].first.push_back(where.index);
        groups[g].second.push_back(std::move(e.grad));
      }
      queue_ = std::move(rest);
    }
    py::list out;
    for (size_t g = 0; g < order.size(); ++g)
      out.append(py::make_tuple(order[g], groups[g].first, groups[g].second));
    return out;
  }

  // Forgets pass `task`: its queued gradients are dropped, and a later gradient of that task
  // (a failed pass's other threads) starts it again.
  void forget(int64_t task) {
    std::lock_guard<std::mutex> guard(mutex_);
    std::vector<Entry> rest;
    for (auto& e : queue_) {
      if (e.task == task) bytes_ -= static_cast<int64_t>(e.grad.nbytes());
      else rest.push_back(std::move(e));
    }
    queue_ = std::move(rest);
    started_.erase(task);
  }

  void set_bound(int64_t bound) { bound_ = bound; }
  void set_on_each(py::object on_each) {
    std::lock_guard<std::mutex> guard(mutex_);
    on_each_ = std::move(on_each);
    each_ = !on_each_.is_none();
  }
  int64_t queued_bytes() {
    std::lock_guard<std::mutex> guard(mutex_);
    return bytes_;
  }

  void arrived(const at::Tensor& param, int64_t slot);

 private:
  py::object on_start_, on_full_, on_each_ = py::none();
  bool each_ = false;
  int64_t bound_;
  std::mutex mutex_;
  std::vector<Entry> queue_;
  int64_t bytes_ = 0;
  std::unordered_set<int64_t> started_;
  std::unordered_map<int64_t, Slot> slots_;
};

// A parameter's post-accumulate-grad hook: autograd calls it, holding the GIL, once .grad holds
// the parameter's whole gradient of the pass.  It holds its collector weakly: the hook of a dead
// optimizer leaves the gradient to plain autograd.
class SlotHook {
 public:
  SlotHook(std::weak_ptr<Collector> owner, int64_t slot) : owner_(std::move(owner)), slot_(slot) {}

  void operator()(const at::Tensor& param) const {
    if (auto owner = owner_.lock()) owner->arrived(param, slot_);
  }

 private:
  std::weak_ptr<Collector> owner_;
  int64_t slot_;
};

SlotHook Collector::hook(int64_t slot, int64_t bucket, int64_t index) {
  std::lock_guard<std::mutex> guard(mutex_);
  slots_[slot] = {bucket, index};
  return SlotHook(weak_from_this(), slot);
}

void Collector::arrived(const at::Tensor& param, int64_t slot) {
  at::Tensor& grad = param.mutable_grad();
  if (!grad.defined()) return;
  at::Tensor taken = std::move(grad);
  grad.reset();   // .grad = None: the gradient lives in the queue until it is accumulated
  if (taken.layout() != at::kStrided) taken = taken.to_dense();   // nn.Embedding(sparse=True)
  const int64_t task = torch::autograd::get_current_graph_task_id();
  bool start = false;
  {
    std::lock_guard<std::mutex> guard(mutex_);
    start = started_.insert(task).second;
  }
  if (start) {
    try {
      on_start_(task);   // may refuse the pass: then nothing of it is taken
    } catch (...) {
      std::lock_guard<std::mutex> guard(mutex_);
      started_.erase(task);
      throw;
    }
  }
  bool full = false, each = false;
  {
    std::lock_guard<std::mutex> guard(mutex_);
    bytes_ += static_cast<int64_t>(taken.nbytes());
    queue_.push_back({task, slot, std::move(taken)});
    full = bytes_ >= bound_;
    each = each_;
  }
  // A Python exception leaves as py::error_already_set, which pybind11 hands back to autograd as
  // the original exception.
  if (full) on_full_(task);
  if (each) on_each_(slot, task);
}

}  // namespace
}  // namespace fused_accum

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using fused_accum::Collector;
  using fused_accum::SlotHook;
  m.doc() = "fused_accum's gradient collector: C++ post-accumulate-grad hooks that queue gradients";
  py::class_<SlotHook>(m, "SlotHook")
      .def("__call__", [](const SlotHook& hook, const at::Tensor& param) { hook(param); },
           py::arg("param"));
  py::class_<Collector, std::shared_ptr<Collector>>(m, "Collector")
      .def(py::init<py::object, py::object, int64_t>(), py::arg("on_start"), py::arg("on_full"),
           py::arg("bound"))
      .def("hook", &Collector::hook, py::arg("slot"), py::arg("bucket"), py::arg("index"))
      .def("take", &Collector::take, py::arg("task"))
      .def("forget", &Collector::forget, py::arg("task"))
      .def("set_bound", &Collector::set_bound, py::arg("bound"))
      .def("set_on_each", &Collector::set_on_each, py::arg("on_each"))
      .def("queued_bytes", &Collector::queued_bytes);
}
