"""Benchmarks of fused_accum against plain PyTorch: ``python -m fused_accum bench``."""
