"""Buckets: the parameters of one param group that share a device and a dtype, and their buffers.

Each bucket owns the flat fp32 optimizer state (moments, masters) of its parameters, so that a
kernel stage is one backend call per bucket, never one per parameter, and one fp32 accumulator per
parameter for the window in progress.  The accumulators take one of two forms:

- **flat** (low-precision parameters, and every bucket reduced across ranks): slices of one
  persistent fp32 buffer.  The first touch of a slice in a window overwrites it (acc = w * g), so
  the buffer is never zeroed; its contiguous regions are what data parallelism all-reduces.
- **adopted** (fp32 parameters): the first fp32 gradient a parameter receives in a window becomes
  its accumulator, as autograd's own ``.grad`` accumulation does; later gradients are added into
  it and it is released when the window ends.  The first micro-batch then moves no bytes at all,
  and nothing is held between windows: an fp32 window costs what plain PyTorch's does, in bytes
  and in memory (docs/design.md#byte-accounting, docs/design.md#memory-accounting).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels

ALIGN = 16   # elements
MASTER_STATES = ("master_param", "master_remainder")   # fp32 masters; int16 remainders (compact)


def param_label(group_index: int, index: int, names: list[str] | None) -> str:
    where = f"param_groups[{group_index}]['params'][{index}]"
    return f"'{names[index]}' ({where})" if names else where


class FlatState:
    """Flat optimizer state buffers of ``size`` elements, by torch's names: a bucket's, or one
    rank's shard of it (:class:`fused_accum.distributed.sharded.BucketShard`).  ``views(flat,
    indices)`` gives the kernels' per-tensor views of one."""

    size: int
    device: torch.device
    state: dict[str, Tensor]

    def views(self, flat: Tensor, indices: list[int]) -> list[Tensor]:
        raise NotImplementedError

    def ensure_state(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """The flat state buffer ``name`` (fp32 unless said), allocated as zeros on first use."""
        if name not in self.state:
            self.state[name] = torch.zeros(self.size, dtype=dtype, device=self.device)
        return self.state[name]

    def master_views(self, indices: list[int]) -> list[Tensor] | None:
        """What the kernels take as masters: fp32 masters, int16 remainders (compact), or None."""
        for name in MASTER_STATES:
            if name in self.state:
                return self.views(self.state[name], indices)
        return None


class Bucket(FlatState):
    """The parameters of one param group on one device with one dtype, and their buffers."""

    def __init__(self, group_index: int, params: list[Tensor], labels: list[str], backend_name: str,
                 flat: bool):
        self.group_index = group_index
        self.params = params
        self.labels = labels
        self.device = params[0].device
        self.dtype = params[0].dtype
        self.backend = kernels.get_backend(backend_name, self.device)
        self.numels = [p.numel() for p in params]
        # Each slice starts on a multiple of ALIGN elements (64 bytes), so kernels can use vector
        # loads on every parameter's slice of every flat buffer.
        self.offsets = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += -(-n // ALIGN) * ALIGN
        self.size = total
        self.flat = flat
        # flat: never zeroed, the first touch of a slice in a window overwrites it.
        self.acc = torch.empty(total, dtype=torch.float32, device=self.device) if flat else None
        self.adopted: list[Tensor | None] = [None] * len(params)   # not flat: this window's
        self.state: dict[str, Tensor] = {}          # flat fp32 optimizer state, by torch's names
        self.steps = torch.zeros(len(params), dtype=torch.float32, device=self.device)
        self.sumsq = torch.zeros((), dtype=torch.float32, device=self.device)
        self.touched = [False] * len(params)        # got a gradient in this window
        self.settled = [False] * len(params)        # touched before the last step()
        self.added = [False] * len(params)          # added into since the last step()
        self.norm_counted = [False] * len(params)   # its final acc is already in sumsq
        self.norm_valid = True                      # False once a counted slice changed again
        # zero_grad(set_to_none=False), as torch sees it: a parameter that would hold a .grad
        # (stepped in a window, until zero_grad() sets it to None) keeps a zero one, and torch
        # steps it with that zero gradient in every window until then.
        self.holds_grad = [False] * len(params)
        self.zeroed = [False] * len(params)
        self.rounding_seed = -1                     # >= 0: stochastic rounding of the parameters
        self._views: dict[int, tuple[Tensor, list[Tensor]]] = {}
        self._step_views: list[Tensor] | None = None

    def place(self, offsets: list[int], size: int) -> None:
        """Lay the slices out at ``offsets`` in flat buffers of ``size`` elements (sharding pads
        each chunk to a multiple of the ranks).  Only for a flat bucket holding nothing yet."""
        assert self.flat and not self.state and not any(self.touched), "place() a fresh bucket"
        self.offsets, self.size = offsets, size
        self.acc = torch.empty(size, dtype=torch.float32, device=self.device)
        self._views.clear()

    def view(self, flat: Tensor, i: int) -> Tensor:
        """Parameter i's slice of a flat buffer, shaped like the parameter."""
        return flat[self.offsets[i]:self.offsets[i] + self.numels[i]].view(self.params[i].shape)

    def views(self, flat: Tensor, indices: list[int]) -> list[Tensor]:
        """Views of ``indices`` into a flat buffer of this bucket, built once per buffer (the
        buffers live as long as the bucket, so the views stay valid)."""
        cached = self._views.get(id(flat))
        if cached is None or cached[0] is not flat:
            cached = (flat, [self.view(flat, i) for i in range(len(self.params))])
            self._views[id(flat)] = cached
        every = cached[1]
        return [every[i] for i in indices]

    # -- accumulators ----------------------------------------------------------------------------

    def acc_views(self, indices: list[int]) -> list[Tensor]:
        """The accumulators of ``indices`` (touched ones, for an adopting bucket)."""
        if self.flat:
            return self.views(self.acc, indices)
        return [self.adopted[i] for i in indices]

    def acc_view(self, i: int) -> Tensor:
        return self.view(self.acc, i) if self.flat else self.adopted[i]

    def new_accumulator(self, i: int) -> Tensor:
        """Storage for parameter i's accumulator when its first gradient cannot be adopted (it is
        not contiguous, or it belongs to someone else); an adopting bucket keeps it."""
        if self.flat:
            return self.view(self.acc, i)
        acc = torch.empty(self.params[i].shape, dtype=torch.float32, device=self.device)
        self.adopted[i] = acc
        return acc

    def load_accumulator(self, i: int, value: Tensor) -> None:
        self.new_accumulator(i).copy_(value)

    def accumulator_bytes(self) -> int:
        if self.flat:
            return self.acc.nbytes
        return sum(a.nbytes for a in self.adopted if a is not None)

    # -- optimizer state -------------------------------------------------------------------------

    def step_views(self, indices: list[int]) -> list[Tensor]:
        """0-d views of the per-parameter step counts."""
        if self._step_views is None:
            self._step_views = [self.steps[i] for i in range(len(self.params))]
        return [self._step_views[i] for i in indices]

    def param_state(self, i: int) -> dict[str, Tensor]:
        """Parameter i's state, shaped like the parameter (live views)."""
        return {name: self.view(flat, i) for name, flat in self.state.items()}

    def state_entries(self, whole: bool = True) -> list[dict[str, Tensor]]:
        """Per parameter, its state shaped like it (live views)."""
        return [self.param_state(i) for i in range(len(self.params))]

    def load_param_state(self, flat: Tensor, i: int, value: Tensor | None) -> None:
        """Parameter i's slice of ``flat`` from its saved value (None: zeros)."""
        view = self.view(flat, i)
        if value is not None and value.layout != torch.strided:
            value = value.to_dense()   # torch's SGD keeps a sparse gradient's momentum sparse
        view.zero_() if value is None else view.copy_(value)

    def copy_params_to(self, flat: Tensor) -> None:
        """Writes the parameters into their slices of a flat buffer of this bucket, in place, so
        that making masters costs no transient copy of the bucket."""
        for i, p in enumerate(self.params):
            self.view(flat, i).copy_(p.detach())

    # -- the window ------------------------------------------------------------------------------

    def touched_indices(self) -> list[int]:
        return [i for i, t in enumerate(self.touched) if t]

    def untouch(self, i: int) -> None:
        """Forget parameter i's contribution to the window (its first touch is undone)."""
        self.touched[i] = False
        self.adopted[i] = None
        if self.norm_counted[i]:
            self.norm_counted[i] = False
            self.norm_valid = False

    def end_micro_batch(self) -> None:
        """step() ended a micro-batch: what is touched now is settled."""
        self.settled = self.touched.copy()
        if True in self.added:
            self.added = [False] * len(self.params)

    def touch_zeroed(self, sparse: set[int] = frozenset()) -> None:
        """Give each parameter that holds a zeroed gradient (zero_grad(set_to_none=False)) and got
        none in this window a zero accumulator, so that the window's step takes it as torch
        takes its zero .grad; the ``sparse`` ones get an empty sparse sum instead
        (:meth:`fused_accum.accumulation.sparse.SparseSums.touch_zeroed`)."""
        for i, zeroed in enumerate(self.zeroed):
            if zeroed and not self.touched[i] and i not in sparse:
                self.new_accumulator(i).zero_()
                self.touched[i] = True

    def reset_window(self) -> None:
        self.holds_grad = [h or t for h, t in zip(self.holds_grad, self.touched)]
        self.touched = [False] * len(self.params)
        self.settled = [False] * len(self.params)
        self.added = [False] * len(self.params)
        self.adopted = [None] * len(self.params)
        self.norm_counted = [False] * len(self.params)
        self.norm_valid = True
        self.sumsq.zero_()
