"""The commands a new user runs first."""
import subprocess
import sys

import pytest


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fused_accum", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_check_trains_both_ways_and_agrees(optimizer, backend):
    result = _run("check", "--optimizer", optimizer, "--windows", "3", "--backend", backend)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "largest relative parameter difference" in result.stdout
    assert f"backend {backend}" in result.stdout
    difference = float(result.stdout.split("difference: ")[1].split()[0])
    assert 0 < difference <= 1e-5


def test_check_fails_loudly_when_results_differ():
    # An impossible tolerance must fail: the command is not a rubber stamp.
    result = _run("check", "--windows", "2", "--tolerance", "0")
    assert result.returncode == 1 and "FAILED" in result.stdout


def test_info_lists_every_backend():
    from fused_accum import kernels
    result = _run("info")
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout and "device cpu" in result.stdout
    for name in kernels.backend_names():
        assert name in result.stdout
