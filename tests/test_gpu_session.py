"""benchmarks/gpu_session.sh, the lent-GPU session, run dry on the CPU (every stage, small
sizes), and benchmarks/host_overhead.py's rows and failures.  No timing assertions: the stages'
caps in a dry run are far beyond what any machine needs."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["machine", "build", "tests", "gemm", "host", "windows", "profile", "more", "ncu"]
FILES = {"session.log", "host-overhead.json", "windows.json", "windows-more.json",
         "profile-e.txt", "ncu-accumulate.txt", "linear-gemm.json"}


def test_the_gpu_session_dry_run_runs_every_stage_and_leaves_what_the_device_tool_returns(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--dry-run"], cwd=ROOT,
                         env={**os.environ, "OUT": str(out), "PYTHON": sys.executable},
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    log = (out / "session.log").read_text()
    for stage in STAGES:
        assert re.search(rf"^=== {stage}: ok \(exit 0\)", log, re.M), f"{stage}:\n{log[-6000:]}"
    assert "=== 0 stage(s) failed or capped" in run.stdout   # the summary ends stdout too
    # The device tool brings back at most 8 files, 16 MiB each, 2 folders down, plain names.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} == FILES and len(files) <= 8
    for p in files:
        assert p.stat().st_size <= 16 * 2**20 and len(p.relative_to(out).parts) <= 3
        assert re.fullmatch(r"[A-Za-z0-9._-]+", p.name)
    # The three extensions built (here: found built) each in its own process; no CUDA here.
    assert "build cpu: ok" in log and "build collector: ok" in log
    assert "build cuda: torch has no CUDA device here" in log
    assert re.search(r"tests/test_gpu.py", log) and "skipped" in log   # collected, skipped on a CPU
    # accumulate_linear's two GEMMs, each checked against reference on every shape and dtype.
    gemm = json.loads((out / "linear-gemm.json").read_text())
    assert len(gemm["rows"]) == 6
    for r in gemm["rows"]:
        assert r["library"]["max_rel_error"] < 1e-5 and r["triton"]["max_rel_error"] < 1e-5
        assert r["triton_vs_library"] > 0
    # Host time per gradient: three distinct paths, each at a launch per gradient and at 0.03 MB.
    host = json.loads((out / "host-overhead.json").read_text())
    assert host["complete"] and not host["failures"]
    assert {(r["path"], r["group_mb"]) for r in host["rows"]} == {
        (path, group) for path in ("node", "tensor", "python") for group in (0.0, 0.03)}
    assert {r["path"] for r in host["rows"] if r["default_here"]} == {"node"}   # on a CPU
    for r in host["rows"]:
        assert r["ratio_p10"] <= r["ratio_p90"] and isinstance(r["ratio_within_noise"], bool)
    # Windows e, f, b in that order with peak memory, then the others (here d), each complete.
    windows = json.loads((out / "windows.json").read_text())
    assert windows["complete"] and not windows["failures"]
    assert list(dict.fromkeys(r["config"] for r in windows["windows"])) == ["e", "f", "b"]
    if sys.platform == "linux":
        assert all(r["peak_memory_bytes"] is not None for r in windows["windows"])
    more = json.loads((out / "windows-more.json").read_text())
    assert more["complete"] and {r["config"] for r in more["windows"]} == {"d"}
    profile = (out / "profile-e.txt").read_text()
    assert "=== (e) fused_accum: 3 windows ===" in profile and "=== (e) torch best" in profile
    assert "extension: accumulated 4 MB on cpu" in (out / "ncu-accumulate.txt").read_text()


def test_host_overhead_shows_a_failing_child_s_traceback_and_goes_on(tmp_path):
    out = tmp_path / "host.json"
    run = subprocess.run([sys.executable, "benchmarks/host_overhead.py", "--device", "no-such-device",
                          "--hooks", "node", "--repeats", "1", "--layers", "1", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "collector (node hook): FAILED" in run.stdout
    assert "Traceback" in run.stdout and "RuntimeError: Invalid device string" in run.stdout
    doc = json.loads(out.read_text())
    assert doc["complete"] and doc["rows"] == [] and doc["failures"][0]["hook"] == "node"
