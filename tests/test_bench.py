"""The benchmark runs end to end (--quick, tiny sizes) and writes the documented JSON.
No timing assertions: speed is measured by the benchmark, not tested."""
import json
import subprocess
import sys

from fused_accum import kernels
from fused_accum.bench.report import tables

def _spread(key):   # each time ratio, with its p10-p90 over repetitions and the noise flag
    return {key, f"{key}_p10", f"{key}_p90", f"{key}_within_noise"}


OPS_KEYS = {"op", "variant", "size_mb", "elements", "contender", "runs", "bytes", "time_s",
            "time_p10_s", "time_p90_s", "repeats", "gb_per_s", "fraction_of_copy"} | _spread("time_vs_torch")
WINDOW_KEYS = {"config", "describe", "parameters", "tensors", "dtype", "k", "pipeline", "time_s",
               "time_p10_s", "time_p90_s", "repeats", "bytes_per_parameter", "bytes",
               "gb_per_s", "fraction_of_copy", "peak_memory_bytes", "peak_memory_vs_torch_best",
               "max_rel_diff_vs_torch_best"} | _spread("time_vs_torch_best")
COMM_KEYS = {"model_dtype", "pipeline", "k", "ranks", "accumulates_in", "parameters",
             "bytes_per_window", "bytes_per_parameter", "collectives_per_window", "time_s",
             "bytes_vs_fused_accum", "state_bytes_per_parameter"} | _spread("time_vs_fused_accum")
OVERLAP_KEYS = {"chunks", "reduced_during_backward", "gathered_during_step"}   # fused rows


def test_quick_bench_writes_the_documented_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "fused_accum", "bench", "--quick", "--repeats", "1",
                             "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Windows:" in result.stdout and "Ops:" in result.stdout
    data = json.loads(out.read_text())
    assert data["schema"] == "fused_accum.bench/1"
    assert data["complete"] is True and data["failures"] == []
    assert {"date", "device", "cpu", "torch", "fused_accum"} <= set(data["machine"])
    assert data["copy_bandwidth_gb_per_s"] > 0
    assert data["ops"] and all(set(r) == OPS_KEYS for r in data["ops"])
    assert data["windows"] and all(set(r) == WINDOW_KEYS for r in data["windows"])
    contenders = {r["contender"] for r in data["ops"]}
    cpu_backends = {n for n in kernels.backend_names()
                    if kernels.availability(n, "cpu")[0] and not kernels.interpreted(n)}
    assert contenders == {"torch"} | {f"fused_accum:{n}" for n in cpu_backends}
    assert {r["pipeline"] for r in data["windows"]} == {"fused_accum", "fused_accum fused",
                                                        "fused_accum compact", "torch best",
                                                        "torch naive"}
    assert {r["config"] for r in data["windows"]} == {"a1", "a2", "b", "c", "d", "e", "f"}
    for r in data["ops"] + data["windows"]:
        assert r["time_s"] > 0 and r["bytes"] > 0
    # fused_accum and the best plain pipeline end every window with the same parameters.
    # With bf16/fp16 Linears fused, the weight gradients are exact fp32 sums (torch best sums
    # bf16-rounded ones; tests/test_fused_linear.py checks the sums), and AdamW's normalised step
    # turns that difference into lr-sized moves of parameters that moved only a few lr (the
    # LayerNorm biases of the quick GPT: 6% of their 3e-4).
    for r in data["windows"]:
        if r["pipeline"].startswith("fused_accum"):
            low_precision = r["dtype"] in ("bfloat16", "float16")   # parameter rounding may flip
            bound = (1e-1 if r["pipeline"] == "fused_accum fused" else 1e-2) if low_precision else 1e-5
            assert r["max_rel_diff_vs_torch_best"] < bound, r
    assert "| (b) bf16 GPT-like model" in tables(data)
    # Communication, as counted at each all-reduce: fused_accum sends its fp32 buffers once per
    # window (plus a few summary floats), DDP the model-dtype gradients every micro-batch, or once
    # under no_sync.
    assert data["comm"] and all(set(r) - OVERLAP_KEYS == COMM_KEYS for r in data["comm"])
    for r in data["comm"]:
        itemsize = {"bfloat16": 2, "float32": 4}[r["model_dtype"]]
        expected = {"fused_accum": 4, "DDP + fused_accum": 4, "DDP": r["k"] * itemsize,
                    "DDP no_sync": itemsize,   # sharded: reduce-scatter fp32, all-gather params
                    "fused_accum sharded": 4 + itemsize}[r["pipeline"]]
        assert expected <= r["bytes_per_parameter"] < expected + 0.01, r
        # AdamW's moments (and fp32 masters of bf16 parameters), halved on each of 2 ranks
        state = {"fused_accum": 12 if itemsize == 2 else 8, "fused_accum sharded": 6 if itemsize == 2 else 4,
                 "DDP + fused_accum": 12 if itemsize == 2 else 8}.get(r["pipeline"], 2 * itemsize)
        assert state <= r["state_bytes_per_parameter"] < state * 1.02, r
        if "fused_accum" in r["pipeline"]:   # several chunks, each reduced once per window
            assert r["chunks"] >= 1 and 0 <= r["reduced_during_backward"] <= r["chunks"]
            assert ("gathered_during_step" in r) == r["pipeline"].endswith("sharded")
    assert "Data parallel, communication per window:" in result.stdout
