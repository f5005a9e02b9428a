"""A small GPT in bf16, trained on sequences of uneven length with gradient accumulation.

The text is the Python standard library's own source, read as bytes (nothing is downloaded).
Every optimizer step sees one window of 16 sequences of 8 to 64 bytes; each way of training sees
the same windows, and the loss per byte on held-out text is measured after every few steps:

- ``large batch``: the window's 16 sequences as one padded batch, the loss a mean over all its
  bytes, and ``torch.optim.AdamW`` on fp32 master copies of the weights: the reference;
- ``fused_accum``: 8 micro-batches of 2 sequences, ``opt.backward(loss, num_items=bytes)`` and
  ``accumulation_steps=8``: the mean over all the window's bytes, summed in fp32;
- ``mean of means``: the same without ``num_items``: the mean of the 8 micro-batches' means,
  which weighs a byte of a short micro-batch more than one of a long micro-batch;
- ``bf16 sums, fp32 masters``: the right mean, summed in bf16 in ``.grad`` (what a bf16 model's
  ``backward()`` does), then the reference's step: the cost of bf16 accumulation alone;
- ``plain bf16 loop``: what ``model.to(torch.bfloat16)`` and a hand-written loop give:
  ``(loss / 8).backward()`` (a mean of means, summed in bf16 in ``.grad``) and
  ``torch.optim.AdamW`` on the bf16 weights, whose small updates round away.

Run it: ``python -m fused_accum.examples.byte_gpt [--quick]``, or in a clone of the
repository ``python examples/byte_gpt.py [--quick]``.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

import fused_accum
from fused_accum import examples

K = 8                    # micro-batches per window
SEQUENCES = 2            # sequences per micro-batch
SHORTEST, LONGEST = 8, 64
LR = 1e-3
IGNORE = -100
SOURCES = ["argparse.py", "textwrap.py", "dataclasses.py", "typing.py", "inspect.py"]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        # no attention biases: the key bias's gradient is zero (softmax ignores a shift of every
        # key), and Adam turns the rounding noise of a zero into full-size steps
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.position = nn.Embedding(LONGEST, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1]))
        return self.head(self.norm(self.blocks(x)))


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyGPT().to(torch.bfloat16)


def corpus() -> torch.Tensor:
    folder = os.path.dirname(os.__file__)
    text = b"".join(open(os.path.join(folder, name), "rb").read() for name in SOURCES)
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def batch(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets, padded to the longest (targets padded with IGNORE)."""
    width = max(len(s) for s in sequences) - 1
    inputs = torch.zeros(len(sequences), width, dtype=torch.long)
    targets = torch.full((len(sequences), width), IGNORE)
    for row, s in enumerate(sequences):
        inputs[row, :len(s) - 1], targets[row, :len(s) - 1] = s[:-1], s[1:]
    return inputs, targets


def windows(text: torch.Tensor, count: int, seed: int) -> list[list[torch.Tensor]]:
    """``count`` windows of K * SEQUENCES sequences of uneven length from ``text``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        lengths = torch.randint(SHORTEST, LONGEST + 1, (K * SEQUENCES,), generator=g).tolist()
        starts = torch.randint(0, len(text) - LONGEST - 1, (K * SEQUENCES,), generator=g).tolist()
        out.append([text[s:s + n + 1] for s, n in zip(starts, lengths)])
    return out


def loss_of(model, inputs, targets):
    """Mean loss per byte (the padding ignored), in fp32."""
    return F.cross_entropy(model(inputs).float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def micro_batches(window):
    return [batch(window[i:i + SEQUENCES]) for i in range(0, len(window), SEQUENCES)]


# Each method trains on ``data`` (a list of windows) and yields after every optimizer step.

class MasterAdamW:
    """torch's AdamW on fp32 master copies of bf16 weights: ``step()`` moves the bf16 gradients
    to the masters, steps them and copies them back into the weights."""

    def __init__(self, model):
        self.params = list(model.parameters())
        self.masters = [p.detach().float() for p in self.params]
        self.opt = torch.optim.AdamW(self.masters, lr=LR, weight_decay=0.1)

    def step(self):
        for p, master in zip(self.params, self.masters):
            master.grad, p.grad = p.grad.float(), None
        self.opt.step()
        with torch.no_grad():
            for p, master in zip(self.params, self.masters):
                p.copy_(master)


def large_batch(model, data):
    opt = MasterAdamW(model)
    for window in data:
        loss_of(model, *batch(window)).backward()
        opt.step()
        yield


def bf16_sums(model, data):
    """Each micro-batch weighted by its share of the window's bytes (the right mean), the sum
    in bf16 in ``.grad``, then the masters' step."""
    opt = MasterAdamW(model)
    for window in data:
        parts = micro_batches(window)
        total = sum((targets != IGNORE).sum() for _, targets in parts)
        for inputs, targets in parts:
            (loss_of(model, inputs, targets) * ((targets != IGNORE).sum() / total)).backward()
        opt.step()
        yield


def with_fused_accum(model, data, weigh_by_bytes=True):
    opt = fused_accum.AdamW(model.parameters(), lr=LR, weight_decay=0.1, accumulation_steps=K)
    for window in data:
        for inputs, targets in micro_batches(window):
            loss = loss_of(model, inputs, targets)
            if weigh_by_bytes:
                opt.backward(loss, num_items=(targets != IGNORE).sum())
            else:
                opt.backward(loss)
            opt.step()
        yield


def plain_bf16_loop(model, data):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    for window in data:
        for inputs, targets in micro_batches(window):
            (loss_of(model, inputs, targets) / K).backward()
        opt.step()
        opt.zero_grad()
        yield


def held_out_loss(model, held_out) -> float:
    with torch.no_grad():
        inputs, targets = batch(held_out)
        return loss_of(model, inputs, targets).item()


def train(method, steps: int, every: int) -> list[float]:
    """Held-out loss per byte before training and after every ``every`` optimizer steps."""
    text = corpus()
    split = int(len(text) * 0.9)
    data = windows(text[:split], steps, seed=1)
    held_out = [s for w in windows(text[split:], 4, seed=2) for s in w]
    model = make_model()
    curve = [held_out_loss(model, held_out)]
    for step, _ in enumerate(method(model, data), start=1):
        if step % every == 0:
            curve.append(held_out_loss(model, held_out))
    return curve


METHODS = {"large batch": large_batch, "fused_accum": with_fused_accum,
           "mean of means": lambda model, data: with_fused_accum(model, data, weigh_by_bytes=False),
           "bf16 sums, fp32 masters": bf16_sums,
           "plain bf16 loop": plain_bf16_loop}


def run(quick: bool = False, steps: int | None = None) -> list[dict]:
    """The demo's task; ``steps``: that many optimizer steps instead (a smoke run)."""
    count, every = (100, 10) if quick else (300, 10)
    if steps:
        count, every = steps, min(every, steps)
    return [{"name": f"byte-level GPT in bf16, {K} x {SEQUENCES} sequences of "
                     f"{SHORTEST}-{LONGEST} bytes",
             "curves": {name: train(method, count, every) for name, method in METHODS.items()},
             "x_label": f"optimizer steps of {K * SEQUENCES} sequences", "x_step": every,
             "y_label": "held-out loss per byte"}]


def main(argv: list[str] | None = None) -> None:
    examples.main(run, __doc__, "100 steps instead of 300", argv)


if __name__ == "__main__":
    main()
