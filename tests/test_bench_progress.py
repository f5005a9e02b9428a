"""The bench keeps what it measured when stopped, says what it is doing during long stages,
reports its own repeat-to-repeat spread next to every ratio, and explains its options.
No timing assertions: nothing here fails because the machine is slow."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from fused_accum.bench import harness
from fused_accum.bench.report import noise_warnings, tables, windows_table


def test_a_windows_run_killed_after_its_first_configuration_keeps_that_configuration(tmp_path):
    out, log = tmp_path / "windows.json", tmp_path / "bench.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fused_accum", "bench", "--level", "windows", "--quick",
             "--repeats", "1", "--configs", "e,d", "--json", str(out), "--progress-s", "0.2"],
            stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 900   # against a hang only
        rows = []
        while not rows and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            if out.exists():   # replaced whole, never written in place: always valid JSON
                rows = json.loads(out.read_text())["windows"]
        still_running = proc.poll() is None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)   # the bench and its configuration's process
        proc.wait()
    text = log.read_text()
    assert still_running, f"no rows were written before the run ended:\n{text[-3000:]}"
    data = json.loads(out.read_text())
    assert data["complete"] is False and data["failures"] == []
    assert [r["config"] for r in data["windows"]] == ["e"] * 4   # in the order asked for
    assert {r["pipeline"] for r in data["windows"]} == {"fused_accum", "fused_accum fused",
                                                        "torch best", "torch naive"}
    assert all(r["time_s"] > 0 for r in data["windows"])
    assert "| (e) parameter-dominated fp32 model" in text   # printed as soon as measured
    assert "still on windows: (e)" in text                  # the heartbeat, at --progress-s


def test_the_heartbeat_speaks_only_after_a_silence_of_its_interval():
    now, said = [0.0], []
    beat = harness.Heartbeat(30, clock=lambda: now[0], say=said.append)
    now[0] = 100
    assert beat.check() is None   # no stage begun: nothing to say
    beat.said(stage="windows: (e) timing")
    beat.detail = "repetition 3 of 15"
    now[0] = 129.9
    assert beat.check() is None
    now[0] = 130
    assert "still on windows: (e) timing: 30 s, repetition 3 of 15" in beat.check()
    now[0] = 150
    assert beat.check() is None   # 20 s after its own line
    beat.said()                   # a line from elsewhere (a child process) counts too
    now[0] = 179
    assert beat.check() is None
    now[0] = 180
    assert "timing: 80 s" in beat.check()
    beat.said(stage="windows: (f)")   # a new stage: its own clock, no stale detail
    now[0] = 215
    assert beat.check().endswith("still on windows: (f): 35 s")
    assert len(said) == 3


def test_each_ratio_carries_its_paired_spread_and_whether_it_includes_one():
    key = "time_vs_torch_best"
    # Both contenders slow down together in repetitions 2 and 4: the medians' ranges overlap,
    # but repetition by repetition ours is 10% slower every time.
    base = harness.Timing.of([1.0, 2.0, 1.0, 2.0, 1.0])
    steady = harness.Timing.of([1.1, 2.2, 1.1, 2.2, 1.1])
    noisy = harness.Timing.of([0.8, 2.4, 0.9, 2.2, 1.1])
    clear = harness.ratio_fields(key, steady, base, is_base=False)
    assert clear[f"{key}_p10"] == pytest.approx(1.1) and clear[f"{key}_p90"] == pytest.approx(1.1)
    assert clear[f"{key}_within_noise"] is False
    unclear = harness.ratio_fields(key, noisy, base, is_base=False)
    assert unclear[f"{key}_p10"] < 1.0 < unclear[f"{key}_p90"]
    assert unclear[f"{key}_within_noise"] is True
    reference = harness.ratio_fields(key, base, base, is_base=True)
    assert reference[key] == 1.0 and reference[f"{key}_within_noise"] is None

    def row(pipeline, fields):
        return dict(config="e", describe="wide", parameters=1e6, tensors=2, k=4, pipeline=pipeline,
                    time_s=1.0, time_p10_s=0.9, time_p90_s=1.1, repeats=5, bytes_per_parameter=64,
                    gb_per_s=1.0, fraction_of_copy=0.5, peak_memory_bytes=2**20,
                    peak_memory_vs_torch_best=1.0, max_rel_diff_vs_torch_best=0.0, **fields)
    rows = [row("fused_accum", clear), row("torch best", reference), row("torch naive", unclear)]
    table = windows_table(rows).splitlines()
    assert table[2].endswith("| 1.10x (1.10-1.10) | 64 | 1.0 | 50% | 1 (1.00x) | 0.0e+00 |")
    assert "| 1.00x |" in table[3]
    assert re.search(r"\| 1\.\d\dx \(0\.\d\d-1\.\d\d\) \* \|", table[4])
    assert "includes 1.0" in table[-1] and "over 5 repetitions" in table[-1]
    result = {"machine": {"cpu": "x", "torch_threads": 1, "torch": "t", "fused_accum": "f",
                          "date": "d"}, "copy_bandwidth_gb_per_s": 1.0, "ops": [], "comm": [],
              "windows": rows}
    assert noise_warnings(result) == [
        "warning: 1 of 2 windows time ratios are within this run's noise (their p10-p90 "
        "includes 1.0, marked *): (e) torch naive"]
    assert noise_warnings(result)[0] in tables(result)
    few = [dict(r, repeats=2) for r in rows]
    assert "from 2 repetitions: too few" in windows_table(few)
    assert noise_warnings({**result, "windows": few})[-1].startswith(
        "warning: the windows spreads come from 2 repetitions")
    old = [{k: v for k, v in r.items() if not k.startswith(f"{key}_")} for r in rows]
    assert "| 1.10x |" in windows_table(old)   # results written before the spreads still print


def test_every_bench_option_has_a_description_and_its_default(capsys):
    from fused_accum.__main__ import main
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    blocks = re.split(r"\n(?=  -)", text.split("options:", 1)[1].strip("\n"))
    options = {}
    for block in blocks:
        name = block.split()[0].rstrip(",")
        options[name] = " ".join(block.split())
    assert {"--device", "--quick", "--level", "--backend", "--configs", "--repeats", "--json",
            "--plot", "--config-timeout", "--progress-s"} <= set(options)
    for name, block in options.items():
        if name == "-h":
            continue
        assert "default" in block, block
        described = re.sub(r"^\S+( [A-Z_{},a-z]+)?", "", block).strip()   # less name and metavar
        assert len(described.split()) >= 3, block
