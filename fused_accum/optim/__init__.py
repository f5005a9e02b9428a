from .accumulator import FusedAccumulator
from .adam import Adam, AdamW
from .base import AccumulatingOptimizer
from .sgd import SGD

__all__ = ["AccumulatingOptimizer", "SGD", "Adam", "AdamW", "FusedAccumulator"]
