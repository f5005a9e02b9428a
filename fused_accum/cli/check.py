"""``python -m fused_accum check``: the same training run two ways.

A small transformer-style model is trained for a few windows (a) with k micro-batches through
fused_accum and (b) with one batch k times as large through the torch optimizer of the same name.
The largest relative parameter difference is printed; the exit status is 1 when it exceeds the
tolerance.
"""
from __future__ import annotations

import argparse
import copy

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
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw")
    parser.add_argument("--accumulation-steps", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--windows", type=int, default=5, help="optimizer steps to take")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    fused_cls, torch_cls, hyper = OPTIMIZERS[args.optimizer]
    torch.manual_seed(args.seed)
    model = Block().to(device)
    reference = copy.deepcopy(model)
    k, b, seq, vocab = args.accumulation_steps, args.micro_batch, 12, 64
    data = [(torch.randint(0, vocab, (k * b, seq), device=device),
             torch.randint(0, vocab, (k * b, seq), device=device)) for _ in range(args.windows)]
    loss_of = lambda m, x, y: F.cross_entropy(m(x).reshape(-1, vocab), y.reshape(-1))

    opt = fused_cls(model.parameters(), accumulation_steps=k, max_grad_norm=args.max_grad_norm,
                    backend=args.backend, **hyper)
    for x, y in data:
        for xm, ym in zip(x.chunk(k), y.chunk(k)):
            loss_of(model, xm, ym).backward()
            opt.step()
            opt.zero_grad()

    ref_opt = torch_cls(reference.parameters(), **hyper)
    for x, y in data:
        loss_of(reference, x, y).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), args.max_grad_norm)
        ref_opt.step()
        ref_opt.zero_grad()

    worst, where = 0.0, ""
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        err = ((p.double() - q.double()).abs().max() / q.double().abs().max()).item()
        if err >= worst:
            worst, where = err, name
    backend = opt._buffers.buckets[0].backend.name
    print(f"{args.optimizer}: {args.windows} windows of {k} micro-batches x {b} sequences on "
          f"{device} (backend {backend}) vs one batch of {k * b} through torch.optim")
    print(f"largest relative parameter difference: {worst:.3e} ({where}); tolerance {args.tolerance:g}")
    ok = worst <= args.tolerance
    print("OK" if ok else "FAILED")
    return 0 if ok else 1
