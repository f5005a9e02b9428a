"""The article's case: an image model trained one image at a time, with gradient accumulation.

The code is in ``fused_accum/examples/digits.py``, inside the package, so that
``python -m fused_accum demo`` runs it from an installed fused_accum too; this script runs it
from a clone of the repository: ``python examples/digits.py [--quick]`` (the same as
``python -m fused_accum.examples.digits [--quick]``).
"""
from fused_accum.examples.digits import main

if __name__ == "__main__":
    main()
