"""Hugging Face Trainer with ``FusedAccumTrainer``: one changed line.

The code is in ``fused_accum/examples/hf_trainer.py``, inside the package, so that
``python -m fused_accum demo`` runs it from an installed fused_accum too; this script runs it
from a clone of the repository: ``python examples/hf_trainer.py [--quick]`` (the same as
``python -m fused_accum.examples.hf_trainer [--quick]``).
"""
from fused_accum.examples.hf_trainer import main

if __name__ == "__main__":
    main()
