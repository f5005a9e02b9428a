"""Block sizes and warp counts of the Triton kernels.

Measured entries come from ``python -m fused_accum tune`` (see ``fused_accum/bench/tune.py``), which
times every candidate on the GPU and writes ``tuned.json`` beside this file, keyed by the device
name that ``torch.cuda.get_device_name`` reports.  A GPU without an entry runs ``UNTUNED``, and
``python -m fused_accum info`` says so.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

TUNED_FILE = Path(__file__).with_name("tuned.json")
OPS = ("accumulate", "norm", "sgd_step", "adam_step")


@dataclass(frozen=True)
class Config:
    block: int
    num_warps: int


# The candidates ``tune`` times: elements per program and warps per program.
CANDIDATES = tuple(Config(block, warps) for block in (1024, 2048, 4096, 8192)
                   for warps in (4, 8, 16) if block // (32 * warps) >= 4)
# No measurement behind it: the middle of the candidates, until ``tune`` has run on the GPU.
UNTUNED = Config(block=2048, num_warps=8)
# CPU tensors under TRITON_INTERPRET=1: each program is interpreted with numpy, so larger blocks
# mean fewer programs and faster tests; warps mean nothing there.
INTERPRETER = Config(block=2048, num_warps=1)


_forced: Config | None = None


def read(path: Path = TUNED_FILE) -> dict:
    """The tuning file: device name -> {"configs": op -> dtype name -> config, ...}."""
    return json.loads(path.read_text()) if path.exists() else {}


def device_key(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"


def dtype_key(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def measured(device: torch.device) -> dict | None:
    """The measured table of ``device`` (op -> dtype name -> config), or None."""
    return _read_once().get(device_key(device), {}).get("configs")


@lru_cache(maxsize=None)
def _read_once() -> dict:
    return read()


@contextlib.contextmanager
def forced(config: Config) -> Iterator[None]:
    """Every launch inside the block uses ``config`` (how ``tune`` times the candidates)."""
    global _forced
    previous, _forced = _forced, config
    try:
        yield
    finally:
        _forced = previous


def lookup(op: str, dtype: torch.dtype, device: torch.device) -> Config:
    return _forced or _lookup(op, dtype, device)


@lru_cache(maxsize=None)
def _lookup(op: str, dtype: torch.dtype, device: torch.device) -> Config:
    if device.type != "cuda":
        return INTERPRETER
    entry = (measured(device) or {}).get(op, {}).get(dtype_key(dtype))
    return Config(**entry) if entry else UNTUNED
