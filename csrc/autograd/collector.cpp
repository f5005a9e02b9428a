// The gradient collector's hooks (collector.h): a gradient taken from .grad as autograd
// finishes it, queued for Python or accumulated from here as the pass's plan says.
#include "collector.h"

namespace fused_accum {
namespace collector {

SlotHook Collector::hook(int64_t slot, int64_t bucket, int64_t index) {
  std::lock_guard<std::mutex> guard(mutex_);
  slots_[slot] = {bucket, index};
  return SlotHook(weak_from_this(), slot);
}

namespace {

constexpr const char* kCompiledAutogradRefused =
    "fused_accum: compiled autograd cannot trace the hooks that take each gradient as it "
    "arrives (accumulation_steps > 1, data parallelism, or windows a framework drives). Turn "
    "compiled autograd off (torch._dynamo.config.compiled_autograd = False), or use "
    "accumulation_steps=1 in one process, where gradients stay in .grad and compiled autograd "
    "works";

// Compiled autograd asks each node hook to describe itself; the collector's run C++ of their
// own, which cannot be traced: say what to do instead of "compiled_args nyi".
template <typename Hook>
struct RefusesCompiledAutograd : Hook {
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& /*args*/) const override {
    TORCH_CHECK(false, kCompiledAutogradRefused);
  }
};

// The node hook: runs after AccumulateGrad has updated .grad (Node post hooks run after its
// tensor hooks).
class TakeGrad : public RefusesCompiledAutograd<torch::autograd::FunctionPostHook> {
 public:
  TakeGrad(std::weak_ptr<Collector> owner, Variable param, int64_t slot)
      : owner_(std::move(owner)), param_(std::move(param)), slot_(slot) {}

  torch::autograd::variable_list operator()(
      const torch::autograd::variable_list& outputs,
      const torch::autograd::variable_list& /*inputs*/) override {
    if (auto owner = owner_.lock()) owner->arrived(param_, slot_, /*from_python=*/false);
    return outputs;
  }

 private:
  std::weak_ptr<Collector> owner_;
  Variable param_;
  int64_t slot_;
};

using WeakParam = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

// What both guards do (Collector::guard): a gradient of `param` arrives while .grad holds one.
void refuse_hand_set(const WeakParam& param, const std::weak_ptr<Collector>& owner, int64_t slot) {
  if (auto impl = param.lock()) {
    const at::Tensor p(std::move(impl));
    if (p.grad().defined()) {
      if (auto collector = owner.lock()) collector->hand_set(slot);
    }
  }
}

// The node hook's guard: a pre hook on the AccumulateGrad node the collector keeps, which
// autograd offers no way to remove: `remove(slot)` switches it off.  Weak both ways (the node
// holds it, and holds the parameter).
class GuardGrad : public RefusesCompiledAutograd<torch::autograd::FunctionPreHook> {
 public:
  GuardGrad(std::weak_ptr<Collector> owner, WeakParam param, int64_t slot,
            std::shared_ptr<std::atomic<bool>> on)
      : owner_(std::move(owner)), param_(std::move(param)), slot_(slot), on_(std::move(on)) {}

  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grads) override {
    if (on_->load(std::memory_order_relaxed)) refuse_hand_set(param_, owner_, slot_);
    return grads;   // unchanged
  }

 private:
  std::weak_ptr<Collector> owner_;
  WeakParam param_;
  int64_t slot_;
  std::shared_ptr<std::atomic<bool>> on_;
};

}  // namespace

bool Collector::add(const at::Tensor& param, int64_t slot, int64_t bucket, int64_t index) {
  if (!param.requires_grad()) return false;
  {
    std::lock_guard<std::mutex> guard(mutex_);
    slots_[slot] = {bucket, index};
  }
  NodePtr node = torch::autograd::impl::grad_accumulator(param);
  if (!node) return false;
  auto on = std::make_shared<std::atomic<bool>>(true);
  node->add_pre_hook(std::make_unique<GuardGrad>(weak_from_this(),
                                                 WeakParam(param.getIntrusivePtr()), slot, on));
  const uintptr_t key =
      node->add_post_hook(std::make_unique<TakeGrad>(weak_from_this(), param, slot));
  hooked_.push_back({slot, {std::move(node), key, std::move(on)}});   // keeps the node alive
  return true;
}

int64_t Collector::guard(const at::Tensor& param, int64_t slot) {
  WeakParam weak_param(param.getIntrusivePtr());
  std::weak_ptr<Collector> owner = weak_from_this();
  return static_cast<int64_t>(param.register_hook([weak_param, owner, slot](const at::Tensor&) {
    refuse_hand_set(weak_param, owner, slot);
  }));
}

void Collector::unguard(const at::Tensor& param, int64_t position) {
  param.remove_hook(static_cast<unsigned>(position));
}

void Collector::remove(int64_t slot) {
  for (auto it = hooked_.begin(); it != hooked_.end();) {
    if (it->first == slot) {
      it->second.node->del_post_hook(it->second.key);
      it->second.guard->store(false);
      it = hooked_.erase(it);
    } else {
      ++it;
    }
  }
}

void Collector::remove_all() {
  for (auto& h : hooked_) {
    h.second.node->del_post_hook(h.second.key);
    h.second.guard->store(false);
  }
  hooked_.clear();
}

void Collector::arrived(const at::Tensor& param, int64_t slot, bool from_python) {
  at::Tensor& grad = param.mutable_grad();
  if (!grad.defined()) return;
  at::Tensor taken = std::move(grad);
  grad.reset();   // .grad = None: the gradient lives in the queue until it is accumulated
  const int64_t task = torch::autograd::get_current_graph_task_id();
  bool start = false;
  {
    std::lock_guard<std::mutex> guard(mutex_);
    start = started_.insert(task).second;
  }
  if (start) {
    try {
      call(from_python, on_start_, task);   // may refuse the pass: then nothing of it is taken
    } catch (...) {
      std::lock_guard<std::mutex> guard(mutex_);
      started_.erase(task);
      throw;
    }
  }
  bool full = false, each = false;
  std::optional<FastGroup> ready;
  {
    std::lock_guard<std::mutex> guard(mutex_);
    const int64_t nbytes = grad_bytes(taken);
    // A sparse gradient (nn.Embedding(sparse=True)) goes to Python, which sums it sparse.
    const bool planned = plan_task_ == task && slot < static_cast<int64_t>(planned_.size()) &&
                         planned_[slot].group >= 0 && taken.layout() == at::kStrided;
    if (planned) {
      const Planned& p = planned_[slot];
      at::Tensor acc = p.acc;
      if (!acc.defined() && p.adopt && taken.scalar_type() == at::kFloat && taken.is_contiguous()) {
        adopted_.emplace_back(slot, std::move(taken));   // no copy, as autograd's own .grad
      } else {
        if (!acc.defined()) {
          acc = at::empty(taken.sizes(), taken.options().dtype(at::kFloat));
          adopted_.emplace_back(slot, acc);
        }
        FastGroup& g = groups_[p.group];
        g.grads.push_back(taken.is_contiguous() ? std::move(taken) : taken.contiguous());
        g.accs.push_back(std::move(acc));
        g.first.push_back(p.first);
        g.slots.push_back(slot);
        g.bytes += nbytes;
        if (g.bytes >= bound_) ready = take_group(g);
      }
    } else {
      bytes_ += nbytes;
      queue_.push_back({task, slot, std::move(taken)});
      full = bytes_ >= bound_;
    }
    each = each_;
  }
  if (ready) {
    // A tensor hook holds the GIL.  On the CPU the op computes the group before it returns, so
    // other threads get the GIL meanwhile; on a GPU it only queues a kernel, shorter than
    // handing the GIL over and taking it back.
    if (from_python && !ready->weight.is_cuda()) {
      py::gil_scoped_release no_gil;
      launch(*ready);
    } else {
      launch(*ready);
    }
  }
  if (full) call(from_python, on_full_, task);
  if (each) call(from_python, on_each_, slot, task);
}


}  // namespace collector
}  // namespace fused_accum
