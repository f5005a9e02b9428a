"""fused_accum inside the frameworks that drive accumulation windows themselves.

Each module imports its framework only when imported itself (they are optional extras):

- :mod:`fused_accum.integrations.transformers`: ``FusedAccumTrainer`` and ``FusedAccumMixin``;
- :mod:`fused_accum.integrations.lightning`: the ``FusedAccumulation`` callback;
- :mod:`fused_accum.integrations.accelerate`: ``follow(accelerator, optimizer)`` for
  ``accelerator.accumulate()`` loops.

In all of them the framework counts the micro-batches and calls ``step()`` once per window; the
fused optimizer then runs with ``accumulation_steps=1`` (a window counted twice is refused), is
told which backward pass ends each window, clips in its kernels in place of the framework, and
reports the real pre-clip norm.
"""

_FRAMEWORKS = ("transformers", "lightning", "accelerate")


def __getattr__(name: str):
    if name in _FRAMEWORKS:   # imported on first use: each imports its framework
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fused_accum.integrations' has no attribute {name!r}")
