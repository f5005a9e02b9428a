"""fused_accum: gradient accumulation in fp32 buffers, fused with the optimizer step.

Replace ``torch.optim.AdamW(...)`` by ``fused_accum.AdamW(..., accumulation_steps=k)`` and keep
``loss.backward(); opt.step(); opt.zero_grad()``: every k-th ``step()`` applies exactly the update
of one batch k times as large.
"""
from .optim import AccumulatingOptimizer, Adam, AdamW, FusedAccumulator, SGD
from .scaling import DynamicLossScale

__version__ = "0.1.0"
__all__ = ["SGD", "Adam", "AdamW", "FusedAccumulator", "AccumulatingOptimizer", "DynamicLossScale",
           "__version__"]


def __getattr__(name: str):
    # fused_accum.integrations.<framework> after a plain ``import fused_accum``; the integrations
    # import their frameworks, so they are loaded on first use only.
    if name == "integrations":
        import importlib
        return importlib.import_module(".integrations", __name__)
    raise AttributeError(f"module 'fused_accum' has no attribute {name!r}")
