// The gradient collector: a C++ post hook on every parameter's AccumulateGrad node that takes the
// gradient autograd has just accumulated (leaving .grad empty) and queues it, so that a gradient
// costs no Python call of its own.  Python is called once per backward pass (at its first
// gradient: `on_start(task)`, which may refuse the pass by raising), whenever the queue of a pass
// holds `bound` bytes (`on_full(task)`: accumulate them now), and, when asked, for every gradient
// (`on_each(slot)`: data parallelism's chunk bookkeeping in a window's last micro-batch).  What to
// do with each gradient (adopt it, accumulate it, fold its norm) stays in Python
// (fused_accum/gradients.py), which takes a pass's queue with `take(task)`, grouped by bucket so
// that its bookkeeping is a few list operations per bucket, not a call per gradient.
//
// Built as its own Python module against the installed torch (full C++ API); without it,
// fused_accum falls back to a Python hook per parameter.
#include <torch/extension.h>

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
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
using torch::autograd::Variable;
using NodePtr = decltype(torch::autograd::impl::grad_accumulator(std::declval<const Variable&>()));

// Calls into Python from an autograd thread; a Python exception leaves as torch's python_error,
// which the engine hands back to the caller of backward() as the original exception.
template <typename... Args>
void call(const py::object& f, Args&&... args) {
  py::gil_scoped_acquire gil;
  try {
    f(std::forward<Args>(args)...);
  } catch (py::error_already_set& e) {
    e.restore();
    throw python_error();
  }
}

struct Entry {
  int64_t task;
  int64_t slot;
  at::Tensor grad;
};

struct Slot {
  int64_t bucket, index;   // where Python keeps the parameter
};

class Collector : public std::enable_shared_from_this<Collector> {
 public:
  Collector(py::object on_start, py::object on_full, int64_t bound)
      : on_start_(std::move(on_start)), on_full_(std::move(on_full)), bound_(bound) {}

  ~Collector() {
    remove_all();
    py::gil_scoped_acquire gil;   // the callbacks are released here, wherever the last owner was
    on_start_ = py::object();
    on_full_ = py::object();
    on_each_ = py::object();
  }

  // Hooks parameter `param` as slot `slot`, parameter `index` of bucket `bucket`.  Returns false
  // for a tensor without a gradient accumulator (one that does not require grad).
  bool add(const at::Tensor& param, int64_t slot, int64_t bucket, int64_t index);
  // Stops taking slot's gradients (a newer optimizer took the parameter over).
  void remove(int64_t slot);
  void remove_all();

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

  void arrived(const Variable& param, int64_t slot);

 private:
  py::object on_start_, on_full_, on_each_ = py::none();
  bool each_ = false;
  int64_t bound_;
  std::mutex mutex_;
  std::vector<Entry> queue_;
  int64_t bytes_ = 0;
  std::unordered_set<int64_t> started_;
  std::unordered_map<int64_t, Slot> slots_;
  struct Hooked {
    NodePtr node;
    uintptr_t key;
  };
  std::vector<std::pair<int64_t, Hooked>> hooked_;
};

// Runs after AccumulateGrad has updated .grad (Node post hooks run after its tensor hooks).
class TakeGrad : public torch::autograd::FunctionPostHook {
 public:
  TakeGrad(std::weak_ptr<Collector> owner, Variable param, int64_t slot)
      : owner_(std::move(owner)), param_(std::move(param)), slot_(slot) {}

  torch::autograd::variable_list operator()(
      const torch::autograd::variable_list& outputs,
      const torch::autograd::variable_list& /*inputs*/) override {
    if (auto owner = owner_.lock()) owner->arrived(param_, slot_);
    return outputs;
  }

 private:
  std::weak_ptr<Collector> owner_;
  Variable param_;
  int64_t slot_;
};

bool Collector::add(const at::Tensor& param, int64_t slot, int64_t bucket, int64_t index) {
  if (!param.requires_grad()) return false;
  {
    std::lock_guard<std::mutex> guard(mutex_);
    slots_[slot] = {bucket, index};
  }
  NodePtr node = torch::autograd::impl::grad_accumulator(param);
  if (!node) return false;
  const uintptr_t key =
      node->add_post_hook(std::make_unique<TakeGrad>(weak_from_this(), param, slot));
  hooked_.push_back({slot, {std::move(node), key}});   // keeps the accumulator (and hook) alive
  return true;
}

void Collector::remove(int64_t slot) {
  for (auto it = hooked_.begin(); it != hooked_.end();) {
    if (it->first == slot) {
      it->second.node->del_post_hook(it->second.key);
      it = hooked_.erase(it);
    } else {
      ++it;
    }
  }
}

void Collector::remove_all() {
  for (auto& h : hooked_) h.second.node->del_post_hook(h.second.key);
  hooked_.clear();
}

void Collector::arrived(const Variable& param, int64_t slot) {
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
      call(on_start_, task);   // may refuse the pass: then nothing of it is taken
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
  if (full) call(on_full_, task);
  if (each) call(on_each_, slot, task);
}

}  // namespace
}  // namespace fused_accum

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using fused_accum::Collector;
  m.doc() = "fused_accum's gradient collector: C++ post hooks on AccumulateGrad nodes";
  py::class_<Collector, std::shared_ptr<Collector>>(m, "Collector")
      .def(py::init<py::object, py::object, int64_t>(), py::arg("on_start"), py::arg("on_full"),
           py::arg("bound"))
      .def("add", &Collector::add, py::arg("param"), py::arg("slot"), py::arg("bucket"),
           py::arg("index"))
      .def("remove", &Collector::remove, py::arg("slot"))
      .def("remove_all", &Collector::remove_all)
      .def("take", &Collector::take, py::arg("task"))
      .def("forget", &Collector::forget, py::arg("task"))
      .def("set_bound", &Collector::set_bound, py::arg("bound"))
      .def("set_on_each", &Collector::set_on_each, py::arg("on_each"))
      .def("queued_bytes", &Collector::queued_bytes);
}
