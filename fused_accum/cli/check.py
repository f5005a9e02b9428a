"""``python -m fused_accum check``: the same training run two ways.

A small transformer-style model is trained for a few windows (a) with k micro-batches through
fused_accum and (b) with one batch k times as large through the torch optimizer of the same name.
The largest relative parameter difference is printed; the exit status is 1 when it exceeds the
tolerance.

Under torchrun (``torchrun --nproc_per_node=2 -m fused_accum check``) every rank runs its share
of each window's micro-batches with ``process_group=True``, and the result is compared with one
process training on the whole distributed batch (gloo on CPU, NCCL with ``--device cuda``).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os

import torch
import torch.nn.functional as F
from torch import nn

from .. import Adam, AdamW, SGD

OPTIMIZERS = {
    "adamw": (AdamW, torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1)),
    "adam": (Adam, torch.optim.Adam, dict(lr=1e-3)),
    "sgd": (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
}


class Block(nn.Module):
    """Embedding, one attention layer, an MLP and LayerNorms: a miniature language model."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        # No attention biases: the key bias has an identically zero gradient (softmax ignores a
        # constant added to every key), and Adam turns its rounding noise into +-lr steps that
        # differ between any two batch splittings, plain PyTorch's included.
        self.attn = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.out(h)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw",
                        help="the optimizer, fused_accum's and torch.optim's of the same name")
    parser.add_argument("--accumulation-steps", type=int, default=4,
                        help="micro-batches per optimizer step (k): the large batch is k "
                             "micro-batches")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--windows", type=int, default=5,
                        help="optimizer steps to take, one per accumulation window")
    parser.add_argument("--max-grad-norm", type=float, default=1.0,
                        help="clip the gradients to this total norm before each step, in both "
                             "runs")
    parser.add_argument("--device", default="cpu",
                        help="where to train: cpu or cuda; under torchrun with cuda, each rank "
                             "uses GPU LOCAL_RANK")
    parser.add_argument("--backend", default="auto",
                        help="fused_accum's kernels: auto, extension, triton or reference; "
                             "python -m fused_accum info says which run here")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest relative difference allowed (default: 1e-5, or 1.5x that "
                             "of plain PyTorch accumulating the same micro-batches if larger)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the model's initial weights and of the random data")


_FLOOR_MARGIN = 1.5


def _train_torch(model, data, torch_cls, hyper, pieces: int, max_grad_norm: float, loss_of) -> None:
    """torch.optim on ``model``, each window's batch as ``pieces`` micro-batches whose mean
    losses' gradients are summed in .grad, then clipped and stepped."""
    opt = torch_cls(model.parameters(), **hyper)
    for x, y in data:
        for xm, ym in zip(x.chunk(pieces), y.chunk(pieces)):
            (loss_of(model, xm, ym) / pieces).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        opt.zero_grad()


def _largest_difference(model, reference) -> tuple[float, str]:
    worst, where = 0.0, ""
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        err = ((p.double() - q.double()).abs().max() / q.double().abs().max()).item()
        if err >= worst:
            worst, where = err, name
    return worst, where


def _distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(world size, rank, device) under torchrun; (1, 0, device) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 1, 0, device
    import torch.distributed as dist
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=60))
    return world, dist.get_rank(), device


def run(args: argparse.Namespace) -> int:
    world, rank, device = _distributed(torch.device(args.device))
    if world == 1:
        return _run(args, world, rank, device)
    import torch.distributed as dist
    try:
        status = _run(args, world, rank, device)
        dist.barrier()   # no rank tears down while another still talks to it (gloo aborts)
        return status
    finally:
        dist.destroy_process_group()


def _run(args: argparse.Namespace, world: int, rank: int, device: torch.device) -> int:
    fused_cls, torch_cls, hyper = OPTIMIZERS[args.optimizer]
    torch.manual_seed(args.seed)       # the same model and data on every rank
    model = Block().to(device)
    reference = copy.deepcopy(model)
    k, b, seq, vocab = args.accumulation_steps, args.micro_batch, 12, 64
    data = [(torch.randint(0, vocab, (world * k * b, seq), device=device),
             torch.randint(0, vocab, (world * k * b, seq), device=device))
            for _ in range(args.windows)]
    loss_of = lambda m, x, y: F.cross_entropy(m(x).reshape(-1, vocab), y.reshape(-1))

    opt = fused_cls(model.parameters(), accumulation_steps=k, max_grad_norm=args.max_grad_norm,
                    backend=args.backend, process_group=True if world > 1 else None, **hyper)
    for x, y in data:
        mine = zip(x.chunk(world)[rank].chunk(k), y.chunk(world)[rank].chunk(k))
        for xm, ym in mine:
            loss_of(model, xm, ym).backward()
            opt.step()
            opt.zero_grad()

    split = copy.deepcopy(reference)
    _train_torch(reference, data, torch_cls, hyper, 1, args.max_grad_norm, loss_of)
    _train_torch(split, data, torch_cls, hyper, world * k, args.max_grad_norm, loss_of)
    worst, where = _largest_difference(model, reference)
    floor, _ = _largest_difference(split, reference)
    backend = opt._buffers.buckets[0].backend.name
    # By default also passing: no further from the large batch than plain PyTorch's own
    # accumulation of the same micro-batches (Adam turns rounding noise in near-zero gradient
    # elements into visible differences between any two splittings of a batch).
    tolerance = args.tolerance if args.tolerance is not None else max(1e-5, _FLOOR_MARGIN * floor)
    ok = worst <= tolerance
    if rank == 0:
        ranks = f" on each of {world} ranks" if world > 1 else ""
        print(f"{args.optimizer}: {args.windows} windows of {k} micro-batches x {b} sequences"
              f"{ranks} on {device} (backend {backend}) vs one batch of {world * k * b} through "
              "torch.optim")
        print(f"largest relative parameter difference: {worst:.3e} ({where}); "
              f"tolerance {tolerance:.3g}")
        print(f"plain PyTorch accumulating the same {world * k} micro-batches: {floor:.3e}")
        print("OK" if ok else "FAILED")
    return 0 if ok else 1
