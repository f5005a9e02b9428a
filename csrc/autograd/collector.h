// The gradient collector: a C++ hook per parameter that takes the gradient autograd has just
// accumulated (leaving .grad empty) and queues it, so that a gradient runs no Python code of its
// own.  Python is called once per backward pass (at its first gradient: `on_start(task)`, which
// may refuse the pass by raising), whenever the queue of a pass holds `bound` bytes
// (`on_full(task)`: accumulate them now), and, when asked, for every gradient (`on_each(slot)`:
// data parallelism's chunk bookkeeping in a window's last micro-batch).  With the compiled
// backend a pass is planned (below) and the collector adopts and accumulates its gradients
// itself; otherwise what to do with each gradient (adopt it, accumulate it, fold its norm) is
// decided in Python (fused_accum/accumulation/engine.py), which takes a pass's queue with `take(task)`,
// grouped by bucket so that its bookkeeping is a few list operations per bucket.
//
// Two kinds of hook, the same work.  On CPU parameters, a post hook on the parameter's
// AccumulateGrad node (`add`), which the collector keeps alive so that the hook survives: autograd
// calls it without Python at all.  On accelerators, a hook registered with
// `param.register_post_accumulate_grad_hook(collector.hook(...))`, which lives on the tensor and
// holds no node: a kept node keeps the stream that was current when it was made, so a backward
// pass on another stream, CUDA graph capture among them, would make that stream wait on the
// legacy default stream (torch warns "The AccumulateGrad node's stream does not match", and
// capture fails; seen on an H200).  That hook costs a call from autograd through Python's call
// machinery per gradient (about 1 us on a CPU, benchmarks/host_overhead.py; 7% of a window of 400
// small tensors when Python still accumulated each group, which is why CPUs keep the node hook).
//
// The plan.  At the start of a pass Python hands the collector, for each bucket of the compiled
// backend, every hooked slot with its accumulator (a touched slot's, or a flat bucket's slice,
// written with first = 1 when untouched; none for an fp32 first touch, whose gradient the
// collector adopts, or writes into an fp32 accumulator it makes), with the bucket's weight,
// non-finite flag and, in a window's last micro-batch, its sum of squares.  Planned gradients are
// accumulated from here, one `fused_accum::accumulate` call per group of a bucket, without
// Python; `flush(task)` launches what is left and reports the slots first touched, adopted and
// folded, so that Python's window bookkeeping stays the one record.  Buckets of other backends,
// and a bucket whose folded norm an add would invalidate, go through the queue.
//
// Built as its own Python module against the installed torch (full C++ API); without it,
// fused_accum falls back to a Python hook per parameter.
//
// collector.h declares it (the plan's structures, the Collector class and the tensor hook),
// collector.cpp holds the hooks' work as gradients arrive, module.cpp the Python bindings.
#pragma once

#include <torch/extension.h>

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

// Hidden, as pybind11's own namespace: the classes hold py::objects.
namespace fused_accum {
namespace collector __attribute__((visibility("hidden"))) {

namespace py = pybind11;
using torch::autograd::Variable;
using NodePtr = decltype(torch::autograd::impl::grad_accumulator(std::declval<const Variable&>()));

// Calls into Python.  From a node hook, autograd holds no GIL and a Python exception must leave
// as torch's python_error, which the engine hands back to the caller of backward() as the
// original exception; from a tensor hook, Python called us and the exception just propagates.
template <typename... Args>
void call(bool from_python, const py::object& f, Args&&... args) {
  if (from_python) {
    f(std::forward<Args>(args)...);
    return;
  }
  py::gil_scoped_acquire gil;
  try {
    f(std::forward<Args>(args)...);
  } catch (py::error_already_set& e) {
    e.restore();
    throw python_error();
  }
}

// A gradient's bytes: a sparse one (nn.Embedding(sparse=True)) counts its indices and values.
inline int64_t grad_bytes(const at::Tensor& grad) {
  if (grad.layout() == at::kSparse)
    return static_cast<int64_t>(grad._indices().nbytes() + grad._values().nbytes());
  return static_cast<int64_t>(grad.nbytes());
}

struct Entry {
  int64_t task;
  int64_t slot;
  at::Tensor grad;
};

struct Slot {
  int64_t bucket, index;   // where Python keeps the parameter
};

// One bucket's share of a pass's plan, and the planned gradients waiting for its next launch.
struct FastGroup {
  at::Tensor weight, found_inf;
  std::optional<at::Tensor> sumsq;
  std::vector<at::Tensor> grads, accs;
  std::vector<int64_t> first, slots;
  int64_t bytes = 0;
};

struct Planned {
  int64_t group = -1;   // index into the plan's groups; -1: not planned
  at::Tensor acc;       // undefined: a first gradient of an fp32 bucket, whose accumulator is
  bool first = false;   // the gradient itself (adopt) or made here
  bool adopt = false;
};

// The compiled accumulate op, looked up once (its library is loaded before any plan is made).
inline void accumulate_op(const FastGroup& g) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fused_accum::accumulate", "")
                       .typed<void(at::TensorList, at::TensorList, at::IntArrayRef,
                                   const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&)>();
  op.call(g.grads, g.accs, g.first, g.weight, g.found_inf, g.sumsq);
  const c10::Device device = g.accs.front().device();
  if (device.type() != c10::DeviceType::CPU) {
    // The gradients are freed after this launch; a side stream that made them must not reuse
    // their memory before this stream's kernel has read them.
    const c10::Stream stream = c10::impl::VirtualGuardImpl(device.type()).getStream(device);
    for (const auto& grad : g.grads) grad.record_stream(stream);
  }
}

class SlotHook;

class Collector : public std::enable_shared_from_this<Collector> {
 public:
  Collector(py::object on_start, py::object on_full, int64_t bound,
            py::object on_hand_set = py::none())
      : on_start_(std::move(on_start)), on_full_(std::move(on_full)),
        on_hand_set_(std::move(on_hand_set)), bound_(bound) {}

  ~Collector() {
    remove_all();
    py::gil_scoped_acquire gil;   // the callbacks are released here, wherever the last owner was
    on_start_ = py::object();
    on_full_ = py::object();
    on_each_ = py::object();
    on_hand_set_ = py::object();
  }

  // The guard of a tensor hook's parameter (`add` guards its node itself): a tensor pre-hook
  // that, when a gradient arrives while .grad holds one (set by hand since the optimizer took
  // the last), calls `on_hand_set(slot)`, which raises before autograd adds into it.  Only the
  // first parameter of a pass needs it (Python checks the others when the pass starts), but the
  // check is a pointer test.  Returns the position `unguard` takes.
  int64_t guard(const at::Tensor& param, int64_t slot);
  void unguard(const at::Tensor& param, int64_t position);
  void hand_set(int64_t slot) { call(false, on_hand_set_, slot); }

  // The tensor hook of slot `slot`, parameter `index` of bucket `bucket`, for Python to register
  // with register_post_accumulate_grad_hook (whose handle removes it).
  SlotHook hook(int64_t slot, int64_t bucket, int64_t index);
  // Or a post hook on the parameter's AccumulateGrad node, kept alive here; false for a tensor
  // without one (that does not require grad).  `remove(slot)` takes it off.
  bool add(const at::Tensor& param, int64_t slot, int64_t bucket, int64_t index);
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
        bytes_ -= grad_bytes(e.grad);
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
  // Returns whether the planned gradients it launched added into earlier sums (a failed pass
  // that did so cannot be undone exactly).
  bool forget(int64_t task) {
    std::lock_guard<std::mutex> guard(mutex_);
    std::vector<Entry> rest;
    for (auto& e : queue_) {
      if (e.task == task) bytes_ -= grad_bytes(e.grad);
      else rest.push_back(std::move(e));
    }
    queue_ = std::move(rest);
    started_.erase(task);
    if (plan_task_ != task) return false;
    const bool added = plan_added_;
    clear_plan();
    return added;
  }

  // The plan of pass `task`: [(slots, accumulators, first flags, weight, found_inf, sumsq or
  // None, adopt)], one entry per bucket.  An accumulator None is a first touch of an fp32 bucket:
  // with `adopt`, an fp32 contiguous gradient becomes the accumulator without a launch (as
  // Python's path does), else a new fp32 accumulator is written with first = 1; `flush` reports
  // either as (slot, accumulator).  False (and nothing planned) while another pass has a plan.
  bool plan(int64_t task, const py::list& entries) {
    std::lock_guard<std::mutex> guard(mutex_);
    if (plan_task_ != -1 && plan_task_ != task) return false;
    clear_plan();
    plan_task_ = task;
    for (const auto& item : entries) {
      auto entry = item.cast<py::tuple>();
      auto slots = entry[0].cast<std::vector<int64_t>>();
      auto accs = entry[1].cast<std::vector<std::optional<at::Tensor>>>();
      auto first = entry[2].cast<std::vector<bool>>();
      TORCH_CHECK(slots.size() == accs.size() && slots.size() == first.size(),
                  "Collector.plan: slots, accumulators and first flags differ in length");
      FastGroup group;
      group.weight = entry[3].cast<at::Tensor>();
      group.found_inf = entry[4].cast<at::Tensor>();
      if (!entry[5].is_none()) group.sumsq = entry[5].cast<at::Tensor>();
      const bool adopt = entry[6].cast<bool>();
      const int64_t g = static_cast<int64_t>(groups_.size());
      groups_.push_back(std::move(group));
      for (size_t i = 0; i < slots.size(); ++i) {
        TORCH_CHECK(slots[i] >= 0, "Collector.plan: negative slot");
        if (static_cast<size_t>(slots[i]) >= planned_.size()) planned_.resize(slots[i] + 1);
        planned_[slots[i]] = {g, accs[i] ? std::move(*accs[i]) : at::Tensor(), first[i], adopt};
      }
    }
    return true;
  }

  // Launches what pass `task` has planned and not yet launched; with `final`, the plan ends.
  // Returns (added into earlier sums, slots first touched, slots folded into a sum of squares,
  // [(slot, accumulator)] of fp32 first touches) since the last flush.
  py::tuple flush(int64_t task, bool final) {
    std::vector<FastGroup> ready;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (plan_task_ != task) return py::make_tuple(false, py::list(), py::list(), py::list());
      for (auto& g : groups_) {
        if (g.grads.empty()) continue;
        ready.push_back(take_group(g));
      }
    }
    {
      py::gil_scoped_release no_gil;
      for (auto& g : ready) launch(g);
    }
    std::lock_guard<std::mutex> guard(mutex_);
    py::list adopted;
    for (auto& a : adopted_) adopted.append(py::make_tuple(a.first, std::move(a.second)));
    py::tuple out = py::make_tuple(plan_added_, firsts_, folded_, adopted);
    firsts_.clear();
    folded_.clear();
    adopted_.clear();
    if (final && plan_task_ == task) clear_plan();
    return out;
  }

  // Slots whose planned gradients were added into an existing sum since `clear_added()` (a
  // micro-batch's end): zero_grad() may only drop sums that began since then.  Python records
  // the same for the gradients it accumulates itself.
  std::vector<int64_t> added_slots() {
    std::lock_guard<std::mutex> guard(mutex_);
    std::vector<int64_t> out;
    for (size_t s = 0; s < added_.size(); ++s)
      if (added_[s]) out.push_back(static_cast<int64_t>(s));
    return out;
  }
  void clear_added() {
    std::lock_guard<std::mutex> guard(mutex_);
    if (any_added_) std::fill(added_.begin(), added_.end(), 0);
    any_added_ = false;
  }

  void set_bound(int64_t bound) { bound_ = bound; }
  void set_on_each(py::object on_each) {
    std::lock_guard<std::mutex> guard(mutex_);
    on_each_ = std::move(on_each);
    each_ = !on_each_.is_none();
  }
  int64_t queued_bytes() {   // queued for Python and planned, not yet launched
    std::lock_guard<std::mutex> guard(mutex_);
    int64_t planned = 0;
    for (const auto& g : groups_) planned += g.bytes;
    return bytes_ + planned;
  }

  void arrived(const at::Tensor& param, int64_t slot, bool from_python);

 private:
  void clear_plan() {   // holds mutex_
    plan_task_ = -1;
    plan_added_ = false;
    planned_.clear();   // the plan's accumulators are released with it
    groups_.clear();
    firsts_.clear();
    folded_.clear();
    adopted_.clear();
  }

  // Moves a group's waiting gradients out, leaving its plan in place.  Holds mutex_.
  FastGroup take_group(FastGroup& g) {
    FastGroup out;
    out.weight = g.weight;
    out.found_inf = g.found_inf;
    out.sumsq = g.sumsq;
    std::swap(out.grads, g.grads);
    std::swap(out.accs, g.accs);
    std::swap(out.first, g.first);
    std::swap(out.slots, g.slots);
    g.bytes = 0;
    // Counted before the launch: a launch that fails may have written part of it.
    for (size_t i = 0; i < out.slots.size(); ++i) {
      if (out.first[i]) {
        firsts_.push_back(out.slots[i]);
      } else {
        plan_added_ = true;
        mark_added(out.slots[i]);
      }
      if (out.sumsq) folded_.push_back(out.slots[i]);
    }
    return out;
  }

  void mark_added(int64_t slot) {   // holds mutex_
    if (static_cast<size_t>(slot) >= added_.size()) added_.resize(slot + 1, 0);
    added_[slot] = 1;
    any_added_ = true;
  }

  void launch(const FastGroup& g) {
    accumulate_op(g);
    launches_.fetch_add(1, std::memory_order_relaxed);
  }

 public:
  int64_t launches() const { return launches_.load(std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> launches_{0};   // planned groups launched so far (tests, diagnostics)

  py::object on_start_, on_full_, on_each_ = py::none(), on_hand_set_;
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
    std::shared_ptr<std::atomic<bool>> guard;   // the node's pre hook is on while set
  };
  std::vector<std::pair<int64_t, Hooked>> hooked_;
  // The plan of one pass at a time (see the fast path above).
  int64_t plan_task_ = -1;
  bool plan_added_ = false;
  std::vector<Planned> planned_;   // by slot
  std::vector<FastGroup> groups_;
  std::vector<int64_t> firsts_, folded_;
  std::vector<std::pair<int64_t, at::Tensor>> adopted_;
  std::vector<char> added_;   // by slot: see added_slots()
  bool any_added_ = false;
};

// A parameter's post-accumulate-grad hook: autograd calls it, holding the GIL, once .grad holds
// the parameter's whole gradient of the pass.  It holds its collector weakly: the hook of a dead
// optimizer leaves the gradient to plain autograd.
class SlotHook {
 public:
  SlotHook(std::weak_ptr<Collector> owner, int64_t slot) : owner_(std::move(owner)), slot_(slot) {}

  void operator()(const at::Tensor& param) const {
    if (auto owner = owner_.lock()) owner->arrived(param, slot_, /*from_python=*/true);
  }

 private:
  std::weak_ptr<Collector> owner_;
  int64_t slot_;
};

}  // namespace collector
}  // namespace fused_accum
