"""Window level: whole accumulation windows, fused_accum against plain PyTorch.

Each configuration runs three pipelines over the same parameters and the same gradients:

- ``fused_accum``: the one-line change (``fused_accum.<Opt>(..., accumulation_steps=k)``);
- ``torch best``: the strongest plain-PyTorch pipeline for the job: fp32 gradient accumulation
  (``param.grad_dtype = float32`` where torch has it), fp32 master copies for low-precision
  models, foreach ``clip_grad_norm_``, fused optimizers, ``zero_grad(set_to_none=True)``;
- ``torch naive``: the hand-written loop most people write: ``(loss / k).backward()`` into
  model-dtype ``.grad``, the default optimizer on the model's own parameters.

A micro-batch's backward hands each parameter a precomputed gradient (one of three
random sets, in rotation) through an autograd Function: the backward costs what any backward must
(writing each gradient once) and the window time is the gradient pipeline's (accumulation,
clipping, optimizer step, zeroing), which is what the pipelines do differently.  Parameter shapes are those of the named model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import fused_accum
from . import memory
from .harness import progress, time_interleaved


def gpt_shapes(layers: int, dim: int, vocab: int) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, dim), (1024, dim)]
    for _ in range(layers):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]
    return shapes + [(dim,), (dim,)]


def small_tensor_shapes(count: int) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(0)
    return [(int(n),) for n in torch.randint(256, 4096, (count,), generator=g)]


@dataclass
class Config:
    name: str
    describe: str
    shapes: list[tuple[int, ...]]
    dtype: torch.dtype
    optimizer: str              # "sgd" or "adamw"
    k: int
    max_grad_norm: float | None
    hyper: dict = field(default_factory=dict)
    loss_scaling: bool = False   # fp16: dynamic loss scaling on both sides
    compact: bool = False        # also run fused_accum with master_weights="compact"

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def configs(device: torch.device, quick: bool) -> list[Config]:
    scale = 1 if device.type == "cpu" else 4
    if quick:
        gpt = gpt_shapes(2, 128, 2048)
    else:
        gpt = gpt_shapes(4 * scale, 384 * scale, 8192)
    return [
        Config("a", "fp32 model, SGD momentum", gpt, torch.float32, "sgd", 4, None,
               dict(lr=1e-2, momentum=0.9)),
        Config("b", "bf16 GPT-like model, AdamW, fp32 masters, clipping", gpt, torch.bfloat16,
               "adamw", 8, 1.0, dict(lr=1e-4, weight_decay=0.1), compact=True),
        Config("c", "fp16 GPT-like model, AdamW, dynamic loss scaling, fp32 masters, clipping",
               gpt, torch.float16, "adamw", 8, 1.0, dict(lr=1e-4, weight_decay=0.1),
               loss_scaling=True),
        Config("d", "several hundred small fp32 tensors, AdamW (launch-bound)",
               small_tensor_shapes(60 if quick else 400), torch.float32, "adamw", 4, 1.0,
               dict(lr=1e-4, weight_decay=0.1)),
    ]


class _InjectGradients(torch.autograd.Function):
    """loss = 0 * scale; its backward gives parameter i ``grads[i] * grad_output``."""

    @staticmethod
    def forward(ctx, grads, scale, *params):
        ctx.grads = grads
        return scale * 0

    @staticmethod
    def backward(ctx, grad_output):
        # Fresh tensors scaled by the incoming gradient (a loss divided by k gives gradients
        # divided by k), written once as a real backward writes them; handing out the stored
        # tensors would also let autograd steal them as .grad and add into them in place.
        return (None, None, *[g * grad_output for g in ctx.grads])


class Workload:
    """Parameters of a configuration and the gradients each micro-batch's backward delivers."""

    def __init__(self, config: Config, device: torch.device, seed: int):
        g = torch.Generator(device=device).manual_seed(seed)
        make = lambda scale: [(torch.randn(s, generator=g, device=device) * scale).to(config.dtype)
                              for s in config.shapes]
        self.params = [torch.nn.Parameter(t) for t in make(0.02)]
        self.gradient_sets = [make(1e-3) for _ in range(3)]
        self.scale = torch.ones((), device=device, requires_grad=True)
        self.step = 0

    def loss(self) -> torch.Tensor:
        grads = self.gradient_sets[self.step % len(self.gradient_sets)]
        self.step += 1
        return _InjectGradients.apply(grads, self.scale, *self.params)


INIT_SCALE = 2.0**12   # both sides' loss scalers start here; the gradients never overflow it


class FusedPipeline:
    def __init__(self, config: Config, work: Workload, backend: str, compact: bool = False):
        self.name = "fused_accum compact" if compact else "fused_accum"
        cls = fused_accum.SGD if config.optimizer == "sgd" else fused_accum.AdamW
        scaling = fused_accum.DynamicLossScale(init_scale=INIT_SCALE) if config.loss_scaling else None
        self.opt = cls(work.params, accumulation_steps=config.k, max_grad_norm=config.max_grad_norm,
                       master_weights="compact" if compact else True, loss_scale=scaling,
                       backend=backend, **config.hyper)
        self.work, self.k = work, config.k

    def window(self) -> None:
        for _ in range(self.k):
            self.opt.backward(self.work.loss())
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
    return ["fused_accum"] + (["fused_accum compact"] if config.compact else []) + ["torch best", "torch naive"]


def make_pipeline(name: str, config: Config, work: Workload, backend: str):
    if name.startswith("fused_accum"):
        return FusedPipeline(config, work, backend, compact=name.endswith("compact"))
    return (TorchBestPipeline if name == "torch best" else TorchNaivePipeline)(config, work)


def bytes_per_parameter(config: Config, pipeline: str) -> int:
    """Optimizer-side bytes moved per parameter per window (DESIGN.md §5)."""
    k, e = config.k, config.dtype.itemsize
    clip = config.max_grad_norm is not None
    step32 = 28 if config.optimizer == "adamw" else 20          # fp32 param, grad, state in/out
    if pipeline.startswith("fused_accum"):
        if e == 4 or pipeline.endswith("compact"):
            step = step32          # fp32 param in/out, or bf16 param + int16 remainder in/out
        else:
            step = step32 + e      # fp32 master in/out, and the parameter written
        return (e + 4) + (k - 1) * (e + 8) + step
    if pipeline == "torch best":
        first = e + 4 if e != 4 else 0                           # autograd steals an fp32 grad
        later = (e + 4) + 12 if e != 4 else 12                   # cast, then add
        copy_back = 4 + e if e != 4 else 0
        unscale = 8 if config.loss_scaling else 0                # GradScaler.unscale_ reads, writes
        return first + (k - 1) * later + unscale + (12 if clip else 0) + step32 + copy_back
    state = 2 * e if config.optimizer == "adamw" else e          # naive: everything in model dtype
    return (k - 1) * 3 * e + (3 * e if clip else 0) + 2 * e + e + 2 * state


def run(device: torch.device, quick: bool, repeats: int, copy_bw: float, backend: str = "auto") -> list[dict]:
    rows = []
    for config in configs(device, quick):
        progress(f"windows: ({config.name}) {config.describe}, {config.numel / 1e6:.1f}M parameters, k={config.k}")
        pipelines = [make_pipeline(name, config, Workload(config, device, 0), backend)
                     for name in pipeline_names(config)]
        timings = time_interleaved({p.name: p.window for p in pipelines}, device, repeats, warmup=1)
        names = [p.name for p in pipelines]
        if device.type == "cuda":
            peaks = {n: memory.cuda_peak_bytes(config, device, n, backend) for n in names}
        else:
            progress(f"windows: ({config.name}) peak memory, one process per pipeline")
            peaks = memory.cpu_peak_bytes(config.name, names, quick, backend)
        reference = next(p for p in pipelines if p.name == "torch best").parameters()
        base = timings["torch best"].median
        for p in pipelines:
            t = timings[p.name]
            nbytes = bytes_per_parameter(config, p.name) * config.numel
            diff = max(((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
                       for a, b in zip(p.parameters(), reference))
            rows.append(dict(
                config=config.name, describe=config.describe, parameters=config.numel,
                tensors=len(config.shapes), dtype=str(config.dtype).replace("torch.", ""),
                k=config.k, pipeline=p.name, time_s=t.median, time_p10_s=t.p10, time_p90_s=t.p90,
                time_vs_torch_best=t.median / base,
                bytes_per_parameter=bytes_per_parameter(config, p.name), bytes=nbytes,
                gb_per_s=nbytes / t.median / 1e9, fraction_of_copy=nbytes / t.median / copy_bw,
                peak_memory_bytes=peaks[p.name],
                peak_memory_vs_torch_best=peaks[p.name] / max(peaks["torch best"], 1),
                max_rel_diff_vs_torch_best=diff))
        del pipelines
    return rows
