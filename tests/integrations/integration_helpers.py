"""What the framework tests share: comparing trained models, and two-rank runs under torchrun."""
import subprocess
import sys

import torch


def assert_same_model(a, b, rtol=1e-4):
    """Every parameter of ``a`` within ``rtol`` of ``b``, relative to the largest parameter of the
    model (a bias that starts at zero has no scale of its own)."""
    pairs = list(zip(a.named_parameters(), b.named_parameters()))
    scale = max(q.detach().abs().max().item() for _, (_, q) in pairs)
    for (name, p), (_, q) in pairs:
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=rtol * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def run_script(tmp_path, script_text, which, *launcher):
    """Run ``script_text`` with arguments (which, OUT); returns each rank's saved parameters
    (the script saves them to OUT.rank<r>, or OUT and OUT.rank1)."""
    script = tmp_path / "train.py"
    script.write_text(script_text)
    out = tmp_path / which
    run = subprocess.run([sys.executable, *launcher, str(script), which, str(out)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}") for r in range(2)]


def assert_ranks_match_stock(tmp_path, script_text, *launcher):
    """The fused run equals the stock one on every rank (relative 1e-4), and its ranks agree."""
    stock = run_script(tmp_path, script_text, "stock", *launcher)
    fused = run_script(tmp_path, script_text, "fused", *launcher)
    for ours, theirs in zip(fused, stock):
        scale = max(q.abs().max().item() for q in theirs)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-4 * scale)
    for p, q in zip(*fused):
        assert torch.equal(p, q)


TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")   # a free port
