"""The compiled ops' schemas and fake implementations: the one place they are declared.

``csrc/cpu/registration.cpp`` and ``csrc/cuda/registration.cu`` register one implementation per
device for these names.  Optional tensor lists of the reference contract are empty lists here;
values that may change between calls (weight, lr, grad_scale, flags) are 0-d fp32 tensors on the
op's device.
The fake implementations let ``torch.compile`` trace a window: every op mutates its arguments in
place and returns nothing, so they only check what a kernel would check cheaply.
"""
from __future__ import annotations

import torch
from torch import Tensor

NAMESPACE = "fused_accum"

SCHEMAS = {
    "accumulate": "(Tensor[] grads, Tensor(a!)[] accs, int[] first, Tensor weight, "
                  "Tensor(b!) found_inf, Tensor(c!)? sumsq) -> ()",
    "norm": "(Tensor[] accs, Tensor(a!) sumsq) -> ()",
    "sgd_step": "(Tensor(a!)[] params, Tensor[] accs, Tensor(b!)[] momentum_buffers, "
                "Tensor(c!)[] steps, Tensor(d!)[] masters, Tensor lr, float momentum, "
                "float dampening, float weight_decay, bool nesterov, bool maximize, "
                "Tensor grad_scale, Tensor found_inf, int rounding_seed=-1) -> ()",
    "adam_step": "(Tensor(a!)[] params, Tensor[] accs, Tensor(b!)[] exp_avgs, "
                 "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, "
                 "Tensor(f!)[] masters, Tensor lr, float beta1, float beta2, float eps, "
                 "float weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
                 "Tensor grad_scale, Tensor found_inf, int rounding_seed=-1) -> ()",
}

_library: torch.library.Library | None = None


def _same_numel(what: str, a: list[Tensor], b: list[Tensor]) -> None:
    torch._check(len(a) == len(b), lambda: f"{what}: lists of {len(a)} and {len(b)} tensors")
    for x, y in zip(a, b):
        torch._check(x.numel() == y.numel(), lambda: f"{what}: {x.numel()} vs {y.numel()} elements")


def _fake_accumulate(grads, accs, first, weight, found_inf, sumsq) -> None:
    _same_numel("accumulate", grads, accs)
    torch._check(len(first) == len(accs), lambda: "accumulate: one first flag per tensor")


def _fake_norm(accs, sumsq) -> None:
    return None


def _fake_sgd_step(params, accs, momentum_buffers, steps, masters, lr, momentum, dampening,
                   weight_decay, nesterov, maximize, grad_scale, found_inf, rounding_seed=-1) -> None:
    _same_numel("sgd_step", params, accs)


def _fake_adam_step(params, accs, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, masters, lr,
                    beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
                    grad_scale, found_inf, rounding_seed=-1) -> None:
    _same_numel("adam_step", params, accs)


_FAKES = {"accumulate": _fake_accumulate, "norm": _fake_norm, "sgd_step": _fake_sgd_step,
          "adam_step": _fake_adam_step}


def define() -> None:
    """Declare the ops and their fake implementations (idempotent)."""
    global _library
    if _library is not None:
        return
    library = torch.library.Library(NAMESPACE, "DEF")
    for name, schema in SCHEMAS.items():
        library.define(name + schema)
        torch.library.register_fake(f"{NAMESPACE}::{name}", _FAKES[name], lib=library)
    _library = library
