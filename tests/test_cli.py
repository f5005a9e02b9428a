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


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*launcher_args, optimizer="adamw"):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher_args,
                             "-m", "fused_accum", "check", "--windows", "3",
                             "--optimizer", optimizer],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _check_output(process) -> str:
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-4000:]
    return out


def test_check_under_torchrun_two_ranks_equal_one_process_with_the_whole_batch():
    out = _check_output(_torchrun("--nproc_per_node=2", f"--master_port={_free_port()}"))
    assert "on each of 2 ranks" in out and "one batch of 32" in out and "OK" in out


def test_check_under_torchrun_on_two_nodes():
    # Two launcher agents rendezvous over TCP as two machines would (here both on localhost).
    port = _free_port()
    nodes = [_torchrun("--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
                       "--master_addr=127.0.0.1", f"--master_port={port}", optimizer="sgd")
             for rank in (0, 1)]
    outputs = [_check_output(node) for node in nodes]
    assert "on each of 2 ranks" in outputs[0] and "OK" in outputs[0]
