"""``python -m fused_accum demo --quick``: the examples train on real data; fused_accum's curves
stay on the large batch's, and the hand-written loops that go wrong do not."""
import argparse
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from fused_accum.cli import demo

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("sklearn", reason="the digits example needs scikit-learn")
pytest.importorskip("matplotlib", reason="the demo's plots need matplotlib")
pytest.importorskip("transformers", reason="the hf_trainer example needs transformers")


def test_the_quick_demo_puts_fused_accum_on_the_large_batch_and_the_pitfalls_elsewhere(tmp_path):
    run = subprocess.run([sys.executable, "-m", "fused_accum", "demo", "--quick", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "demo.json").read_text())
    tasks = {task["name"]: task for task in result["tasks"]}
    assert len(tasks) == 4
    for name, task in tasks.items():
        curves = task["curves"]
        lengths = {len(c) for c in curves.values()}
        assert len(lengths) == 1 and lengths.pop() >= 6, name
        for curve in curves.values():   # they learn: the loss falls well below its start
            assert curve[-1] < 0.75 * curve[0], name
        gaps = task["largest_gap"]
        assert gaps["fused_accum"] == demo.largest_gap(curves["fused_accum"], curves["large batch"])
        if "expect_gap" in task:   # BatchNorm: one image's statistics are not 32's
            assert gaps["fused_accum"] > 0.05, name
        else:
            assert gaps["fused_accum"] < demo.TOLERANCE, name
        assert (tmp_path / f"{demo.slug(name)}.png").stat().st_size > 10_000
    groupnorm = next(t for n, t in tasks.items() if "GroupNorm" in n)["largest_gap"]
    assert groupnorm["article's loop"] > 0.05 and groupnorm["clip each micro-batch"] > 0.05
    assert groupnorm["loss / 32 in the short window"] > 0.002
    gpt = next(t for n, t in tasks.items() if "bf16" in n)["largest_gap"]
    assert gpt["plain bf16 loop"] > 0.01 and gpt["fused_accum"] < 0.001


def test_largest_gap_is_relative_and_point_by_point():
    assert demo.largest_gap([1.0, 2.2, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(0.1)
    assert demo.largest_gap([1.0, 2.0], [1.0, 2.0]) == 0.0
    with pytest.raises(ValueError, match="different steps"):
        demo.largest_gap([1.0, 2.0], [1.0, 2.0, 3.0])


def _fake_example(fused):
    curves = {"large batch": [2.0, 1.0, 0.5], "fused_accum": fused}
    task = {"name": "fake task", "curves": curves, "x_label": "steps", "x_step": 1, "y_label": "loss"}
    return types.SimpleNamespace(run=lambda quick, steps: [task])


@pytest.mark.parametrize("fused, status", [([2.0, 1.0, 0.5], 0), ([2.0, 1.0, 0.52], 1)])
def test_the_demo_fails_when_fused_accum_strays_from_the_large_batch(fused, status, monkeypatch,
                                                                      tmp_path, capsys):
    monkeypatch.setattr(demo, "SCRIPTS", [("fake", None)])
    monkeypatch.setattr(demo, "load_example", lambda name: _fake_example(fused))
    assert demo.run(argparse.Namespace(quick=True, out=tmp_path)) == status
    assert json.loads((tmp_path / "demo.json").read_text())["tasks"][0]["name"] == "fake task"
    assert (tmp_path / "fake_task.png").exists()
    assert ("strayed more than 1%" in capsys.readouterr().err) == bool(status)


def test_a_missing_requirement_is_named_before_any_training(monkeypatch, tmp_path, capsys):
    def missing(name):
        raise ImportError("No module named 'sklearn'")
    monkeypatch.setattr(demo, "load_example", missing)
    assert demo.run(argparse.Namespace(quick=True, out=tmp_path)) == 2
    assert "needs scikit-learn: pip install scikit-learn" in capsys.readouterr().err
    assert not (tmp_path / "demo.json").exists()


@pytest.mark.parametrize("name", [name for name, _ in demo.SCRIPTS])
def test_the_scripts_of_examples_run_the_examples_of_the_package(name, tmp_path):
    """examples/<name>.py (in a clone) is fused_accum.examples.<name> run as a script: the same
    options, wherever it is run from; the demo never reads examples/."""
    script = ROOT / "examples" / f"{name}.py"
    assert f"from fused_accum.examples.{name} import main" in script.read_text()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                       os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    module = demo.load_example(name)
    assert module.__name__ == f"fused_accum.examples.{name}"
    assert module.__doc__.splitlines()[0][:40] in " ".join(run.stdout.split())
    assert "--quick" in run.stdout
