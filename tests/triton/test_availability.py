"""backend="triton" where Triton cannot run raises with the reason; "auto" never picks it there,
nor the interpreter anywhere.  Each case runs in a fresh process: whether Triton interprets is
fixed when it is first imported."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

TRY_TRITON = textwrap.dedent("""
    import torch, fused_accum
    from fused_accum import kernels
    model = torch.nn.Linear(3, 2)
    assert kernels.get_backend("auto", torch.device("cpu")).name != "triton"
    try:
        fused_accum.SGD(model.parameters(), lr=0.1, backend="triton")
    except RuntimeError as exc:
        print("RAISED:", exc)
    else:
        print("BUILT")
""")


def _run(env_changes: dict, prelude: str = "") -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_changes)
    run = subprocess.run([sys.executable, "-c", prelude + TRY_TRITON], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_on_cpu_without_the_interpreter_naming_triton_raises_with_the_reason():
    out = _run({})
    assert "RAISED: backend 'triton' cannot run on cpu" in out
    assert "TRITON_INTERPRET=1" in out


def test_without_triton_installed_naming_it_raises_with_the_import_error():
    out = _run({}, prelude="import sys; sys.modules['triton'] = None\n")
    assert "RAISED: backend 'triton' cannot run on cpu: import failed" in out


def test_under_the_interpreter_it_runs_on_cpu_but_auto_still_prefers_compiled_code():
    assert "BUILT" in _run({"TRITON_INTERPRET": "1"})
