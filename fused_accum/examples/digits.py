"""The article's case: an image model trained one image at a time, with gradient accumulation.

Handwritten digits (8x8 images that scikit-learn ships: nothing is downloaded), a small CNN, Adam
and cross-entropy.  Each way of training sees the same images in the same order, and the loss
on held-out images is measured after every few optimizer steps:

- ``large batch``: 32 images per step, the reference;
- ``fused_accum``: 1 image per micro-batch, ``accumulation_steps=32``, and ``flush()`` for the
  epoch's short last window (1500 images: 46 windows of 32 and one of 28);
- ``article's loop``: 1 image per micro-batch, ``(loss / 32).backward()`` and a step when
  ``i % 32 == 0`` (``i`` counting each epoch's images from 0): it steps after an epoch's first
  image, every later window is shifted by one, and the short window at the epoch's end is divided
  by 32 too and runs on into the next epoch's first step;
- ``loss / 32 in the short window``: right but for one thing: the short window's 28 images are
  divided by 32 too, so that window's gradient is 28/32 of its mean;
- ``clip each micro-batch``: right but for one thing: ``clip_grad_norm_`` after every
  ``backward()``, on a partial sum; the others clip each window's mean gradient
  (``max_grad_norm=1``).

With ``norm="batch"`` the model has BatchNorm instead of GroupNorm.  BatchNorm normalises by the
statistics of what it is given: one image is not 32, so a batch-1 micro-batch trains another
model than the large batch, with or without fused_accum.  Use GroupNorm or LayerNorm with small
micro-batches (what ``norm="group"`` shows).

Run it: ``python -m fused_accum.examples.digits [--quick]``, or in a clone of the
repository ``python examples/digits.py [--quick]``.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import fused_accum
from fused_accum import examples

K = 32            # images per optimizer step
LR = 2e-3
MAX_GRAD_NORM = 1.0
TRAIN = 1500      # the other 297 images are held out


def make_model(norm: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    normalize = (lambda c: nn.GroupNorm(4, c)) if norm == "group" else nn.BatchNorm2d
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), normalize(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False), normalize(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def load() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    return images[:TRAIN], labels[:TRAIN], images[TRAIN:], labels[TRAIN:]


# Each method trains on ``epochs`` (a list of (images, labels), shuffled) and yields after every
# optimizer step.

def large_batch(model, epochs):
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for images, labels in epochs:
        for start in range(0, len(images), K):
            loss = F.cross_entropy(model(images[start:start + K]), labels[start:start + K])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            opt.step()
            opt.zero_grad()
            yield


def with_fused_accum(model, epochs):
    opt = fused_accum.Adam(model.parameters(), lr=LR, accumulation_steps=K,
                           max_grad_norm=MAX_GRAD_NORM)
    for images, labels in epochs:
        for i in range(len(images)):
            opt.backward(F.cross_entropy(model(images[i:i + 1]), labels[i:i + 1]))
            opt.step()
            if opt.stepped:
                yield
        if opt.flush():   # the epoch's short last window, as the mean of its images
            yield


def by_hand(model, epochs, articles_count=False, short_window_by_k=False, clip_each=False):
    """1 image per micro-batch and a step every K images (the epoch's last window short), the loss
    divided by its window's size and the window's sum clipped before the step: the large batch's
    update, written by hand.  Each flag is one way to get it wrong: ``articles_count``, the
    article's loop (``loss / K``, a step when ``i % K == 0``); ``short_window_by_k``, ``loss / K``
    in the short window too; ``clip_each``, clipping after every backward() instead."""
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for images, labels in epochs:
        n = len(images)
        for i in range(n):
            window = min(K, n - i // K * K)   # images in the window of image i
            divisor = K if articles_count or short_window_by_k else window
            loss = F.cross_entropy(model(images[i:i + 1]), labels[i:i + 1]) / divisor
            loss.backward()
            if clip_each:
                torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            if articles_count:
                last = i % K == 0
            else:
                last = (i + 1) % K == 0 or i + 1 == n
            if last:
                if not clip_each:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                opt.step()
                opt.zero_grad()
                yield


def held_out_loss(model, images, labels) -> float:
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(model(images), labels).item()
    model.train()
    return loss


def train(method, norm: str, epochs: int, every: int, steps: int | None = None) -> list[float]:
    """Held-out loss before training and after every ``every`` optimizer steps; ``steps``: stop
    after that many."""
    images, labels, test_images, test_labels = load()
    order = torch.Generator().manual_seed(1)
    shuffles = [torch.randperm(len(images), generator=order) for _ in range(epochs)]
    model = make_model(norm)
    curve = [held_out_loss(model, test_images, test_labels)]
    data = [(images[s], labels[s]) for s in shuffles]
    for step, _ in enumerate(method(model, data), start=1):
        if step % every == 0:
            curve.append(held_out_loss(model, test_images, test_labels))
        if step == steps:
            break
    return curve


METHODS = {"large batch": large_batch, "fused_accum": with_fused_accum,
           "article's loop": partial(by_hand, articles_count=True),
           "loss / 32 in the short window": partial(by_hand, short_window_by_k=True),
           "clip each micro-batch": partial(by_hand, clip_each=True)}


def run(quick: bool = False, steps: int | None = None) -> list[dict]:
    """The demo's tasks: GroupNorm with every method, BatchNorm with the large batch and fused_accum.
    ``steps``: that many optimizer steps instead of whole epochs (a smoke run)."""
    epochs, every = (2, 4) if quick else (4, 4)
    if steps:
        epochs, every = math.ceil(steps / math.ceil(TRAIN / K)), min(every, steps)
    tasks = [{"name": "digits CNN, GroupNorm, batch 1 x 32",
              "curves": {name: train(m, "group", epochs, every, steps)
                         for name, m in METHODS.items()}},
             {"name": "digits CNN, BatchNorm, batch 1 x 32",
              "curves": {name: train(METHODS[name], "batch", epochs, every, steps)
                         for name in ("large batch", "fused_accum")},
              "expect_gap": "BatchNorm's statistics of one image are not those of 32"}]
    for task in tasks:
        task["x_label"] = f"optimizer steps of {K} images"
        task["x_step"] = every
        task["y_label"] = "held-out cross-entropy"
    return tasks


def main(argv: list[str] | None = None) -> None:
    examples.main(run, __doc__, "two epochs instead of four", argv)


if __name__ == "__main__":
    main()
