"""``python -m fused_accum demo``: the examples (:mod:`fused_accum.examples`) trained on real data,
as curves.

Each example trains one model several ways on the same data (``large batch``, ``fused_accum``
and the hand-written loops that go wrong) and returns tasks of held-out loss curves.  The demo
prints each curve's final loss and its largest gap to the large batch, writes every curve to
``demo.json`` (``{"tasks": [{"name", "curves": {...}, ...}]}``) and plots one PNG per task from
that data, in ``--out`` (by default ``fused_accum_demo`` in the current directory).  Its exit
status is 1 when a fused_accum curve strays more than 1% from the large batch's at any point,
where they should agree.  The examples are part of the package: the demo runs from an installed
fused_accum as from a clone of the repository.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from .. import __version__, examples
from ..examples import largest_gap, summarize  # noqa: F401  (demo.largest_gap, as before)

SCRIPTS = examples.EXAMPLES   # module, what it needs beyond torch and matplotlib (the plots)
TOLERANCE = 0.01   # fused_accum against the large batch, relative, at every point


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least 1, not {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="short runs (97 s on 2 CPU cores against 268 s; README.md, How long things take)")
    parser.add_argument("--out", type=Path, default=Path("fused_accum_demo"),
                        help="folder for demo.json and the PNG plots, created if missing "
                             "(default: fused_accum_demo in the current directory)")
    parser.add_argument("--steps", type=_positive, metavar="N",
                        help="optimizer steps per curve instead of each example's own: a smoke run "
                             "(the curves then show little; default: each example's, fewer with "
                             "--quick)")
    names = [name for name, _ in SCRIPTS]
    parser.add_argument("--examples", nargs="+", choices=names, default=names, metavar="NAME",
                        help=f"the examples to train, of {', '.join(names)} "
                             f"(default: all of them)")


def load_example(name: str) -> ModuleType:
    return importlib.import_module(f"{examples.__name__}.{name}")


def plot(task: dict, path: Path) -> None:
    """The curves (top) and each one's difference to the large batch's, in percent (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    styles = {"large batch": dict(color="black", linewidth=4, alpha=0.3),
              "fused_accum": dict(color="tab:blue", linewidth=1.6)}
    others = iter(["tab:orange", "tab:red", "tab:green", "tab:purple", "tab:brown"])
    reference = task["curves"]["large batch"]
    for name, curve in task["curves"].items():
        steps = [i * task["x_step"] for i in range(len(curve))]
        style = styles.get(name) or dict(color=next(others), linewidth=1.2, linestyle="--")
        top.plot(steps, curve, label=name, **style)
        bottom.plot(steps, [100 * (a - b) / b for a, b in zip(curve, reference)], **style)
    top.set_title(task["name"], fontsize=10)
    top.set_ylabel(task["y_label"])
    top.set_yscale("log")
    top.legend()
    bottom.set_ylabel("difference to the\nlarge batch (%)")
    bottom.set_xlabel(task["x_label"])
    for ax in (top, bottom):
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("matplotlib") is None:   # before the training, not after it
        print("demo: the plots need matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    chosen = getattr(args, "examples", None) or [name for name, _ in SCRIPTS]
    modules = {}
    for name, needs in SCRIPTS:
        if name not in chosen:
            continue
        try:
            modules[name] = load_example(name)
        except ImportError as exc:
            print(f"demo: the example {name} (fused_accum/examples/{name}.py) cannot be imported: "
                  f"{exc}" + (f" (it needs {needs}: pip install {needs})" if needs else ""),
                  file=sys.stderr)
            return 2
    out = args.out.resolve()
    print(f"demo: demo.json and the plots go to {out}")
    out.mkdir(parents=True, exist_ok=True)
    steps = getattr(args, "steps", None)
    result = {"quick": args.quick, "fused_accum": __version__, "torch": torch.__version__,
              **({"steps": steps} if steps else {}), "seconds": {}, "tasks": []}
    strayed = []
    for name, module in modules.items():
        started = time.perf_counter()
        tasks = module.run(quick=args.quick, steps=steps)
        result["seconds"][f"{name}.py"] = round(time.perf_counter() - started, 1)
        print(f"\nfused_accum.examples.{name}: {result['seconds'][f'{name}.py']} s")
        for task in tasks:
            summarize(task)
            result["tasks"].append(task)
            if "expect_gap" not in task and task["largest_gap"]["fused_accum"] > TOLERANCE:
                strayed.append(task["name"])
    (out / "demo.json").write_text(json.dumps(result, indent=1) + "\n")
    for task in result["tasks"]:
        plot(task, out / f"{slug(task['name'])}.png")
    print(f"\nwrote {out / 'demo.json'} and {len(result['tasks'])} plots in {out}")
    if strayed:
        print(f"demo: fused_accum strayed more than {TOLERANCE:.0%} from the large batch in: "
              + "; ".join(strayed), file=sys.stderr)
        return 1
    return 0
