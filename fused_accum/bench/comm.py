"""Data parallel: bytes communicated per accumulation window, fused_accum against DDP.

Two ranks (gloo on CPU, NCCL on GPUs) train the same model for a few windows of k micro-batches
in five pipelines: fused_accum on its own (it averages each window over the ranks, with one
reduction of the fp32 buffers per window), the same with ``shard_state=True`` (a reduce-scatter
of the fp32 buffers and an all-gather of the parameters per window), fused_accum on a DDP-wrapped
model (the one-line change in a DDP script: the optimizer switches DDP's reduction off), DDP
reducing in every micro-batch, and DDP under ``no_sync()`` for all but the last micro-batch.
Every collective's payload is counted where it is issued, by wrappers around
``torch.distributed.all_reduce`` (DDP reduces through it with its ``allreduce_hook``, documented as
equivalent to its built-in reduction) and the sharded path's reduce-scatter (its input) and
all-gather (its output), so the bytes are measured, not computed; the time per window is the
median over the timed windows (the pipelines run one after another, not interleaved, so the
time ratio's spread, p10-p90, is over every pair of their windows), and the optimizer state each
rank holds comes from
``memory_bytes()``.  The fp32 buffers are reduced in chunks of ``CHUNK_MB``, so that the model
has several: each fused row says how many chunks' reductions started during the last backward
pass, and the sharded row how many all-gathers had completed while later chunks were stepped
(the overlap, observed rather than assumed).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

PIPELINES = ("fused_accum", "fused_accum sharded", "DDP + fused_accum", "DDP", "DDP no_sync")
CHUNK_MB = 4.0


def _model(dtype: torch.dtype, width: int, depth: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


class _Counter:
    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0

    def add(self, tensor: torch.Tensor) -> None:
        self.bytes += tensor.numel() * tensor.element_size()
        self.calls += 1


@contextlib.contextmanager
def _counting_collectives(counter: _Counter):
    """Counts all-reduces (their buffer), the sharded path's reduce-scatters (their input) and
    all-gathers (their output)."""
    from ..distributed import sharded
    wrapped = [(dist, "all_reduce", 0), (sharded, "_REDUCE_SCATTER", 1), (sharded, "_ALL_GATHER", 0)]
    originals = [getattr(owner, name) for owner, name, _ in wrapped]

    def counting(original, counted):
        def collective(*args, **kwargs):
            counter.add(args[counted])
            return original(*args, **kwargs)
        return collective

    for (owner, name, counted), original in zip(wrapped, originals):
        setattr(owner, name, counting(original, counted))
    try:
        yield
    finally:
        for (owner, name, _), original in zip(wrapped, originals):
            setattr(owner, name, original)


def _worker(rank: int, pipeline: str, cfg: dict, init_file: str, out: dict) -> None:
    import fused_accum
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))   # two ranks share the cores
    os.environ["FUSED_ACCUM_REDUCE_CHUNK_MB"] = str(CHUNK_MB)
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        dtype = getattr(torch, cfg["dtype"])
        model = _model(dtype, cfg["width"], cfg["depth"], device)
        counter = _Counter()
        k = cfg["k"]
        fused = "fused_accum" in pipeline
        net = model
        if pipeline.startswith("DDP"):
            net = DDP(model, device_ids=[rank] if device.type == "cuda" else None)
            # DDP's documented equivalent of its built-in reduction, through dist.all_reduce
            net.register_comm_hook(None, allreduce_hook)
        if fused:   # the default process_group ("auto") averages windows over both ranks
            opt = fused_accum.AdamW(net.parameters(), lr=1e-4, accumulation_steps=k,
                                    shard_state=pipeline.endswith("sharded"))
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        gen = torch.Generator(device="cpu").manual_seed(100 + rank)
        batches = [torch.randn(cfg["batch"], cfg["width"], generator=gen).to(device, dtype)
                   for _ in range(k)]
        times, window_bytes, window_calls = [], [], []
        with _counting_collectives(counter):
            for window in range(cfg["windows"] + 1):     # the first window warms up
                before_bytes, before_calls = counter.bytes, counter.calls
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dist.barrier()
                t0 = time.perf_counter()
                for m, x in enumerate(batches):
                    last = m == k - 1
                    sync = contextlib.nullcontext() if (pipeline != "DDP no_sync" or last) \
                        else net.no_sync()
                    with sync:
                        loss = net(x).float().square().mean()
                        loss.backward()
                    if fused:
                        opt.step()
                if not fused:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - t0
                if window > 0:
                    times.append(elapsed)
                    window_bytes.append(counter.bytes - before_bytes)
                    window_calls.append(counter.calls - before_calls)
        if rank == 0:
            params = sum(p.numel() for p in model.parameters())
            state = sum(v for name, v in opt.memory_bytes().items()
                        if name not in ("accumulators", "parameters", "step")) if fused else \
                sum(t.nbytes for s in opt.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor) and t.dim() > 0)
            overlap = {}
            if fused:
                reducer = opt._reducer
                windows = cfg["windows"] + 1
                overlap = dict(chunks=len(reducer.chunks),
                               reduced_during_backward=reducer.launched_during_backward / windows)
                if pipeline.endswith("sharded"):
                    overlap["gathered_during_step"] = reducer.gathered_during_step / windows
            out[pipeline] = dict(bytes=statistics.median(window_bytes), state_bytes=state, **overlap,
                                 calls=statistics.median(window_calls),
                                 time_s=statistics.median(times), times=times,
                                 parameters=params)
        # Both ranks done before either leaves.  Then leave without tearing gloo down: its
        # threads, destroyed while the peer's connection closes, abort the process now and then
        # ("terminate called without an active exception"), with the results already sent.
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_pipeline(pipeline: str, cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        out = manager.dict()
        mp.spawn(_worker, args=(pipeline, cfg, os.path.join(tmp, "init"), out), nprocs=2)
        return dict(out)[pipeline]


def run(device: torch.device, quick: bool, k: int = 8) -> list[dict]:
    """One row per (model dtype, pipeline): bytes and collectives per window per rank."""
    from .harness import percentile, progress
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        progress("comm: skipped, needs two GPUs (or run on CPU: gloo)")
        return []
    rows = []
    width, depth = (256, 2) if quick else (1024, 4)
    for dtype in ("bfloat16", "float32"):
        cfg = dict(device=str(device), dtype=dtype, width=width, depth=depth, k=k, batch=16,
                   windows=2 if quick else 5)
        results = {}
        for pipeline in PIPELINES:
            progress(f"comm: {pipeline}, {dtype} model, k={k}, 2 ranks")
            results[pipeline] = _run_pipeline(pipeline, cfg)
        ours = results["fused_accum"]
        for pipeline, r in results.items():
            accumulates_in = "float32" if "fused_accum" in pipeline else dtype
            rows.append(dict(model_dtype=dtype, pipeline=pipeline, k=k, ranks=2,
                             accumulates_in=accumulates_in,
                             parameters=r["parameters"], bytes_per_window=r["bytes"],
                             bytes_per_parameter=r["bytes"] / r["parameters"],
                             collectives_per_window=r["calls"], time_s=r["time_s"],
                             state_bytes_per_parameter=r["state_bytes"] / r["parameters"],
                             **{key: r[key] for key in ("chunks", "reduced_during_backward",
                                                        "gathered_during_step") if key in r},
                             bytes_vs_fused_accum=r["bytes"] / ours["bytes"],
                             time_vs_fused_accum=r["time_s"] / ours["time_s"],
                             **_pairs_spread("time_vs_fused_accum", r["times"], ours["times"],
                                             pipeline == "fused_accum", percentile)))
    return rows


def _pairs_spread(key: str, times: list[float], base: list[float], is_base: bool, percentile) -> dict:
    """p10-p90 of the ratio over every pair of windows (not interleaved: no pairing is fairer),
    and whether it includes 1.0."""
    if is_base:
        return {f"{key}_p10": 1.0, f"{key}_p90": 1.0, f"{key}_within_noise": None}
    ratios = [a / b for a in times for b in base]
    lo, hi = percentile(ratios, 0.1), percentile(ratios, 0.9)
    return {f"{key}_p10": lo, f"{key}_p90": hi, f"{key}_within_noise": lo <= 1.0 <= hi}
