"""fused_accum installed outside the checkout (``pip install --target``, without network and without
build isolation) runs ``python -m fused_accum demo``: the examples are part of the package, and
the results go to the current directory, which the demo names."""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# installed distributions, looked up without importing (importlib.util.find_spec("pip") would
# set off setuptools' distutils hack in this process)
for distribution, why in [("setuptools", "building without isolation needs setuptools installed"),
                          ("pip", "installs with pip"),
                          ("scikit-learn", "the digits example needs scikit-learn"),
                          ("matplotlib", "the demo's plots need matplotlib")]:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{distribution} missing: {why}", allow_module_level=True)


def _run(args, cwd, env, timeout=300):
    run = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{args}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """fused_accum pip-installed into a folder of its own from a copy of the checkout (the copy
    keeps the build's leftovers out of the checkout), and an environment that imports it from
    there only: PYTHONPATH is that folder."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "_csrc", "*.so", "fused_accum_demo",
        ".pytest_cache"))
    site = tmp / "site"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    _run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
          "--no-index", "--no-cache-dir", "--disable-pip-version-check", "--quiet",
          "--target", str(site), str(source)], cwd=tmp, env=env)
    env["PYTHONPATH"] = str(site)
    return site, env


def test_the_wheel_holds_the_examples_and_what_the_backends_read(installed):
    site, _ = installed
    package = site / "fused_accum"
    for name in ("__init__", "digits", "byte_gpt", "hf_trainer"):
        assert (package / "examples" / f"{name}.py").is_file(), name
    sources = [p.relative_to(ROOT / "csrc") for p in (ROOT / "csrc").rglob("*")
               if p.is_file() and p.suffix in (".cpp", ".cu", ".h", ".cuh")]
    assert len(sources) > 10   # the just-in-time build's sources and headers, every one
    missing = [str(s) for s in sources if not (package / "_csrc" / s).is_file()]
    assert not missing, missing
    assert (package / "kernels" / "triton_ops" / "tuned.json").is_file()
    assert not (site / "examples").exists() and not (site / "tests").exists()


def test_the_demo_runs_from_the_installed_package(installed, tmp_path):
    site, env = installed
    where = _run([sys.executable, "-c", "import fused_accum; print(fused_accum.__file__)"],
                 cwd=tmp_path, env=env)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout   # not the checkout's
    helped = _run([sys.executable, "-m", "fused_accum", "demo", "--help"], cwd=tmp_path, env=env)
    assert "--examples" in helped.stdout and "--steps" in helped.stdout
    # the cheapest real run: one example (digits: scikit-learn's data), 4 optimizer steps per
    # curve, every way of training; results in ./fused_accum_demo, named on the way in and out
    run = _run([sys.executable, "-m", "fused_accum", "demo", "--examples", "digits", "--steps", "4"],
               cwd=tmp_path, env=env, timeout=600)
    out = tmp_path / "fused_accum_demo"
    assert f"go to {out}" in run.stdout and f"wrote {out / 'demo.json'}" in run.stdout, run.stdout
    result = json.loads((out / "demo.json").read_text())
    assert list(result["seconds"]) == ["digits.py"] and result["steps"] == 4
    assert [len(t["curves"]["fused_accum"]) for t in result["tasks"]] == [2, 2]
    assert len(list(out.glob("*.png"))) == len(result["tasks"]) == 2
