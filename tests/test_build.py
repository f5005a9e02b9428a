"""The just-in-time build (fused_accum/kernels/build.py) as a first run meets it: a build killed
halfway, builds of different sources side by side, Ctrl-C.

Each test builds a tiny stand-in for csrc/ (a Python module or a library in a few lines of C, no
torch headers: about a second to compile) through the real entry points, ``load_collector`` and
``load``, in an extensions directory of its own, so that no test pays for a real build.  Where a
build must be caught halfway, the compiler is a wrapper that, asked to, sleeps instead of
compiling.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

fcntl = pytest.importorskip("fcntl")

from fused_accum.kernels import build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

TINY_MODULE = r"""
#include <Python.h>
#define FA_CAT2(a, b) a##b
#define FA_CAT(a, b) FA_CAT2(a, b)
#define FA_STR2(a) #a
#define FA_STR(a) FA_STR2(a)
static struct PyModuleDef tiny = {PyModuleDef_HEAD_INIT, FA_STR(TORCH_EXTENSION_NAME), nullptr, -1,
                                  nullptr};
PyMODINIT_FUNC FA_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&tiny); }
"""

TINY_LIBRARY = "extern \"C\" int fused_accum_tiny() { return 1; }\n"

# The compiler, as ninja calls it: with FA_TEST_SLOW_CXX set, a compile step records its pid in
# that file and sleeps (it never compiles: one that outlives the test writes nothing).
SLOW_CXX = """#!/bin/sh
if [ -n "$FA_TEST_SLOW_CXX" ]; then
  for arg in "$@"; do
    if [ "$arg" = "-c" ]; then echo $$ >> "$FA_TEST_SLOW_CXX"; exec sleep 300; fi
  done
fi
exec c++ "$@"
"""

# A first run: build the collector from the csrc/ given, say what came of it.
CHILD = """
import signal, sys
from pathlib import Path
if sys.argv[2] == "ignore-sigint":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
from fused_accum.kernels import build
build.csrc_dir = lambda: Path(sys.argv[1])
module, error = build.load_collector()
print("loaded:", module is not None, error, flush=True)
"""


def _tiny_csrc(where: Path, variant: str = "") -> Path:
    (where / "autograd").mkdir(parents=True)
    (where / "cpu").mkdir()
    (where / "autograd" / "collector.cpp").write_text(TINY_MODULE + f"// {variant}\n")
    (where / "cpu" / "ops.cpp").write_text(TINY_LIBRARY + f"// {variant}\n")
    return where


def _built(extensions: Path) -> dict[str, list[str]]:
    """Each build directory with the libraries in it."""
    return {d.name: sorted(f.name for f in d.glob("*.so")) for d in extensions.iterdir()
            if d.is_dir()}


@pytest.fixture
def first_run(tmp_path):
    """Run CHILD in a process group of its own; the compiler is SLOW_CXX."""
    compiler = tmp_path / "bin" / "g++"   # a name torch's compiler check knows
    compiler.parent.mkdir()
    compiler.write_text(SLOW_CXX)
    compiler.chmod(0o755)
    sleepers = tmp_path / "sleepers"
    csrc = _tiny_csrc(tmp_path / "csrc")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "CXX": str(compiler),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("FUSED_ACCUM_VERBOSE", None)
    started = []

    def start(*, slow: bool, sigint: str = "default") -> subprocess.Popen:
        child_env = {**env, "FA_TEST_SLOW_CXX": str(sleepers)} if slow else env
        process = subprocess.Popen([sys.executable, "-c", CHILD, str(csrc), sigint],
                                   env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
        started.append(process)
        if slow:   # wait until it is compiling: torch's lock is taken, ninja is running
            deadline = time.monotonic() + 240
            while not (sleepers.exists() and sleepers.read_text().strip()):
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "the build never started"
                time.sleep(0.1)
        return process

    start.extensions = tmp_path / "ext"
    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if sleepers.exists():
        for pid in sleepers.read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_build_killed_halfway_leaves_no_lock_that_stops_the_next_run(first_run):
    # SIGKILL to the whole group (a job's time limit, a closed terminal): Python and ninja die in
    # the middle of the build and torch's lock file stays behind.
    killed = first_run(slow=True)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert list(first_run.extensions.glob("*/lock")), "the state a killed build leaves"

    process = first_run(slow=False)
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the run after a killed build waited on the lock it left")
    assert process.returncode == 0, err
    assert "loaded: True None" in out, out + err
    assert "removed the lock file an interrupted build" in err
    assert not list(first_run.extensions.glob("*/lock"))


def test_ctrl_c_during_the_build_stops_the_program(first_run):
    # Ctrl-C where only ninja sees the interrupt: this process ignores SIGINT, as a background
    # job of a script does (where Python gets the SIGINT too, it raises KeyboardInterrupt itself).
    # It must stop, not fall back to the Python hooks and go on.
    process = first_run(slow=True, sigint="ignore-sigint")
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0, out + err
    assert "KeyboardInterrupt" in err and "interrupted" in err, err
    assert "loaded:" not in out


def _load_collector(monkeypatch, csrc: Path):
    monkeypatch.setattr(build, "csrc_dir", lambda: csrc)
    monkeypatch.setattr(build, "_collector", [])
    module, error = build.load_collector()
    assert module is not None, error


def test_different_sources_build_in_different_directories(tmp_path, monkeypatch, capfd):
    # Two checkouts (or venvs) sharing one extensions directory: each keeps its build.
    extensions = tmp_path / "ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    monkeypatch.delenv("FUSED_ACCUM_VERBOSE", raising=False)
    first = _tiny_csrc(tmp_path / "first" / "csrc", "first")
    second = _tiny_csrc(tmp_path / "second" / "csrc", "second")
    _load_collector(monkeypatch, first)
    _load_collector(monkeypatch, second)
    built = _built(extensions)
    assert len(built) == 2 and all(len(libraries) == 1 for libraries in built.values()), built
    err = capfd.readouterr().err
    assert err.count("first use: building the gradient collector in") == 2, err
    assert err.count("built the gradient collector in") == 2, err

    # The same sources in a third place reuse the first build: nothing is rebuilt, nothing said.
    library = next(extensions.glob("*/*.so"))
    before = library.stat().st_mtime_ns
    copy = _tiny_csrc(tmp_path / "copy" / "csrc", "first")
    _load_collector(monkeypatch, first)
    _load_collector(monkeypatch, copy)
    assert _built(extensions) == built
    assert library.stat().st_mtime_ns == before
    assert "building" not in capfd.readouterr().err


def test_different_flags_build_in_different_directories(tmp_path, monkeypatch):
    extensions = tmp_path / "ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    monkeypatch.delenv("FUSED_ACCUM_VERBOSE", raising=False)
    csrc = _tiny_csrc(tmp_path / "csrc", "flags")
    monkeypatch.setattr(build, "csrc_dir", lambda: csrc)
    monkeypatch.setattr(build, "_prebuilt", lambda device_type: None)
    for arch in ("", "native"):   # FUSED_ACCUM_CPU_ARCH changes -march
        monkeypatch.setenv("FUSED_ACCUM_CPU_ARCH", arch)
        monkeypatch.setattr(build, "_loaded", {})
        assert build.load("cpu") is None
    built = _built(extensions)
    assert len(built) == 2 and all(len(libraries) == 1 for libraries in built.values()), built


def test_a_live_build_is_waited_for_and_said_so(tmp_path, monkeypatch, capfd):
    # While another process builds (it holds the flock, torch's lock is there) this one waits,
    # says for whom, and leaves that lock alone; if the builder then dies without a word (the lock
    # still there), the wait ends and the build completes.
    import threading
    extensions = tmp_path / "ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    monkeypatch.delenv("FUSED_ACCUM_VERBOSE", raising=False)
    csrc = _tiny_csrc(tmp_path / "csrc", "waited")
    _load_collector(monkeypatch, csrc)
    (directory,) = [d for d in extensions.iterdir() if d.is_dir()]
    capfd.readouterr()

    builder = os.open(directory / "fused_accum.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(builder, fcntl.LOCK_EX)
    os.write(builder, b"4242\n")
    (directory / "lock").touch()
    monkeypatch.setattr(build, "_collector", [])
    waiting = threading.Thread(target=build.load_collector, daemon=True)
    waiting.start()
    try:
        deadline = time.monotonic() + 60
        err = ""
        while "waiting for process 4242" not in err and time.monotonic() < deadline:
            time.sleep(0.2)
            err += capfd.readouterr().err
        assert ("waiting for process 4242, which is building or checking the gradient "
                f"collector in {directory}") in err, err
        assert waiting.is_alive() and (directory / "lock").exists()
    finally:
        os.close(builder)   # the builder dies: the kernel drops its flock
    waiting.join(timeout=120)
    assert not waiting.is_alive(), "the wait did not end when the builder died"
    assert build._collector[0] is not None, build._collector
    assert not (directory / "lock").exists()
    assert list(directory.glob("*.so"))


def test_headers_are_built_in_csrc_layout_and_a_changed_one_builds_anew(tmp_path, monkeypatch):
    # csrc/cpu/*.cpp include headers next to them and in csrc/include (formulas.h): both are
    # copied into the build directory in that layout, and a header's contents are hashed.
    extensions = tmp_path / "ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    monkeypatch.delenv("FUSED_ACCUM_VERBOSE", raising=False)
    csrc = _tiny_csrc(tmp_path / "csrc", "headers")
    (csrc / "cpu" / "ops.cpp").write_text(
        '#include "fused_accum/shared.h"\n#include "local.h"\n'
        'extern "C" int fused_accum_tiny() { return kShared + kLocal; }\n')
    (csrc / "cpu" / "second.cpp").write_text('#include "local.h"\nint second() { return kLocal; }\n')
    (csrc / "cpu" / "local.h").write_text("#pragma once\nconstexpr int kLocal = 1;\n")
    shared = csrc / "include" / "fused_accum" / "shared.h"
    shared.parent.mkdir(parents=True)
    shared.write_text("#pragma once\nconstexpr int kShared = 1;\n")
    sources, headers = build.extension_files(csrc, "cpu", ".cpp")
    assert sources == [csrc / "cpu" / "ops.cpp", csrc / "cpu" / "second.cpp"]
    assert headers == [csrc / "cpu" / "local.h", shared]

    monkeypatch.setattr(build, "csrc_dir", lambda: csrc)
    monkeypatch.setattr(build, "_prebuilt", lambda device_type: None)
    for value in ("1", "2"):
        shared.write_text(f"#pragma once\nconstexpr int kShared = {value};\n")
        monkeypatch.setattr(build, "_loaded", {})
        assert build.load("cpu") is None
    built = _built(extensions)
    assert len(built) == 2 and all(len(libraries) == 1 for libraries in built.values()), built
    for directory in extensions.iterdir():
        assert (directory / "cpu" / "local.h").exists()
        assert (directory / "include" / "fused_accum" / "shared.h").exists()
