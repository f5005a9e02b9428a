"""Window level: whole accumulation windows of real models, fused_accum against plain PyTorch.

Each configuration trains one real model (a forward and a backward pass per micro-batch, through
real layers) in three pipelines, each on its own copy of the same model and the same
micro-batches:

- ``fused_accum``: the one-line change (``fused_accum.<Opt>(params, accumulation_steps=k)``),
  every gradient taken by the optimizer's hooks;
- ``fused_accum fused``: the model passed in place of its parameters
  (``fused_accum.<Opt>(model, ...)``): its ``nn.Linear`` weights' gradients accumulated inside
  their GEMMs (:mod:`fused_accum.linear`);
- ``torch best``: the strongest plain-PyTorch pipeline for the job: ``(loss / k).backward()``,
  fp32 gradient accumulation (``param.grad_dtype = float32`` where torch has it) and fp32 master
  copies for low-precision models, foreach ``clip_grad_norm_``, fused optimizers,
  ``zero_grad(set_to_none=True)``;
- ``torch naive``: the hand-written loop most people write: ``(loss / k).backward()`` into
  model-dtype ``.grad``, the default optimizer on the model's own parameters.

The window time is therefore what a user sees: forward, backward, accumulation, clipping, the
optimizer step and zeroing.

Each configuration is measured in a process of its own (:func:`run` starts
``python -m fused_accum.bench.config_child`` per configuration, in the order asked for), which
builds every pipeline's model on the target device once, measures its peak memory over its first
windows (:mod:`fused_accum.bench.memory`), then times all pipelines interleaved.  Each
configuration's rows are handed back (``emit``) as soon as it is measured, so a run stopped
later keeps them; a configuration that fails or overruns ``timeout`` is reported and skipped.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fused_accum
from . import memory, models
from .harness import progress, ratio_fields, run_child, time_interleaved


@dataclass
class Config:
    name: str
    describe: str
    model: str                  # a kind of fused_accum.bench.models
    size: dict                  # the model's constructor arguments
    shape: dict                 # a micro-batch's shape
    dtype: torch.dtype
    optimizer: str              # "sgd" or "adamw"
    k: int
    max_grad_norm: float | None
    hyper: dict = field(default_factory=dict)
    loss_scaling: bool = False   # fp16: dynamic loss scaling on both sides
    compact: bool = False        # also run fused_accum with master_weights="compact"

    @property
    def numel(self) -> int:
        return models.numel(self.model, self.size)

    @property
    def tensors(self) -> int:
        return models.tensors(self.model, self.size)


def configs(device: torch.device, quick: bool) -> list[Config]:
    gpu = device.type == "cuda"
    if quick:
        conv = dict(channels=16, width=128, depth=2, classes=10)
        gpt = gpt16 = dict(vocab=512, dim=64, layers=2, heads=4, context=16)
        small, wide = dict(width=32, depth=15), dict(width=256, depth=4)
    elif gpu:
        conv = dict(channels=256, width=4096, depth=8, classes=1000)
        gpt = gpt16 = dict(vocab=32768, dim=1024, layers=8, heads=16, context=512)
        small, wide = dict(width=64, depth=100), dict(width=4096, depth=16)
    else:
        conv = dict(channels=64, width=1024, depth=6, classes=10)
        gpt = dict(vocab=8192, dim=384, layers=4, heads=6, context=32)
        gpt16 = dict(vocab=4096, dim=256, layers=2, heads=4, context=16)   # fp16 CPU GEMMs are slow
        small, wide = dict(width=48, depth=100), dict(width=2048, depth=16)
    rows = dict(batch=16 if gpu else 4, length=16)
    adamw = dict(lr=1e-4, weight_decay=0.1)
    return [
        Config("a1", "fp32 conv + MLP model, AdamW, clipping", "convmlp", conv, rows, torch.float32,
               "adamw", 4, 1.0, adamw),
        Config("a2", "fp32 conv + MLP model, SGD momentum", "convmlp", conv, rows, torch.float32,
               "sgd", 4, None, dict(lr=1e-2, momentum=0.9)),
        Config("b", "bf16 GPT-like model, AdamW, fp32 masters, clipping", "gpt", gpt,
               dict(batch=8 if gpu else 2), torch.bfloat16, "adamw", 8, 1.0, adamw, compact=True),
        Config("c", "fp16 GPT-like model, AdamW, dynamic loss scaling, fp32 masters, clipping",
               "gpt", gpt16, dict(batch=8 if gpu else 2), torch.float16, "adamw", 8, 1.0, adamw,
               loss_scaling=True),
        Config("d", "several hundred small fp32 tensors, AdamW, clipping", "small", small,
               dict(batch=64), torch.float32, "adamw", 4, 1.0, adamw),
        Config("e", "parameter-dominated fp32 model (wide Linear stack), AdamW", "wide", wide,
               dict(batch=4), torch.float32, "adamw", 4, None, adamw),
        Config("f", "parameter-dominated bf16 model (wide Linear stack), AdamW, fp32 masters",
               "wide", wide, dict(batch=4), torch.bfloat16, "adamw", 4, None, adamw, compact=True),
    ]


class Workload:
    """One pipeline's copy of the model and the micro-batches it cycles through (the same for
    every pipeline of a configuration)."""

    def __init__(self, config: Config, device: torch.device, seed: int):
        self.config = config
        self.model = models.build(config.model, config.size, config.dtype, device, seed)
        self.params = list(self.model.parameters())
        self.batches = models.batches(config.model, config.size, config.shape, config.dtype,
                                      device, seed, 2 * config.k)
        self.step = 0

    def loss(self) -> torch.Tensor:
        batch = self.batches[self.step % len(self.batches)]
        self.step += 1
        return models.loss(self.config.model, self.model, batch)


INIT_SCALE = 2.0**12   # both sides' loss scalers start here


class FusedPipeline:
    def __init__(self, config: Config, work: Workload, backend: str, compact: bool = False,
                 fused: bool = False):
        self.name = "fused_accum" + (" compact" if compact else "") + (" fused" if fused else "")
        cls = fused_accum.SGD if config.optimizer == "sgd" else fused_accum.AdamW
        scaling = fused_accum.DynamicLossScale(init_scale=INIT_SCALE) if config.loss_scaling else None
        self.opt = cls(work.model if fused else work.params, accumulation_steps=config.k,
                       max_grad_norm=config.max_grad_norm,
                       master_weights="compact" if compact else True, loss_scale=scaling,
                       backend=backend, **config.hyper)
        self.work, self.k, self.scaled = work, config.k, config.loss_scaling

    def window(self) -> None:
        for _ in range(self.k):
            if self.scaled:
                self.opt.backward(self.work.loss())   # applies the loss scale
            else:
                self.work.loss().backward()
            self.opt.step()
            self.opt.zero_grad()

    def parameters(self) -> list[torch.Tensor]:
        return self.work.params


class TorchBestPipeline:
    name = "torch best"

    def __init__(self, config: Config, work: Workload):
        self.work, self.config, self.k = work, config, config.k
        self.low_precision = config.dtype != torch.float32
        self.cast_by_hand = False
        for p in work.params:
            if self.low_precision:
                if hasattr(p, "grad_dtype"):
                    p.grad_dtype = torch.float32   # autograd accumulates in fp32
                else:
                    self.cast_by_hand = True
        self.masters = ([p.detach().float().clone().requires_grad_() for p in work.params]
                        if self.low_precision else work.params)
        cls = torch.optim.SGD if config.optimizer == "sgd" else torch.optim.AdamW
        self.opt = cls(self.masters, fused=True, **config.hyper)
        self.scaler = (torch.amp.GradScaler(work.params[0].device.type, init_scale=INIT_SCALE)
                       if config.loss_scaling else None)

    def window(self) -> None:
        params = self.work.params
        accumulated = None
        for _ in range(self.k):
            loss = self.work.loss() / self.k
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            if self.cast_by_hand:   # torch without grad_dtype: cast and add in two kernels
                grads = [p.grad.float() for p in params]
                if accumulated is None:
                    accumulated = grads
                else:
                    torch._foreach_add_(accumulated, grads)
                for p in params:
                    p.grad = None
        if self.low_precision:
            for m, p, g in zip(self.masters, params, accumulated or [p.grad for p in params]):
                m.grad = g
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.masters, self.config.max_grad_norm, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        if self.low_precision:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in params], self.masters)
            for m in self.masters:
                m.grad = None
        self.opt.zero_grad(set_to_none=True)
        for p in params:
            p.grad = None

    def parameters(self) -> list[torch.Tensor]:
        return self.work.params


class TorchNaivePipeline:
    name = "torch naive"

    def __init__(self, config: Config, work: Workload):
        self.work, self.config, self.k = work, config, config.k
        cls = torch.optim.SGD if config.optimizer == "sgd" else torch.optim.AdamW
        self.opt = cls(work.params, **config.hyper)

    def window(self) -> None:
        for _ in range(self.k):
            (self.work.loss() / self.k).backward()
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.work.params, self.config.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad()

    def parameters(self) -> list[torch.Tensor]:
        return self.work.params


def pipeline_names(config: Config) -> list[str]:
    return (["fused_accum", "fused_accum fused"] + (["fused_accum compact"] if config.compact else [])
            + ["torch best", "torch naive"])


def make_pipeline(name: str, config: Config, work: Workload, backend: str):
    if name.startswith("fused_accum"):
        return FusedPipeline(config, work, backend, compact="compact" in name,
                             fused=name.endswith("fused"))
    return (TorchBestPipeline if name == "torch best" else TorchNaivePipeline)(config, work)


def bytes_per_parameter(config: Config, pipeline: str) -> float:
    """Optimizer-side bytes moved per parameter per window (docs/design.md#byte-accounting):
    beyond the gradients autograd's GEMMs write, which no pipeline counts.  ``fused_accum fused``:
    a fused Linear weight's GEMM writes its fp32 sum on the window's first micro-batch (4 bytes)
    and reads and writes it after (8), in place of writing a model-dtype gradient (``e``); the
    other parameters as ``fused_accum``."""
    k, e = config.k, config.dtype.itemsize
    clip = config.max_grad_norm is not None
    step32 = 28 if config.optimizer == "adamw" else 20          # fp32 param, grad, state in/out
    if pipeline.startswith("fused_accum"):
        # bf16/fp16: fp32 master in/out and the parameter read (whether it was written since the
        # last step) and written, or (compact) the bf16 parameter and int16 remainder in/out
        step = step32 if e == 4 or "compact" in pipeline else step32 + 2 * e
        if e == 4:   # the first gradient is adopted, later ones added; the norm is folded in
            hooked = (k - 1) * 12
        else:
            hooked = (e + 4) + (k - 1) * (e + 8)
        if not pipeline.endswith("fused"):
            return hooked + step
        fused = models.linear_weight_numel(config.model, config.size) / config.numel
        gemm = (4 - e) + (k - 1) * (8 - e)
        return round((1 - fused) * hooked + fused * gemm + step, 1)
    if pipeline == "torch best":
        first = e + 4 if e != 4 else 0                           # autograd steals an fp32 grad
        later = (e + 4) + 12 if e != 4 else 12                   # cast, then add
        copy_back = 4 + e if e != 4 else 0
        unscale = 8 if config.loss_scaling else 0                # GradScaler.unscale_ reads, writes
        return first + (k - 1) * later + unscale + (12 if clip else 0) + step32 + copy_back
    state = 2 * e if config.optimizer == "adamw" else e          # naive: everything in model dtype
    return (k - 1) * 3 * e + (3 * e if clip else 0) + 2 * e + e + 2 * state


def find(device: torch.device, quick: bool, name: str) -> Config:
    return next(c for c in configs(device, quick) if c.name == name)


def measure_config(config: Config, device: torch.device, repeats: int, copy_bw: float,
                   backend: str = "auto") -> list[dict]:
    """One configuration's rows, measured in this process: each pipeline built (its model on
    ``device``) and run for its first windows under a :class:`memory.PeakMeter`, then all timed
    together, interleaved."""
    # Every pipeline once on the quick version of this configuration first: modules imported
    # (torch.optim's first optimizer imports torch._dynamo, about 100 MB), libraries loaded,
    # kernels compiled, handles and workspaces made, so that the first measured pipeline's peak
    # does not carry what every later one finds ready.
    meter = memory.PeakMeter(device)   # before any allocation that it should see freed
    progress(f"windows: ({config.name}) warm-up on small sizes")
    small = find(device, True, config.name)
    for name in pipeline_names(small):
        make_pipeline(name, small, Workload(small, device, 0), backend).window()
    pipelines, peaks = [], {}
    for name in pipeline_names(config):
        progress(f"windows: ({config.name}) {name}: built, peak memory over {memory.WINDOWS} windows")
        work = Workload(config, device, 0)
        meter.start()
        p = make_pipeline(name, config, work, backend)
        for _ in range(memory.WINDOWS):   # also the warm-up of the timing below
            p.window()
        peaks[name] = meter.peak()
        pipelines.append(p)
    meter.timing_allocator()
    progress(f"windows: ({config.name}) timing, {repeats} interleaved repetitions")
    timings = time_interleaved({p.name: p.window for p in pipelines}, device, repeats, warmup=1)
    reference = next(p for p in pipelines if p.name == "torch best").parameters()
    base = timings["torch best"]
    base_peak = peaks["torch best"]
    rows = []
    for p in pipelines:
        t = timings[p.name]
        nbytes = bytes_per_parameter(config, p.name) * config.numel
        diff = max(((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
                   for a, b in zip(p.parameters(), reference))
        peak = peaks[p.name]
        rows.append(dict(
            config=config.name, describe=config.describe, parameters=config.numel,
            tensors=config.tensors, dtype=str(config.dtype).replace("torch.", ""),
            k=config.k, pipeline=p.name, time_s=t.median, time_p10_s=t.p10, time_p90_s=t.p90,
            repeats=repeats, **ratio_fields("time_vs_torch_best", t, base, p.name == "torch best"),
            bytes_per_parameter=bytes_per_parameter(config, p.name), bytes=nbytes,
            gb_per_s=nbytes / t.median / 1e9, fraction_of_copy=nbytes / t.median / copy_bw,
            peak_memory_bytes=peak,
            peak_memory_vs_torch_best=(None if peak is None or base_peak is None
                                       else peak / max(base_peak, 1)),
            max_rel_diff_vs_torch_best=diff))
    return rows


def run(device: torch.device, quick: bool, repeats: int, copy_bw: float, backend: str = "auto",
        only: list[str] | None = None, emit: Callable[[str, list[dict]], None] | None = None,
        timeout: float | None = None, failures: list[dict] | None = None) -> list[dict]:
    """Every configuration (or those of ``only``, in that order), each in its own process.
    ``emit(config, rows)`` is called as each one is measured; one that fails or runs past
    ``timeout`` seconds is appended to ``failures`` and skipped."""
    chosen = configs(device, quick)
    unknown = set(only or ()) - {c.name for c in chosen}
    if unknown:
        raise ValueError(f"--configs: no configuration {sorted(unknown)}; "
                         f"there are {[c.name for c in chosen]}")
    if only:
        chosen = [find(device, quick, name) for name in dict.fromkeys(only)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fused_accum_bench_") as tmp:
        for config in chosen:
            progress(f"windows: ({config.name}) {config.describe}, {config.numel / 1e6:.1f}M "
                     f"parameters, k={config.k}, in its own process")
            out = Path(tmp) / f"{config.name}.json"
            code, tail = run_child(
                [sys.executable, "-m", "fused_accum.bench.config_child", config.name,
                 "--device", str(device), "--repeats", str(repeats), "--copy-bw", repr(copy_bw),
                 "--backend", backend, "--out", str(out)] + (["--quick"] if quick else []),
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=timeout)
            if code != 0 or not out.exists():
                why = f"past its {timeout:.0f} s cap" if code == "timeout" else f"exit {code}"
                progress(f"windows: ({config.name}) FAILED ({why}), its output above; going on")
                if failures is not None:
                    failures.append(dict(level="windows", config=config.name, error=why,
                                         output_tail=tail[-4000:]))
                continue
            config_rows = json.loads(out.read_text())["rows"]
            rows += config_rows
            if emit is not None:
                emit(config.name, config_rows)
    return rows
