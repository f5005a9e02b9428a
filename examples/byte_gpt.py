"""A small GPT in bf16, trained on sequences of uneven length with gradient accumulation.

The code is in ``fused_accum/examples/byte_gpt.py``, inside the package, so that
``python -m fused_accum demo`` runs it from an installed fused_accum too; this script runs it
from a clone of the repository: ``python examples/byte_gpt.py [--quick]`` (the same as
``python -m fused_accum.examples.byte_gpt [--quick]``).
"""
from fused_accum.examples.byte_gpt import main

if __name__ == "__main__":
    main()
