"""AccumulatingOptimizer: accumulation windows over the buffers, shared by every algorithm.

A subclass supplies an :class:`Algorithm`: which flat state buffers a group needs, and the
functional update of one bucket.  Everything else is written once: micro-batches and windows
here, ``opt.backward`` in :mod:`.micro_batches`, the window's end (weight, norm, clipping, update)
in :mod:`.window_end`, param groups in :mod:`.param_groups`, over the window record and the
gradient engine of :mod:`fused_accum.accumulation` and a reducer of :mod:`fused_accum.distributed`;
where the state lives is :mod:`.state`, state dicts :mod:`.checkpoint`.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import guards, kernels, linear as fused_linear, scaling
from .._warnings import warn
from ..eager import eager
from ..accumulation import GradBuffers, Window
from ..accumulation.buckets import Bucket
from ..accumulation.sparse import DeferredNorm
from ..distributed import LocalReducer, data_parallel, make_reducer
from .checkpoint import WindowStateDict, index_params
from .micro_batches import MicroBatches
from .param_groups import ParamGroups
from .window_end import WindowEnd
from .state import BucketState
from .step_hooks import hooked_step
from .nonfinite import SkipMonitor
from ._args import check_accumulation_steps, check_hyper_types, check_max_grad_norm

# grad_scale: what acc is multiplied by to give the gradient of the window (clip / W); a float
# or a 0-d fp32 tensor on the bucket's device.  found_inf: 0-d fp32 flag on that device.
UpdateFn = Callable[[Bucket, list[int], dict[str, Any], "float | Tensor", Tensor], None]


class Algorithm(NamedTuple):
    state_names: Callable[[dict[str, Any]], list[str]]   # flat fp32 state a group needs
    update: UpdateFn
    # What a saved parameter's state may hold besides "step" and masters, and what it must hold
    # once stepped (where torch's own step would fail without it); None: not checked.
    known_state: tuple[str, ...] | None = None
    required_state: Callable[[dict[str, Any]], list[str]] = lambda group: []
    # The update of one parameter from its sum of sparse gradients (SparseSum), or None: refused.
    sparse_update: Callable[..., None] | None = None


class AccumulatingOptimizer(ParamGroups, MicroBatches, WindowEnd, BucketState, WindowStateDict,
                            Optimizer):
    """Base of SGD, Adam, AdamW and FusedAccumulator.

    ``step()`` ends a micro-batch; every ``accumulation_steps``-th call applies the update of the
    window with grad = acc / W (W: micro-batches, or items with ``backward(num_items=)``),
    clipped to ``max_grad_norm`` when given.

    Arguments every fused_accum optimizer takes besides its torch namesake's:

    - ``accumulation_steps``: micro-batches per window (>= 1).
    - ``max_grad_norm``: clip the window's mean gradient to this global norm (None: no clipping).
    - ``master_weights``: fp32 master copies for bf16/fp16 parameters (True, the default);
      "compact" keeps a bf16 parameter's master as the parameter plus an int16 remainder (2 bytes
      instead of 4, the same fp32 value bit for bit; fp16 parameters get full masters); False
      updates low-precision parameters directly from fp32 maths.  A parameter written between
      steps (``load_state_dict``, ``reset_parameters()``, ``p.data.clamp_()``) is trained on from
      its written value: an element that no longer holds its master's rounding replaces it.  A
      compact master keeps its remainder under a written value (less than half an ulp of it, so
      it still rounds to it) unless the two would not make a master a step writes (a zero over a
      negative remainder, an infinity over a positive one): then it is the written value.
    - ``loss_scale``: "auto" (dynamic when any parameter is fp16, else none), "dynamic", a
      :class:`fused_accum.DynamicLossScale` (GradScaler's knobs), a number (static), or None.
      Loss scaling applies to losses passed to ``opt.backward(loss)``.
    - ``nonfinite``: a window with a non-finite gradient is always skipped (parameters, state and
      step counts untouched); "skip" (default) counts it in ``skipped_steps`` and warns once,
      "raise" raises at the step naming the parameters (reads the flag on the host).  With dynamic
      loss scaling, skipped windows are overflows: they back the scale off, silently.
    - ``stochastic_rounding``: with ``master_weights=False``, round each bf16 parameter's fp32
      update stochastically (unbiased: the expected parameter is the fp32 value), so updates
      smaller than half a bf16 ulp are not lost.  The random bits come from a seed drawn from
      torch's generator at construction, the step count and the element's position: no host
      synchronisation, reproducible under ``torch.manual_seed``.
    - ``process_group``: the ranks each window is averaged over, with one reduction per window
      (see :mod:`fused_accum.distributed.all_reduce`): "auto" (the default group when
      torch.distributed runs more than one rank, else none), True (the default group), a
      process group, or None (each rank alone).  A DistributedDataParallel wrapper around the
      model is switched off and its group used (see :mod:`fused_accum.distributed.data_parallel`).
    - ``shard_state``: with a process group, each rank keeps 1/d of the fp32 optimizer state
      (masters, moments), the window is reduce-scattered and the updated parameters all-gathered
      (see :mod:`fused_accum.distributed.sharded`); without one there is nothing to shard.
    - ``backend``: "auto", or a name from ``python -m fused_accum info``.
    - ``params`` may be the model itself (``fused_accum.AdamW(model, ...)``): its parameters, and
      its ``nn.Linear`` layers fused (:meth:`fuse_linear`) unless ``fuse_linear=False``.
    """

    algorithm: Algorithm
    # torch.amp.GradScaler.step then hands step() its scale and non-finite flag (grad_scale,
    # found_inf attributes), as it does for torch's fused AdamW: with gradients in .grad they are
    # applied; while gradients are taken as they arrive, step() names the remedy instead.
    _step_supports_amp_scaling = True
    _fused_accum_optimizer = True   # fused_accum.holders: not a torch optimizer beside us

    def __init__(self, params: Any, defaults: dict[str, Any], *, accumulation_steps: int = 1,
                 max_grad_norm: float | None = None, master_weights: bool | str = True,
                 loss_scale: Any = "auto", nonfinite: str = "skip", stochastic_rounding: bool = False,
                 process_group: Any = "auto", shard_state: bool = False,
                 backend: str = "auto", fuse_linear: bool = True) -> None:
        model = params if isinstance(params, torch.nn.Module) else None
        if model is not None:
            params = model.parameters()
        self._accumulation_steps = check_accumulation_steps(accumulation_steps)
        self._driven = False   # final_micro_batch was set: windows are driven from outside
        if not isinstance(stochastic_rounding, bool):
            raise TypeError(f"stochastic_rounding must be True or False, got {stochastic_rounding!r}")
        if stochastic_rounding and master_weights is not False:
            raise ValueError("stochastic_rounding=True rounds bf16 parameters updated without a "
                             "master: pass master_weights=False with it")
        self.stochastic_rounding = stochastic_rounding
        # Drawn from torch's generator, so torch.manual_seed makes runs repeatable.
        self._rounding_seed = int(torch.randint(0, 2**31, ())) if stochastic_rounding else -1
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        if master_weights not in (True, False, "compact"):
            raise TypeError(f"master_weights must be True, False or 'compact', got {master_weights!r}")
        self.master_weights = master_weights
        self.backend = kernels.validate_name(backend)
        group = data_parallel.resolve(process_group)
        if not isinstance(shard_state, bool):
            raise TypeError(f"shard_state must be True or False, got {shard_state!r}")
        self._sharding = shard_state and group is not None
        # One process until the parameters are known (a DDP wrapper may name the group)
        self._reducer: LocalReducer = LocalReducer()
        self._window = Window()   # the window in progress: every part below is handed it
        # Data parallelism reduces flat accumulators; alone, fp32 buckets adopt their gradients.
        self._buffers = GradBuffers(self.backend, self._window, self._on_backward_start,
                                    flat_fp32=group is not None)
        self._final_hint: Any = None                 # see final_micro_batch
        self._grad_norm: Tensor | DeferredNorm | None = None
        self._window_lrs: list | None = None   # the lrs when the window's first micro-batch ended
        self.stepped = False
        super().__init__(params, defaults)
        main = self._buffers.buckets[0].device if self._buffers.buckets else torch.device("cpu")
        self._window.add_device(main)
        self._buffers.on_zero_grad = weakref.WeakMethod(self._discard)
        self._buffers.on_grad_scaler = weakref.WeakMethod(self._refuse_grad_scaler)
        self._scaler = scaling.resolve(loss_scale, index_params(self.param_groups), main)
        self._skipped = torch.zeros((), device=main)   # windows skipped for non-finite gradients
        # grad_norm's value, updated in place at every window's end: see live_grad_norm()
        self._live_norm = torch.zeros((), device=main)
        self._live_norm_wanted = False
        self._skip_monitor = SkipMonitor(main)
        self._warned = set()
        owners = data_parallel.ddp_owners(index_params(self.param_groups))
        if owners and isinstance(process_group, str):   # "auto"
            group = owners[0].process_group   # reduce over the ranks DDP was given
        self._reducer = make_reducer(group, self._sharding)
        data_parallel.take_over(owners, self._reducer, index_params(self.param_groups))
        # A DDP wrapper made after the optimizer (accelerate, transformers) is found at step 1.
        self._ddp_unchecked = data_parallel.world_size() > 1 and not owners
        if self._reducer.distributed:   # collectives every rank makes, and the state re-made
            # a sharded rank reduce-scatters where the others all-reduce: their collectives pair
            self._reducer.check_same({"shard_state": float(self._sharding)}, main,
                                     "Every rank must build its optimizer with the same shard_state")
            self._reducer.broadcast_parameters(index_params(self.param_groups))
            if self._rounding_seed >= 0:   # the same random bits on every rank
                self._rounding_seed = self._reducer.broadcast_seed(self._rounding_seed, main)
            self._reducer.attach(self._buffers)   # sharding lays the buckets out here
            for bucket in self._buffers.buckets:   # masters were taken before the broadcast
                self._init_bucket_state(bucket, self.param_groups[bucket.group_index])
        # Last: until here a failed construction has changed nothing outside this object.
        self._buffers.attach(self._collects())
        self._arm()
        if model is not None and fuse_linear:
            self.fuse_linear(model)

    # -- where gradients go --------------------------------------------------------------------

    def _collects(self) -> bool:
        """Whether gradients are taken as they arrive (into fp32 sums, ``.grad`` left empty):
        with ``accumulation_steps > 1``, under data parallelism, and when windows are driven
        from outside.  Otherwise (``accumulation_steps=1`` in one process) they stay in ``.grad``
        until step(), exactly as torch.optim leaves them, and step() reads them there."""
        return self._accumulation_steps > 1 or self._driven or self._reducer.distributed

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per window; may be changed between windows."""
        return self._accumulation_steps

    @accumulation_steps.setter
    def accumulation_steps(self, value: int) -> None:
        value = check_accumulation_steps(value)
        if self._window.micro or self._window.arrived or self._buffers.passes:
            raise RuntimeError(
                f"accumulation_steps: cannot change from {self._accumulation_steps} to {value} "
                f"with a window in progress ({self._window.micro} micro-batches ended, gradients "
                "arrived since); change it right after the step() that ends a window")
        self._accumulation_steps = value
        self._buffers.set_collecting(self._collects())
        self._arm()

    def _check_holding(self) -> None:
        """Refuse to step an optimizer whose parameters a later fused optimizer took."""
        if self._buffers.lost:
            lost = self._buffers.lost
            raise RuntimeError(
                f"fused_accum: {len(lost)} parameters of this optimizer "
                f"({', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''}) were taken by a "
                "fused_accum optimizer built over them later, and this one would step without "
                "their gradients. Two fused optimizers can share a parameter only while both "
                "leave gradients in .grad (accumulation_steps=1, one process). Build one optimizer "
                "with a param group per setting, or delete this one (del opt) once replaced")
        if not self._buffers.attached:
            raise RuntimeError("fused_accum: remove_hooks() was called on this optimizer: it no "
                               "longer holds its parameters; build a new one to train again")

    # -- micro-batches -----------------------------------------------------------------------

    def _on_backward_start(self, kind: str, through_optimizer: bool) -> None:
        if self._final_hint is None and guards.accelerate_accumulating():
            raise RuntimeError(
                "fused_accum: accelerate is forming accumulation windows around this optimizer "
                "(Accelerator(gradient_accumulation_steps=...) and accumulate(), or "
                "TrainingArguments.gradient_accumulation_steps), which it was not told about: "
                f"with accumulation_steps={self.accumulation_steps} every window would be "
                "counted twice or clipped by code that sees no gradients. Use "
                "fused_accum.integrations.accelerate.follow(accelerator, optimizer), or "
                "fused_accum.integrations.transformers.FusedAccumTrainer in place of Trainer "
                "(the backward pass was refused; the window's accumulated gradients are intact)")
        self._window.begin_pass(kind)
        if callable(self._final_hint):
            self._arm()   # ask whether this pass ends the window
        if not through_optimizer and self._scaler is not None:
            self._warn_once("unscaled", "fused_accum: loss scaling is on (fp16 parameters, or "
                            "loss_scale=...), but this backward pass did not go through "
                            "opt.backward(loss), so its loss was not scaled and small fp16 "
                            "gradients may underflow; call opt.backward(loss)")

    def _refuse_grad_scaler(self) -> None:
        for name in ("found_inf", "grad_scale"):
            self.__dict__.pop(name, None)
        self._buffers.placeholders.clear(False)
        self._buffers.settle_unfinished()
        self._reset_window()
        raise RuntimeError(
            "fused_accum: torch.amp.GradScaler cannot drive a fused_accum optimizer: it unscales "
            "and checks .grad, which fused_accum empties as gradients arrive. Use the "
            "optimizer's own loss scaling: loss_scale='dynamic' (GradScaler's rule; the default "
            "for fp16 parameters), opt.backward(loss) instead of scaler.scale(loss).backward(), "
            "and opt.step() instead of scaler.step(opt) and scaler.update(). The window in "
            "progress, which held gradients of GradScaler's scaled loss, was discarded")

    def _check_wrappers(self) -> None:
        if self._ddp_unchecked:
            self._ddp_unchecked = False
            params = index_params(self.param_groups)
            data_parallel.take_over(data_parallel.ddp_owners(params), self._reducer, params)

    @hooked_step
    @eager   # torch.compile(opt.step) runs it eagerly: its counts are Python's
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """End one micro-batch; the ``accumulation_steps``-th call updates the parameters."""
        if "found_inf" in self.__dict__ and self._buffers.collecting:   # torch.amp.GradScaler
            self._refuse_grad_scaler()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_holding()
        self._check_wrappers()
        if not self._buffers.collecting:
            try:
                self._step_from_grads()
            except (TypeError, ValueError):   # a hyper-parameter edited into a wrong type?
                self._check_hyper_types()     # then say which (checked only on failure)
                raise
            return loss
        # Also settles the backward passes still open (only ones that raised are left here).
        self._buffers.check_grads()
        if self._window.micro + 1 >= self.accumulation_steps:
            self._buffers.check_foreign_hooks()
            self._check_hyper_types()
        self._end_micro_batch()
        self._check_schedule()
        self.stepped = False
        try:
            if self._window.micro >= self.accumulation_steps:
                self._end_window()
        finally:   # also after a raise (nonfinite="raise"): the next micro-batch starts a window
            self._arm()
        return loss

    def _check_hyper_types(self) -> None:
        for g, group in enumerate(self.param_groups):
            check_hyper_types(group, self.defaults, f"param_groups[{g}]")

    def _step_from_grads(self) -> None:
        """step() with gradients in ``.grad`` (``accumulation_steps=1``, one process): what
        torch.optim's step does, through the fused kernels.  torch.amp.GradScaler's scale and
        non-finite flag, when it hands them over, are applied as torch's fused AdamW applies
        them; so is this optimizer's own loss scale, when ``opt.backward`` applied it."""
        amp_scale, amp_found = self.__dict__.get("grad_scale"), self.__dict__.get("found_inf")
        inverse = None
        if amp_scale is not None:
            inverse = amp_scale.to(torch.float32).reciprocal()
        elif self._window.grads_scaled:
            inverse = self._scaler.inverse(self._scaler.scale.device)
        weights = None if inverse is None else {d: inverse.to(d) for d in self._window.found_inf}
        self.stepped = False
        try:
            if self._buffers.take_grads(weights):
                if amp_found is not None:
                    for flag in self._window.found_inf.values():
                        flag.copy_(torch.maximum(flag, amp_found.to(flag.device, torch.float32)))
                self._window.micro = 1
                self._end_window()
        finally:
            self._reset_window()
            self._window.grads_scaled = False

    @property
    def final_micro_batch(self) -> bool | Callable[[], bool] | None:
        """Whether the coming backward pass is the last of its window.  None (the default): the
        optimizer counts, the ``accumulation_steps``-th micro-batch is the last.  Code that drives
        windows itself (one ``step()`` per window with ``accumulation_steps=1``, as frameworks
        do) sets True before a window's last backward pass and False before the others (it
        applies until the window ends), or a function asked at the start of every backward pass
        (kept until replaced), e.g. ``lambda: accelerator.sync_gradients``.  The last pass folds
        the clipping norm into its accumulate or, with data parallelism, starts the reduction of
        what is complete; the result does not depend on it."""
        return self._final_hint

    @final_micro_batch.setter
    def final_micro_batch(self, value: bool | Callable[[], bool] | None) -> None:
        if value is not None and not isinstance(value, bool) and not callable(value):
            raise TypeError(f"final_micro_batch must be True, False, None or a function, got "
                            f"{value!r}")
        self._final_hint = value
        if value is not None and not self._driven:
            self._driven = True   # from now on gradients are taken as they arrive
            self._buffers.set_collecting(self._collects())
        self._arm()

    def _arm(self) -> None:
        """Prepare the gradient path for the coming micro-batch: in a window's last one, fold the
        norm into its accumulate or (data parallel) reduce chunks as they complete.  With data
        parallelism the norm is taken after the reduction: a folded one, of this rank's sums
        only, would be thrown away."""
        hint = self._final_hint
        if hint is None:
            last = self._window.micro == self.accumulation_steps - 1
        else:
            last = bool(hint()) if callable(hint) else hint
        self._window.fold_norm = last and self._reducer.folds_norm
        self._buffers.on_arrival = self._reducer.on_arrival if last else None

    @eager
    @torch.no_grad()
    def flush(self) -> bool:
        """Apply the update now with what the window holds (e.g. a short last window of an
        epoch), as the mean over the micro-batches or items actually seen.  A micro-batch whose
        gradients arrived but whose ``step()`` was not called yet counts as seen.  Returns
        whether the parameters were updated.  With gradients left in ``.grad``
        (``accumulation_steps=1``, one process) there is no window between steps: nothing to
        do."""
        self.stepped = False
        if not self._buffers.collecting:
            return False
        self._check_holding()
        self._check_wrappers()
        self._buffers.check_grads()   # and settles the passes that raised
        self._buffers.check_foreign_hooks()
        self._check_hyper_types()
        if self._window.arrived:
            self._end_micro_batch()
        try:
            if self._window.micro > 0:
                self._end_window()
        finally:
            self._arm()
        return self.stepped

    def _check_schedule(self) -> None:
        """Warn once when the learning rate changes in the middle of a window: an LR scheduler
        stepped at every micro-batch (kept from a loop that called step() once per window) runs
        k times too fast.  Learning rates held in tensors are not compared (that would read the
        device)."""
        lrs = [g["lr"] if not isinstance(g["lr"], Tensor) else None for g in self.param_groups]
        if self._window.micro == 1 or self._window_lrs is None:
            self._window_lrs = lrs
        elif lrs != self._window_lrs:
            self._warn_once("schedule", "fused_accum: the learning rate changed in the middle of "
                            f"a window ({self._window.micro} of {self.accumulation_steps} micro-batches "
                            "ended): is an LR scheduler stepped at every micro-batch? It would run "
                            f"{self.accumulation_steps} times too fast; step it once per window: "
                            "`if opt.stepped: scheduler.step()`")
            self._window_lrs = lrs

    def _end_micro_batch(self) -> None:
        self._window.end_micro_batch()
        self._buffers.end_micro_batch()

    def _discard(self, params: list[Tensor] | None, set_to_none: bool) -> None:
        """zero_grad() of ``params`` (all by default) while gradients are taken as they arrive;
        also called for ``nn.Module.zero_grad`` (see :mod:`fused_accum.guards`)."""
        self._buffers.placeholders.clear(False, params)   # what this call discards anyway
        # torch's .grad after zero_grad(set_to_none=False) is zeros for what it discards too
        touched = None if set_to_none else self._buffers.holding()
        if self._buffers.discard(params):   # the micro-batch since the last step() is gone whole
            self._window.drop_since_step(self._buffers.holds_sums())
        self._buffers.keep_zero_grads(params, set_to_none, touched)
        self._buffers.zero_unhooked(params, set_to_none)

    @eager
    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's ``zero_grad`` where gradients are left in ``.grad``
        (``accumulation_steps=1``, one process).  Where they are taken as they arrive, it
        discards what arrived since the last ``step()``, where that can be done exactly (see
        :meth:`fused_accum.accumulation.zero_grad.ZeroGrad.discard`), and raises otherwise."""
        if not self._buffers.collecting:
            super().zero_grad(set_to_none)
            self._window.forget_items()
            return
        self._discard(None, set_to_none)

    def fuse_linear(self, model: torch.nn.Module) -> list[str]:
        """Let every ``nn.Linear`` of ``model`` whose weight this optimizer holds compute its
        weight gradient straight into the window's fp32 sum, inside its GEMM (see
        :mod:`fused_accum.linear`); returns the fused modules' names.  Where gradients stay in
        ``.grad`` (k = 1, one process) the modules run as before."""
        return fused_linear.fuse_linear(self._buffers, model)

    def remove_hooks(self) -> None:
        """Hand the parameters back to plain autograd (``.grad`` accumulates as usual), e.g. to
        continue with a torch optimizer.  Deleting the optimizer does the same.  The buffers and
        state stay readable; this optimizer takes no more gradients."""
        self._buffers.release()

    @property
    def grad_norm(self) -> Tensor | None:
        """Global norm of the last window's mean gradient, before clipping (a new device tensor
        each window), or None before the first window."""
        if isinstance(self._grad_norm, DeferredNorm):
            self._grad_norm = self._grad_norm.value()
        return self._grad_norm

    def live_grad_norm(self) -> Tensor:
        """A device tensor that every window's end fills with its norm, for code that hands the
        norm out before the step that computes it (the framework integrations' logging).  From
        the first call on, each window computes its norm at its end (a window with sparse
        gradients otherwise defers that to the first read of :attr:`grad_norm`)."""
        self._live_norm_wanted = True
        return self._live_norm

    @property
    def micro_batches(self) -> int:
        """Micro-batches ended in the current window."""
        return self._window.micro

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warn(message)

    @property
    def skipped_steps(self) -> int:
        """Windows whose step was skipped for non-finite gradients (reads the device counter)."""
        return int(self._skipped.item())

    @property
    def loss_scale(self) -> float | None:
        """The current loss scale (reads the device value), or None without loss scaling."""
        return None if self._scaler is None else self._scaler.scale.item()
