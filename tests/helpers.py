"""Small real models, fresh random data, and the two training loops every equivalence test compares:
k micro-batches through fused_accum, and one batch k times as large through torch.optim."""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
import torch.nn.functional as F

VOCAB, DIM, HIDDEN, SEQ = 37, 16, 24, 5
IGNORE = -100


class TinyLM(nn.Module):
    """Embedding, LayerNorm and an MLP: the parameter kinds of a real language model."""

    def __init__(self, tie: bool = False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        return self.head(h)


def make_model(seed: int, dtype: torch.dtype = torch.float32, tie: bool = False) -> TinyLM:
    torch.manual_seed(seed)
    model = TinyLM(tie=tie)
    with torch.no_grad():   # non-trivial LayerNorm parameters, not ones and zeros
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    return model.to(dtype)


def lm_loss(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the non-ignored targets."""
    logits = model(tokens)
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1),
                           ignore_index=IGNORE)


def make_batches(seed: int, n: int, batch: int, pad_fraction: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n micro-batches of ``batch`` sequences; with pad_fraction, targets are randomly ignored."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
        targets = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
        if pad_fraction:
            targets[torch.rand(batch, SEQ, generator=g) < pad_fraction] = IGNORE
        out.append((tokens, targets))
    return out


def concat(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([t for t, _ in batches]), torch.cat([y for _, y in batches])


def train_large_batch(model: nn.Module, make_opt: Callable, windows: list[list], *,
                      max_grad_norm: float | None = None) -> nn.Module:
    opt = make_opt(model.parameters())
    for window in windows:
        loss = lm_loss(model, *concat(window))
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def train_accumulated(model: nn.Module, opt, windows: list[list], *, num_items: bool = False):
    for window in windows:
        for i, (tokens, targets) in enumerate(window):
            loss = lm_loss(model, tokens, targets)
            if num_items:
                opt.backward(loss, num_items=(targets != IGNORE).sum())
            else:
                loss.backward()
            opt.step()
            opt.zero_grad()
            assert opt.stepped == (i == len(window) - 1)
    return model


def max_rel_error(actual: nn.Module, expected: nn.Module) -> float:
    """Largest |a - e| / max|e| over the parameters, each tensor relative to its own scale."""
    worst = 0.0
    for (_, a), (_, e) in zip(actual.named_parameters(), expected.named_parameters()):
        a, e = a.detach().double(), e.detach().double()
        worst = max(worst, ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item())
    return worst


def assert_same_params(actual: nn.Module, expected: nn.Module, rtol: float = 1e-5) -> None:
    """Every element within rtol of the expected tensor's scale, and the models really moved."""
    for (name, a), (_, e) in zip(actual.named_parameters(), expected.named_parameters()):
        assert a.dtype == e.dtype, name
        scale = e.detach().abs().max().item()
        torch.testing.assert_close(a.detach(), e.detach(), rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def write_some_elements(param: torch.Tensor, seed: int, fraction: float = 0.3) -> torch.Tensor:
    """Writes new values into a random ``fraction`` of a contiguous bf16 or fp16 tensor (on any
    device), as load_state_dict or clamp_ would between two steps, each with other bits than the
    element held (a write of the same bits is no write).  Returns the mask of the elements
    written, on the tensor's device: the first always, the last never (when there are two)."""
    g = torch.Generator().manual_seed(seed)
    held = param.detach().cpu()
    written = torch.rand(held.shape, generator=g) < fraction
    written.view(-1)[0] = True
    if held.numel() > 1:
        written.view(-1)[-1] = False
    new = (torch.randn(held.shape, generator=g) * 2).to(held.dtype)
    new_bits = new.view(torch.int16)
    new_bits[new_bits == held.view(torch.int16)] ^= 1   # one ulp away where they coincide
    param.copy_(torch.where(written, new, held))
    return written.to(param.device)


def write_compact_parameters(param: torch.Tensor, remainder: torch.Tensor, seed: int):
    """Writes into a contiguous bf16 CPU parameter with compact remainders (fp32 master = bits
    (param << 16) + remainder) what load_state_dict or an initialiser would between two steps:
    new values on some elements (``write_some_elements``), and on others the values whose stale
    remainders make no master a step can write: +0 and -0 over negative remainders (their
    masters were NaN bit patterns), +inf and -inf over positive ones (NaN too).  The last element
    is never written.  Returns (mask of the elements written, mask of those whose remainders a
    step must drop, their master being the written value)."""
    written = write_some_elements(param, seed)
    index = torch.arange(param.numel()).view(param.shape)
    free = ~written
    free.view(-1)[-1] = False
    specials = [(1, -1, 0.0), (2, -1, -0.0), (3, 1, float("inf")), (4, 1, -float("inf"))]
    dropped = torch.zeros_like(written)
    for slot, sign, value in specials:
        at = free & (index % 7 == slot) & (remainder.sign() == sign)
        param.masked_fill_(at, value)
        dropped |= at
    return written | dropped, dropped


def every_compact_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """(bf16 parameter, int16 remainder): every bf16 bit pattern, each with the remainders at the
    ends of the range and around zero."""
    remainders = torch.tensor([-2**15, -2**15 + 1, -1, 0, 1, 2**15 - 1], dtype=torch.int32)
    high = torch.arange(-2**15, 2**15, dtype=torch.int32)
    param = high.repeat_interleave(len(remainders)).to(torch.int16).view(torch.bfloat16)
    return param, remainders.repeat(len(high)).to(torch.int16)


class InjectedFailure(RuntimeError):
    pass


class FailsInBackward(torch.autograd.Function):
    """Identity forward; its backward raises, to fail a backward pass where it is placed
    (autograd runs the nodes built later first: one built before the loss's graph runs last)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise InjectedFailure("this backward pass fails here")


def leave_rank(result: dict, path) -> None:
    """The end of a rank a test spawned: save its outcome for the parent, wait for the peer unless
    this rank failed, and leave without tearing gloo down: a group broken by a failed peer cannot
    be, and gloo's threads destroyed at teardown abort a process now and then ("terminate called
    without an active exception"), with the result already saved."""
    import os
    import torch.distributed as dist
    torch.save(result, path)
    if dist.is_initialized():
        if "error" not in result:
            dist.barrier()   # neither rank leaves while the other still uses the group
        os._exit(0)
