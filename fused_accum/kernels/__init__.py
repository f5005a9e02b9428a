"""Backends: modules implementing the op set (accumulate, accumulate_linear, norm, sgd_step,
adam_step).

The optimizers reach kernels only through :func:`get_backend`.  A backend module has a ``name``,
an ``available(device) -> (ok, reason)`` function and the five ops with the signatures of
:mod:`fused_accum.kernels.reference`, the specification every backend is tested against.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

# Name -> module path, in the order "auto" prefers them; "reference" is last because it is the
# always-available fallback.  On a GPU the compiled extension comes first by default, not by
# measurement: the two GPU backends ran op by op on one H200 (2026-12-04) and neither was faster
# at every op (docs/backends.md#which-backend-runs).
_BACKENDS: dict[str, str] = {
    "extension": "fused_accum.kernels.extension",
    "triton": "fused_accum.kernels.triton_ops",
    "reference": "fused_accum.kernels.reference",
}
ENV_VAR = "FUSED_ACCUM_BACKEND"


def backend_names() -> list[str]:
    return list(_BACKENDS)


def _load(name: str) -> ModuleType:
    return importlib.import_module(_BACKENDS[name])


def availability(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether backend ``name`` can run on ``device``, and why not when it cannot."""
    try:
        module = _load(name)
    except Exception as exc:  # a backend that cannot even import is unavailable, with the reason
        return False, f"import failed: {type(exc).__name__}: {exc}"
    return module.available(device)


def interpreted(name: str) -> bool:
    """Whether backend ``name`` runs its kernels in an interpreter (Triton's TRITON_INTERPRET=1):
    a way to test kernels without a GPU, never chosen by "auto" nor benchmarked."""
    return getattr(_load(name), "interpreted", lambda: False)()


def validate_name(name: str) -> str:
    if not isinstance(name, str) or (name != "auto" and name not in _BACKENDS):
        raise ValueError(f"backend: unknown backend {name!r}; choose 'auto' or one of "
                         f"{backend_names()}")
    return name


def get_backend(name: str, device: torch.device) -> ModuleType:
    """The backend module for ``device``.

    ``"auto"`` takes the ``FUSED_ACCUM_BACKEND`` environment variable when set, else the first
    available backend in preference order.  A backend named explicitly (argument or environment)
    that cannot run on ``device`` raises with the reason; only ``"auto"`` falls back.
    """
    validate_name(name)
    device = torch.device(device)
    if name == "auto":
        forced = os.environ.get(ENV_VAR)
        if forced:
            try:
                validate_name(forced)
            except ValueError as exc:
                raise ValueError(f"{ENV_VAR}={forced!r}: {exc}") from None
            if forced != "auto":
                return get_backend(forced, device)
        for candidate in _BACKENDS:
            if availability(candidate, device)[0] and not interpreted(candidate):
                return _load(candidate)
        raise RuntimeError(f"no fused_accum backend can run on {device}")
    ok, reason = availability(name, device)
    if not ok:
        raise RuntimeError(f"backend {name!r} cannot run on {device}: {reason}")
    return _load(name)
