"""Per-element formulas in float64, written from docs/design.md#the-op-set and torch.optim's
documentation independently of any backend: what every backend's ops are checked against."""
from __future__ import annotations


import torch

f64 = torch.float64

LARGE = 2**20 + 5
SIZES = [1, 3, 4097, LARGE]


def size_for(backend: str, size: int) -> int:
    """The test size for ``backend``.  Triton's interpreter runs every program in numpy, so its
    large case is a few full chunks and a tail, the same kernel paths at a size it runs quickly."""
    return 3 * 4096 + 5 if backend == "triton" and size == LARGE else size


def accumulate(acc0, grad, first, weight):
    base = torch.zeros_like(acc0, dtype=f64) if first else acc0.to(f64)
    return base + weight * grad.to(f64)


def sgd(p, acc, buf, step, *, lr, momentum, dampening, weight_decay, nesterov, maximize, grad_scale):
    g = acc.to(f64) * grad_scale
    g = -g if maximize else g
    p = p.to(f64)
    if weight_decay != 0:   # as torch.optim: no 0 * p, which is NaN for an infinite parameter
        g = g + weight_decay * p
    new_buf = None
    if momentum != 0:
        new_buf = g.clone() if step == 0 else momentum * buf.to(f64) + (1 - dampening) * g
        g = g + momentum * new_buf if nesterov else new_buf
    return p - lr * g, new_buf


def adam(p, acc, m, v, vmax, step, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
         decoupled_weight_decay, grad_scale):
    g = acc.to(f64) * grad_scale
    g = -g if maximize else g
    p = p.to(f64)
    t = step + 1
    if decoupled_weight_decay:
        p = p * (1 - lr * weight_decay)
    elif weight_decay != 0:
        g = g + weight_decay * p
    m = beta1 * m.to(f64) + (1 - beta1) * g
    v = beta2 * v.to(f64) + (1 - beta2) * g * g
    vmax = torch.maximum(vmax.to(f64), v) if amsgrad else None
    second = vmax if amsgrad else v
    denom = (second / (1 - beta2 ** t)).sqrt() + eps
    p = p - lr / (1 - beta1 ** t) * m / denom
    return p, m, v, vmax


def rel_err(actual, expected) -> float:
    expected = expected.to(f64)
    scale = expected.abs().max().item()
    return (actual.to(f64) - expected).abs().max().item() / (scale if scale > 0 else 1.0)


