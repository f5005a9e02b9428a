"""Which ranks a fused optimizer averages its windows over, and the wrappers it works beside.

- ``process_group="auto"`` (the default): with torch.distributed initialized over more than one
  rank, the default group, so that data-parallel training is right without being asked;
  otherwise none.  ``process_group=None``: each rank trains alone (said once in a warning when
  there are several ranks).  ``True`` or a group: that group.
- DistributedDataParallel around the model: fused_accum's hooks take each gradient before DDP's
  reducer sees it, so DDP would all-reduce empty buckets every micro-batch.  The optimizer finds
  the DDP modules that own its parameters (when it is built, and again at its first step, for
  wrappers made later, as accelerate and transformers do), switches their gradient hooks off and
  reduces once per window itself, over DDP's group.  DDP keeps broadcasting buffers in forward.
- Parameters that another engine reduces its own way are refused: FSDP1's FlatParameters (and
  its ``use_orig_params`` views), and DTensors (FSDP2, tensor parallel), whose sharding fused_accum
  does not handle yet.
"""
from __future__ import annotations

import gc
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._warnings import warn
from ..placeholders import is_placeholder

AUTO = "auto"
_SWITCHED_OFF = "_fused_accum_switched_off"


def world_size() -> int:
    """Ranks of the default group (1 when torch.distributed is not initialized)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def resolve(process_group: Any) -> Any:
    """The group to reduce over (True: the default group), or None."""
    if isinstance(process_group, str):
        if process_group != AUTO:
            raise ValueError(f"process_group: expected 'auto', True, None or a process group, "
                             f"got {process_group!r}")
        return True if world_size() > 1 else None
    if process_group is None and world_size() > 1:
        warn(f"fused_accum: process_group=None with {world_size()} ranks: each rank trains on "
             "its own micro-batches alone and the ranks drift apart; leave "
             "process_group='auto' to average every window over all ranks")
    if process_group is False:
        raise ValueError("process_group: pass None for no reduction, not False")
    return process_group


def check_parameter(param: Tensor, label: str) -> None:
    """Refuse a parameter that another engine reduces or shards its own way."""
    if getattr(param, "_is_flat_param", False) or getattr(param, "_fsdp_flattened", False):
        raise TypeError(f"fused_accum: parameter {label} belongs to an FSDP module "
                        "(FullyShardedDataParallel reduce-scatters its gradients itself); "
                        "fused_accum supports plain and DistributedDataParallel models, not FSDP. "
                        + _SHARDED_INSTEAD)
    if _is_dtensor(param):
        raise TypeError(f"fused_accum: parameter {label} is a DTensor (FSDP2 fully_shard or "
                        "tensor parallel), which fused_accum does not train yet: FSDP2 "
                        "reduce-scatters every micro-batch's gradients into sharded .grad itself, "
                        "and fused_accum cannot yet accumulate those shards in fp32, take the "
                        "clipping norm over all shards, or weigh items across ranks. "
                        + _SHARDED_INSTEAD)


_SHARDED_INSTEAD = ("To shard the optimizer state, keep the model unsharded (plain or "
                    "DistributedDataParallel) and pass shard_state=True")


def _is_dtensor(param: Tensor) -> bool:
    if type(param) in (Tensor, torch.nn.Parameter):
        return False   # the common case, without importing torch.distributed.tensor
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(param, DTensor)


def ddp_owners(params: list[Tensor]) -> list[Any]:
    """The live DistributedDataParallel modules that hold any of ``params``."""
    if world_size() <= 1:
        return []
    from torch.nn.parallel import DistributedDataParallel
    ids = {id(p) for p in params}
    found = []
    for obj in gc.get_objects():
        # The type, not isinstance: that would ask every object for __class__, which some
        # (deprecated torch.distributed.reduce_op, lazy proxies) answer with a warning.
        if not issubclass(type(obj), DistributedDataParallel):
            continue
        if any(id(p) in ids for p in getattr(obj, "_module_parameters", ())):
            found.append(obj)
    return found


def take_over(owners: list, reducer: Any, params: list[Tensor]) -> None:
    """Switch off the DistributedDataParallel modules ``owners`` around ``params``: the optimizer,
    whose ``reducer`` (distributed, else the one process's) reduces once per window, takes their place."""
    for ddp in owners:
        if not reducer.distributed:
            raise ValueError("process_group=None, but the model is wrapped in "
                             "DistributedDataParallel, whose reduction fused_accum's hooks "
                             "bypass: the ranks would drift apart; leave process_group='auto'")
        if not same_group(ddp.process_group, reducer.group):
            raise ValueError("process_group: the model's DistributedDataParallel reduces over "
                             "other ranks than this optimizer's process_group; pass DDP's group "
                             "(or leave process_group='auto')")
        switch_off(ddp)
    if owners:   # before it was switched off, DDP wrote its (empty) reduction into .grad
        for p in params:
            if not is_placeholder(p.grad):
                p.grad = None


def switch_off(ddp: Any) -> None:
    """Stop ``ddp`` reducing gradients in backward (fused_accum reduces once per window)."""
    if getattr(ddp, _SWITCHED_OFF, False):
        return
    if getattr(ddp, "mixed_precision", None) is not None:
        raise ValueError("fused_accum: this DistributedDataParallel uses its mixed_precision= "
                         "option, which keeps its own low-precision gradient copies; drop it "
                         "(fused_accum accumulates in fp32 for any parameter dtype)")
    if getattr(ddp, "_use_python_reducer", False) or getattr(ddp, "_delay_all_reduce_params", ()):
        raise ValueError("fused_accum: this DistributedDataParallel reduces gradients through "
                         "its Python reducer or delayed all-reduce, which fused_accum cannot "
                         "switch off; wrap the model in plain DDP, or do not wrap it")
    if hasattr(ddp, "_remove_autograd_hooks"):
        ddp._remove_autograd_hooks()   # the reducer stays inert; forward buffer broadcast stays
    else:   # older torch: a communication hook that sends nothing
        ddp.register_comm_hook(None, _no_communication)
    setattr(ddp, _SWITCHED_OFF, True)


def _no_communication(state: Any, bucket: Any) -> torch.futures.Future:
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def same_group(a: Any, b: Any) -> bool:
    """Whether two process groups (None or True: the default one) are the same ranks."""
    default = dist.distributed_c10d._get_default_group()
    a = default if a in (None, True) else a
    b = default if b in (None, True) else b
    return a is b or dist.get_process_group_ranks(a) == dist.get_process_group_ranks(b)
