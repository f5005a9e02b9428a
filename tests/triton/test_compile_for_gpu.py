"""Every Triton kernel specialisation compiles for an H200 (sm_90) without a GPU, uses no stack
or local memory (no spills), and the 16-byte-aligned specialisations use vector loads."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


def test_every_kernel_compiles_for_sm90_without_spills_and_with_vector_loads_when_aligned():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_for_gpu.py")
    run = subprocess.run([sys.executable, str(script), "90"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    results = [json.loads(line) for line in run.stdout.splitlines()]
    kernels = {r["kernel"] for r in results}
    assert kernels == {"accumulate_kernel", "norm_kernel", "add_partials_kernel",
                       "increment_steps_kernel", "sgd_kernel", "adam_kernel",
                       "accumulate_linear_kernel"}
    aligned = [r for r in results if r["constexprs"].get("ALIGNED") == "True"]
    assert aligned and all(r["max_vector_load"] == 4 for r in aligned), aligned
    spilled = [r for r in results if r["stack_bytes"] or r["local_bytes"]]
    assert not spilled, spilled
