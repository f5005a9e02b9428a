"""The results tables of the docs, generated from the committed result files.

Every table lives in a Markdown file between two markers,

    <!-- tables:NAME -->
    ...
    <!-- /tables:NAME -->

and is what :data:`TABLES` makes of the files under ``benchmarks/results/`` and
``examples/results/``.  So a number in a table is a number in a committed file, and
``tests/test_docs.py`` checks that the committed tables are what this script generates.

    python benchmarks/tables.py            # print every table
    python benchmarks/tables.py --write    # rewrite the tables between their markers
    python benchmarks/tables.py --check    # exit 1 where a committed table differs

Only the standard library: it reads JSON, it never imports torch.
"""
from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# The runs the docs quote.  CPU: the last full run and the four before it (for the ranges);
# communication: two runs of the same code; GPU: the one H200 run with window numbers.
CPU_RUN = "cpu-amd-epyc-2cores-2026-12-04c.json"
CPU_EARLIER = ["cpu-amd-epyc-2cores-2026-12-04b.json", "cpu-amd-epyc-2cores-2026-12-04.json",
               "cpu-amd-epyc-2cores-2026-12-01b.json", "cpu-amd-epyc-2cores-2026-12-01.json"]
COMM_RUNS = ["cpu-amd-epyc-2cores-2026-12-04d-comm.json",
             "cpu-amd-epyc-2cores-2026-12-04e-comm.json"]
GPU_RUN = "nvidia-h200-2026-12-04.json"
HOST_OVERHEAD = "cpu-amd-epyc-2cores-2026-12-04-host-overhead.json"
DEMO = ROOT / "examples" / "results" / "demo.json"
CPU_OPS_MB = 64      # the CPU ops rows shown: this size, torch and the compiled backend
GPU_OPS_MB = 1024    # the GPU ops rows shown: this size, torch and both GPU backends


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def source(*names: str) -> str:
    """The line under a table that names the files it comes from."""
    files = ", ".join(f"[`{n}`](results/{n})" for n in names)
    return f"From {files}."


def machine(result: dict) -> str:
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['torch_threads']} threads"
    return (f"{where}; torch {m['torch']}; fused_accum {m['fused_accum']}; {m['date']}; "
            f"copy bandwidth {result['copy_bandwidth_gb_per_s']:.1f} GB/s")


def short(result: dict) -> str:
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['torch_threads']} threads"
    return f"{where}, torch {m['torch']}, {m['date'][:10]}"


def x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def span(values: list[float]) -> str:
    """``0.52-0.67x``, or one figure where the runs agree to two decimals."""
    low, high = f"{min(values):.2f}", f"{max(values):.2f}"
    return f"{low}x" if low == high else f"{low}-{high}x"


def ratio(row: dict, key: str) -> str:
    """The ratio, with its p10-p90 and the noise mark where the run recorded them (runs from
    before 2026-12-05 did not)."""
    text = x(row[key])
    if row.get(f"{key}_p10") is not None and row.get(f"{key}_within_noise") is not None:
        text += f" ({row[f'{key}_p10']:.2f}-{row[f'{key}_p90']:.2f})"
        if row[f"{key}_within_noise"]:
            text += " *"
    return text


def table(header: list[str], align: str, rows: list[list[str]]) -> list[str]:
    """A Markdown table; ``align`` has one letter a column: l (left) or r (right)."""
    out = ["| " + " | ".join(header) + " |",
           "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


# -- windows and ops ------------------------------------------------------------------------------

def _peak(r: dict) -> str:
    if r.get("peak_memory_bytes") is None:
        return "n/a"
    return f"{r['peak_memory_bytes'] / 2**20:.0f} ({r['peak_memory_vs_torch_best']:.2f}x)"


def windows_rows(rows: list[dict]) -> list[str]:
    return table(
        ["config", "parameters", "k", "pipeline", "ms per window (p10-p90)", "time vs torch best",
         "bytes/param", "GB/s", "of copy", "peak memory MB (vs torch best)",
         "max rel. diff vs torch best"],
        "lrrlrrrrrrr",
        [[f"({r['config']}) {r['describe']}", f"{r['parameters'] / 1e6:.1f}M in {r['tensors']}",
          str(r["k"]), r["pipeline"],
          f"{r['time_s'] * 1e3:.1f} ({r['time_p10_s'] * 1e3:.1f}-{r['time_p90_s'] * 1e3:.1f})",
          ratio(r, "time_vs_torch_best"), str(r["bytes_per_parameter"]), f"{r['gb_per_s']:.1f}",
          f"{r['fraction_of_copy']:.0%}", _peak(r), f"{r['max_rel_diff_vs_torch_best']:.1e}"]
         for r in rows])


def ops_rows(rows: list[dict]) -> list[str]:
    return table(
        ["op", "case", "MB", "contender", "ms", "GB/s", "of copy", "time vs torch"], "llrlrrrr",
        [[r["op"], r["variant"], str(r["size_mb"]), r["runs"], f"{r['time_s'] * 1e3:.3f}",
          f"{r['gb_per_s']:.1f}", f"{r['fraction_of_copy']:.0%}", ratio(r, "time_vs_torch")]
         for r in rows])


def cpu_windows() -> list[str]:
    result = load(CPU_RUN)
    return [machine(result), ""] + windows_rows(result["windows"]) + ["", source(CPU_RUN)]


def cpu_ops() -> list[str]:
    result = load(CPU_RUN)
    rows = [r for r in result["ops"] if r["size_mb"] == CPU_OPS_MB
            and r["contender"] in ("torch", "fused_accum:extension")]
    return ops_rows(rows) + ["", source(CPU_RUN)]


def _fused(result: dict) -> dict[tuple[str, str], dict]:
    return {(r["config"], r["pipeline"]): r for r in result["windows"]
            if r["pipeline"].startswith("fused_accum")}


def cpu_runs() -> list[str]:
    """fused_accum's time and peak memory against torch best, configuration by configuration, in
    the last CPU run and the four before it: where the ranges the docs quote come from."""
    names = [CPU_RUN] + CPU_EARLIER
    runs = [_fused(load(n)) for n in names]
    rows = []
    for key in runs[0]:
        times = [run[key]["time_vs_torch_best"] for run in runs if key in run]
        peaks = [run[key]["peak_memory_vs_torch_best"] for run in runs if key in run]
        rows.append([f"({key[0]}) {key[1]}"] + [x(run[key]["time_vs_torch_best"]) if key in run
                                                  else "" for run in runs]
                    + [span(times), span(peaks)])
    runs_header = [re.sub(r"^cpu-amd-epyc-2cores-2026-|\.json$", "", n) for n in names]
    return (table(["config, pipeline"] + [f"time, {h}" for h in runs_header]
                  + ["time, range", "peak memory, range"], "l" + "r" * (len(names) + 2), rows)
            + ["", source(*names)])


def gpu_windows() -> list[str]:
    result = load(GPU_RUN)
    return ([machine(result), ""] + windows_rows(result["windows"])
            + ["", f"{source(GPU_RUN)} The file's note: {result['note']}."])


def gpu_ops() -> list[str]:
    result = load(GPU_RUN)
    rows = [r for r in result["ops"] if r["size_mb"] == GPU_OPS_MB
            and r["contender"] in ("torch", "fused_accum:extension", "fused_accum:triton")]
    return ops_rows(rows) + ["", source(GPU_RUN)]


def summary() -> list[str]:
    """README's one table: fused_accum against torch best, on the CPU and on the H200."""
    cpu, gpu = load(CPU_RUN), load(GPU_RUN)
    cpu_rows, gpu_rows = _fused(cpu), _fused(gpu)
    rows = []
    for key, r in cpu_rows.items():
        g = gpu_rows.get(key)
        compact = ", compact masters" if key[1].endswith("compact") else ""
        name = f"({key[0]}) {r['describe']}{compact}"
        rows.append([name, x(r["time_vs_torch_best"]), x(r["peak_memory_vs_torch_best"]),
                     x(g and g["time_vs_torch_best"]), x(g and g["peak_memory_vs_torch_best"])])
    return (table(["configuration", "time, CPU", "peak memory, CPU", "time, H200",
                   "peak memory, H200"], "lrrrr", rows)
            + ["", "fused_accum's time and peak memory against the best plain-PyTorch pipeline "
                   f"(lower is better). CPU: {short(cpu)} ([`{CPU_RUN}`](benchmarks/results/"
                   f"{CPU_RUN})); H200: {short(gpu)} ([`{GPU_RUN}`](benchmarks/results/{GPU_RUN}))."])


# -- data parallel --------------------------------------------------------------------------------

def _overlap(r: dict) -> list[str]:
    if "chunks" not in r:
        return ["", ""]
    gathered = r.get("gathered_during_step")
    return [f"{r['reduced_during_backward']:.1f} of {r['chunks']}",
            "" if gathered is None else f"{gathered:.1f} of {r['chunks'] - 1}"]


def comm() -> list[str]:
    result = load(COMM_RUNS[0])
    rows = [[f"{r['model_dtype']}, {r['parameters'] / 1e6:.2f}M", r["pipeline"], str(r["k"]),
             str(r["ranks"]), r["accumulates_in"], f"{r['bytes_per_parameter']:.2f}",
             f"{r['collectives_per_window']:.0f}", x(r["bytes_vs_fused_accum"]),
             f"{r['time_s'] * 1e3:.1f}", ratio(r, "time_vs_fused_accum"),
             "" if r.get("state_bytes_per_parameter") is None
             else f"{r['state_bytes_per_parameter']:.2f}"] + _overlap(r)
            for r in result["comm"]]
    return ([machine(result), ""]
            + table(["model", "pipeline", "k", "ranks", "accumulates in", "bytes/param per window",
                     "collectives per window", "bytes vs fused_accum", "ms per window",
                     "time vs fused_accum", "optimizer state bytes/param per rank",
                     "chunks reduced during backward", "all-gathers done during the step"],
                    "llrrlrrrrrrrr", rows)
            + ["", source(COMM_RUNS[0])])


def comm_runs() -> list[str]:
    """The two communication runs side by side: how far the times and overlaps move."""
    runs = [load(n) for n in COMM_RUNS]
    labels = [re.sub(r"^cpu-amd-epyc-2cores-2026-|-comm\.json$", "", n) for n in COMM_RUNS]
    rows = []
    for i, r in enumerate(runs[0]["comm"]):
        others = [run["comm"][i] for run in runs]
        assert all((o["model_dtype"], o["pipeline"]) == (r["model_dtype"], r["pipeline"])
                   for o in others)
        rows.append([r["model_dtype"], r["pipeline"]]
                    + [x(o["time_vs_fused_accum"]) for o in others]
                    + [_overlap(o)[1] for o in others])
    return (table(["model", "pipeline"] + [f"time vs fused_accum, {l}" for l in labels]
                  + [f"all-gathers done during the step, {l}" for l in labels],
                  "ll" + "r" * (2 * len(runs)), rows)
            + ["", source(*COMM_RUNS)])


# -- host overhead --------------------------------------------------------------------------------

def host_overhead() -> list[str]:
    result = load(HOST_OVERHEAD)
    rows = []
    for stage, paths in result.items():
        if not isinstance(paths, dict) or not stage.startswith(("before", "after")):
            continue
        for path, r in paths.items():
            rows.append([stage, path, f"{r['extra_us_per_gradient']:.1f}", x(r["ratio"])])
    args = result["args"]
    return ([f"{result['machine']}; torch {result['torch']}; {result['date']}; {args['layers']} "
             f"Linear layers of width {args['width']}, k = {args['k']}, groups of "
             f"{args['group_mb']} MB, {args['repeats']} repetitions", ""]
            + table(["code", "gradient path", "host us per gradient beyond autograd's",
                     "window time vs torch"], "llrr", rows)
            + ["", source(HOST_OVERHEAD)])


# -- the demo -------------------------------------------------------------------------------------

def gap(value: float) -> str:
    """A largest relative gap: 1.0e-07 below 1e-5, else in percent."""
    if value < 1e-5:
        return f"{value:.0e}"
    return f"{100 * value:.2f}%" if value < 0.01 else f"{100 * value:.1f}%"


def demo() -> list[str]:
    result = json.loads(DEMO.read_text())
    rows = []
    for task in result["tasks"]:
        gaps = task["largest_gap"]
        others = "; ".join(f"{name}: {gap(v)}" for name, v in gaps.items() if name != "fused_accum")
        rows.append([task["name"], gap(gaps["fused_accum"]), others])
    seconds = ", ".join(f"`{name}` {s:.0f} s" for name, s in result["seconds"].items())
    return (table(["task", "fused_accum", "the others"], "lrl", rows)
            + ["", f"{'Quick' if result['quick'] else 'Full'} run; fused_accum "
                   f"{result['fused_accum']}, torch {result['torch']}; each example's time: "
                   f"{seconds}. From "
                   f"[`examples/results/demo.json`](../examples/results/demo.json)."])


# -- where each table lives ----------------------------------------------------------------------

TABLES: dict[str, tuple[str, Callable[[], list[str]]]] = {
    "summary": ("README.md", summary),
    "cpu-windows": ("benchmarks/README.md", cpu_windows),
    "cpu-ops": ("benchmarks/README.md", cpu_ops),
    "cpu-runs": ("benchmarks/README.md", cpu_runs),
    "host-overhead": ("benchmarks/README.md", host_overhead),
    "gpu-windows": ("benchmarks/README.md", gpu_windows),
    "gpu-ops": ("benchmarks/README.md", gpu_ops),
    "comm": ("benchmarks/README.md", comm),
    "comm-runs": ("benchmarks/README.md", comm_runs),
    "demo": ("benchmarks/README.md", demo),
}


def generate(name: str) -> str:
    return "\n".join(TABLES[name][1]())


def _pattern(name: str) -> re.Pattern:
    name = re.escape(name)
    return re.compile(rf"(<!-- tables:{name} -->\n)(.*?)(<!-- /tables:{name} -->)", re.DOTALL)


def committed(name: str) -> str | None:
    """The table ``name`` as its file holds it now (None: its markers are missing)."""
    text = (ROOT / TABLES[name][0]).read_text(encoding="utf-8")
    match = _pattern(name).search(text)
    return None if match is None else match.group(2).rstrip("\n")


def write(name: str) -> bool:
    """Rewrite table ``name`` in its file; False when its markers are missing."""
    path = ROOT / TABLES[name][0]
    text = path.read_text(encoding="utf-8")
    table = generate(name)
    new, count = _pattern(name).subn(lambda m: m.group(1) + table + "\n" + m.group(3), text)
    if count != 1:
        return False
    if new != text:
        path.write_text(new, encoding="utf-8")
    return True


def main(argv: list[str]) -> int:
    if argv[:1] == ["--write"]:
        missing = [n for n in TABLES if not write(n)]
        for n in missing:
            print(f"no markers for table {n!r} in {TABLES[n][0]}", file=sys.stderr)
        return 1 if missing else 0
    if argv[:1] == ["--check"]:
        stale = [n for n in TABLES if committed(n) != generate(n)]
        for n in stale:
            print(f"table {n!r} in {TABLES[n][0]} differs from what the results give; "
                  "run python benchmarks/tables.py --write", file=sys.stderr)
        return 1 if stale else 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    for name in TABLES:
        print(f"<!-- tables:{name} ({TABLES[name][0]}) -->\n{generate(name)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
