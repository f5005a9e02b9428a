"""Tables and plots from benchmark results (what ``python -m fused_accum bench --json`` writes),
so that the README's figures come from committed data:
``python -m fused_accum.bench.report benchmarks/results/FILE.json [--plot FILE.png]``."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _machine_line(result: dict) -> str:
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['torch_threads']} threads"
    return (f"{where}; torch {m['torch']}; fused_accum {m['fused_accum']}; {m['date']}; "
            f"copy bandwidth {result['copy_bandwidth_gb_per_s']:.1f} GB/s")


NOISE_MARK = "*"


def ratio(row: dict, key: str) -> str:
    """``1.03x (0.97-1.10) *``: the ratio, its p10-p90 over repetitions (results from before
    2026-12-05 have none), and the mark when that spread includes 1.0."""
    text = f"{row[key]:.2f}x"
    if row.get(f"{key}_p10") is not None and row.get(f"{key}_within_noise") is not None:
        text += f" ({row[f'{key}_p10']:.2f}-{row[f'{key}_p90']:.2f})"
        if row[f"{key}_within_noise"]:
            text += f" {NOISE_MARK}"
    return text


RATIOS = {"ops": "time_vs_torch", "windows": "time_vs_torch_best", "comm": "time_vs_fused_accum"}


def within_noise(rows: list[dict], key: str) -> list[dict]:
    return [r for r in rows if r.get(f"{key}_within_noise")]


FEW_REPEATS = 5   # fewer repetitions than this: their p10-p90 says little about the noise


def _repetitions(n: int) -> str:
    return f"{n} repetition{'' if n == 1 else 's'}"


def noise_note(rows: list[dict], key: str) -> str:
    """The footnote of a table with marked ratios, or with too few repetitions to tell."""
    marked = within_noise(rows, key)
    repeats = sorted({r["repeats"] for r in rows if "repeats" in r})
    over = f" over {'/'.join(map(str, repeats))} repetitions" if repeats else ""
    note = ""
    if marked:
        note += (f"\n{NOISE_MARK} the ratio's p10-p90{over} includes 1.0: the difference is within "
                 f"this run's repeat-to-repeat noise ({len(marked)} of {len(rows)} rows).")
    if repeats and repeats[0] < FEW_REPEATS:
        note += (f"\nThe spreads come from {_repetitions(repeats[0])}: too few to tell noise from "
                 "an effect.")
    return note


def noise_warnings(result: dict) -> list[str]:
    """One warning per level whose ratios include some within the run's own noise."""
    out = []
    for level, key in RATIOS.items():
        rows = result.get(level) or []
        compared = [r for r in rows if r.get(f"{key}_within_noise") is not None]
        marked = within_noise(rows, key)
        if marked:
            out.append(f"warning: {len(marked)} of {len(compared)} {level} time ratios are within "
                       f"this run's noise (their p10-p90 includes 1.0, marked {NOISE_MARK}): "
                       + ", ".join(_who(level, r) for r in marked))
        few = min((r["repeats"] for r in rows if "repeats" in r), default=FEW_REPEATS)
        if few < FEW_REPEATS:
            out.append(f"warning: the {level} spreads come from {_repetitions(few)}, too few to "
                       "tell noise from an effect")
    return out


def _who(level: str, r: dict) -> str:
    if level == "windows":
        return f"({r['config']}) {r['pipeline']}"
    if level == "ops":
        return f"{r['op']} {r['variant']} {r['size_mb']} MB {r['contender']}"
    return f"{r['model_dtype']} {r['pipeline']}"


def _peak(r: dict) -> str:
    if r.get("peak_memory_bytes") is None:
        return "n/a"
    return f"{r['peak_memory_bytes'] / 2**20:.0f} ({r['peak_memory_vs_torch_best']:.2f}x)"


def ops_table(rows: list[dict]) -> str:
    lines = ["| op | case | MB | contender | ms | GB/s | of copy | time vs torch (p10-p90) |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['variant']} | {r['size_mb']} | {r['runs']} | "
                     f"{r['time_s'] * 1e3:.3f} | {r['gb_per_s']:.1f} | {r['fraction_of_copy']:.0%} | "
                     f"{ratio(r, 'time_vs_torch')} |")
    return "\n".join(lines) + noise_note(rows, "time_vs_torch")


def windows_table(rows: list[dict]) -> str:
    lines = ["| config | parameters | k | pipeline | ms per window (p10-p90) | time vs torch best "
             "(p10-p90) | bytes/param | GB/s | of copy | peak memory MB (vs torch best) | "
             "max rel. diff vs torch best |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| ({r['config']}) {r['describe']} | {r['parameters'] / 1e6:.1f}M in {r['tensors']} | "
            f"{r['k']} | {r['pipeline']} | {r['time_s'] * 1e3:.1f} ({r['time_p10_s'] * 1e3:.1f}-"
            f"{r['time_p90_s'] * 1e3:.1f}) | {ratio(r, 'time_vs_torch_best')} | "
            f"{r['bytes_per_parameter']} | {r['gb_per_s']:.1f} | {r['fraction_of_copy']:.0%} | "
            f"{_peak(r)} | {r['max_rel_diff_vs_torch_best']:.1e} |")
    return "\n".join(lines) + noise_note(rows, "time_vs_torch_best")


def _state(row: dict) -> str:
    value = row.get("state_bytes_per_parameter")   # absent from results before 2026-12-04d
    return "" if value is None else f"{value:.2f}"


def _overlap(row: dict) -> str:
    """Chunks whose reduction started during the last backward pass, and (sharded) all-gathers
    complete while later chunks were stepped, per window, out of how many could."""
    if "chunks" not in row:
        return " | "
    chunks = row["chunks"]
    text = f"{row['reduced_during_backward']:.1f} of {chunks} | "
    if "gathered_during_step" in row:
        text += f"{row['gathered_during_step']:.1f} of {chunks - 1}"
    return text


def comm_table(rows: list[dict]) -> str:
    lines = ["| model | pipeline | k | ranks | accumulates in | bytes/param per window | "
             "collectives per window | bytes vs fused_accum | ms per window | time vs fused_accum (p10-p90) "
             "| optimizer state bytes/param per rank | chunks reduced during backward | "
             "all-gathers done during the step |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model_dtype']}, {r['parameters'] / 1e6:.2f}M | {r['pipeline']} | "
                     f"{r['k']} | {r['ranks']} | {r['accumulates_in']} | "
                     f"{r['bytes_per_parameter']:.2f} | {r['collectives_per_window']:.0f} | "
                     f"{r['bytes_vs_fused_accum']:.2f}x | {r['time_s'] * 1e3:.1f} | "
                     f"{ratio(r, 'time_vs_fused_accum')} | {_state(r)} | {_overlap(r)} |")
    return "\n".join(lines) + noise_note(rows, "time_vs_fused_accum")


def tables(result: dict) -> str:
    parts = [f"Measured on {_machine_line(result)}."]
    if result["windows"]:
        parts += ["", "Windows:", "", windows_table(result["windows"])]
    if result["ops"]:
        parts += ["", "Ops:", "", ops_table(result["ops"])]
    if result.get("comm"):
        parts += ["", "Data parallel, communication per window:", "", comm_table(result["comm"])]
    warnings = noise_warnings(result)
    if warnings:
        parts += [""] + warnings
    for failure in result.get("failures", []):
        parts += ["", f"FAILED: {failure['level']} {failure.get('config', '')}: {failure['error']}"]
    if result.get("complete") is False:
        parts += ["", "INCOMPLETE: the run was stopped; these are the measurements it finished."]
    return "\n".join(parts)


def plot(result: dict, path: Path) -> bool:
    """Time ratio and fraction of copy bandwidth per configuration; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [r for r in (("windows", "pipeline", "time_vs_torch_best"), ("ops", "contender", "time_vs_torch"))
              if result[r[0]]]
    fig, axes = plt.subplots(len(panels), 2, figsize=(13, 4.5 * len(panels)), squeeze=False)
    for row, (level, who, ratio) in zip(axes, panels):
        data = result[level]
        labels = sorted({(r.get("config") or f"{r['op']}: {r['variant']}", r.get("size_mb", 0))
                         for r in data}, key=str)
        names = sorted({r[who] for r in data})
        for j, (key, title) in enumerate(((ratio, "time vs torch (lower is better)"),
                                          ("fraction_of_copy", "fraction of copy bandwidth"))):
            ax = row[j]
            width = 0.8 / len(names)
            for i, name in enumerate(names):
                values = [next((r[key] for r in data if r[who] == name and
                                (r.get("config") or f"{r['op']}: {r['variant']}", r.get("size_mb", 0)) == lab), 0)
                          for lab in labels]
                ax.barh([y + i * width for y in range(len(labels))], values, height=width, label=name)
            ax.set_yticks([y + 0.4 - width / 2 for y in range(len(labels))])
            ax.set_yticklabels([f"{a} ({b} MB)" if b else f"({a})" for a, b in labels], fontsize=7)
            ax.set_title(f"{level}: {title}")
            if key == ratio:
                ax.set_xscale("log")   # the reference backend is tens of times slower
            ax.axvline(1.0, color="grey", linewidth=0.8)
            ax.legend(fontsize=7)
    fig.suptitle(_machine_line(result), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str]) -> int:
    """report.py RESULTS.json [--plot OUT.png]: print the tables, optionally redraw the plot."""
    if not argv or argv[0].startswith("-"):
        print(main.__doc__, file=sys.stderr)
        return 2
    result = json.loads(Path(argv[0]).read_text())
    print(tables(result))
    if "--plot" in argv:
        out = Path(argv[argv.index("--plot") + 1])
        if not plot(result, out):
            print("no plot: matplotlib is not installed", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
