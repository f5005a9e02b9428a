"""Real models on real data, trained several ways: what ``python -m fused_accum demo`` runs.

Each example module trains one model several ways on the same data (``large batch``,
``fused_accum`` and the hand-written loops that go wrong) and its ``run(quick)`` returns tasks:
``{"name", "curves": {way: held-out losses}, "x_label", "x_step", "y_label"}``, with
``"expect_gap"`` where fused_accum is expected to differ from the large batch.  The examples live
in the package so that the demo runs from an installed fused_accum; ``examples/*.py`` in a clone
of the repository run them as scripts, as does ``python -m fused_accum.examples.<name>``.

Importing this package imports neither scikit-learn nor transformers: each example imports what
it needs itself.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

# module, what it needs beyond torch (scikit-learn, transformers), in the order the demo runs them
EXAMPLES = [("digits", "scikit-learn"), ("byte_gpt", None), ("hf_trainer", "transformers")]


def largest_gap(curve: list[float], reference: list[float]) -> float:
    """The largest relative difference between two curves, point by point."""
    if len(curve) != len(reference):
        raise ValueError(f"curves of {len(curve)} and {len(reference)} points: measured at "
                         "different steps")
    return max(abs(a - b) / abs(b) for a, b in zip(curve, reference))


def summarize(task: dict) -> None:
    """Add each curve's largest gap to the large batch's to ``task``, and print the task (what the
    demo prints, and each example run as a script)."""
    reference = task["curves"]["large batch"]
    task["largest_gap"] = {name: largest_gap(curve, reference)
                           for name, curve in task["curves"].items() if curve is not reference}
    report(task)


def report(task: dict) -> None:
    print(f"  {task['name']}")
    for name, curve in task["curves"].items():
        gap = task["largest_gap"].get(name)
        against = "" if gap is None else f"   largest gap to the large batch {gap:8.3%}"
        print(f"  {name:>30}: final {task['y_label']} {curve[-1]:.4f}{against}")
    if "expect_gap" in task:
        print(f"  (a gap is expected here: {task['expect_gap']})")


def main(run: Callable[[bool], list[dict]], doc: str, quick_help: str,
         argv: list[str] | None = None) -> None:
    """An example as a script: ``[--quick]``, then each task's final losses and gaps."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    for task in run(parser.parse_args(argv).quick):
        summarize(task)
