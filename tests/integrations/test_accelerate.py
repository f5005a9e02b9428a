"""accelerate's accumulate() loops with a fused optimizer and follow(): accelerate's windows,
clipping through accelerator.clip_grad_norm_ into the kernels, against the stock recipe with
torch's AdamW (fp32: relative 1e-4 or better), on the CPU, alone and on two DDP ranks."""
import os

import pytest
import torch
from torch import nn

accelerate = pytest.importorskip("accelerate", reason="the accelerate extra is not installed")

import fused_accum  # noqa: E402
from fused_accum.integrations.accelerate import follow  # noqa: E402
from fused_accum.linear import fused_modules  # noqa: E402
from integration_helpers import TORCHRUN, assert_ranks_match_stock, assert_same_model  # noqa: E402

VOCAB, DIM, K = 29, 16, 3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(VOCAB, DIM), nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM),
                         nn.GELU(), nn.Linear(2 * DIM, VOCAB))


def _loader(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randint(0, VOCAB, (5,), generator=g), torch.randint(0, VOCAB, (5,), generator=g))
            for _ in range(2 * n)]
    return torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)


def train(fused: bool, epochs: int = 2, clip: float | None = 0.05, followed: bool = True,
          scaler: bool = False, fuse_linear: bool = True, **accelerator_kwargs):
    """The documented recipe; with fused, one changed line and follow() (unless ``followed`` is
    False: then accelerate's windows sum .grad as with torch's optimizer)."""
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=K, cpu=True,
                                         **accelerator_kwargs)
    model = _model()
    if fused:
        optimizer = fused_accum.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1,
                                      loss_scale="dynamic" if scaler else None)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, _loader(), scheduler)
    if scaler:   # what accelerate makes for fp16 on a GPU; follow() hands it to the optimizer
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = follow(accelerator, optimizer, fuse_linear=fuse_linear) if fused and followed else None
    norms = []
    for _ in range(epochs):
        for tokens, targets in loader:
            with accelerator.accumulate(model):
                loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
                accelerator.backward(loss)
                norm = None
                if accelerator.sync_gradients and clip is not None:
                    norm = accelerator.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                if norm is not None:   # read after the step (fused: the step computed it)
                    norms.append(float(norm))
    return accelerator.unwrap_model(model), norms, opt


@pytest.mark.parametrize("fuse_linear", [True, False])
def test_accumulate_loops_match_the_stock_recipe(fuse_linear):
    stock, stock_norms, _ = train(fused=False)
    ours, norms, opt = train(fused=True, fuse_linear=fuse_linear)
    assert fused_modules(ours) == (["2", "4"] if fuse_linear else [])
    assert_same_model(ours, stock)
    assert len(norms) == len(stock_norms) == 8 and min(stock_norms) > 0.05   # clipping acts
    torch.testing.assert_close(norms, stock_norms, rtol=1e-5, atol=0)
    assert opt.max_grad_norm == 0.05 and opt.accumulation_steps == 1


def test_without_clipping():
    stock, _, _ = train(fused=False, clip=None)
    ours, _, opt = train(fused=True, clip=None)
    assert opt.max_grad_norm is None
    assert_same_model(ours, stock)


def test_follow_refuses_what_would_train_wrongly():
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=K, cpu=True)
    model = _model()
    with pytest.raises(ValueError, match=r"accumulation_steps=3.*gradient_accumulation_steps"):
        follow(accelerator, fused_accum.AdamW(model.parameters(), accumulation_steps=3))
    with pytest.raises(TypeError, match="fused_accum optimizer"):
        follow(accelerator, accelerator.prepare(torch.optim.AdamW(model.parameters())))
    opt = fused_accum.AdamW(model.parameters())
    follow(accelerator, opt)
    with pytest.raises(ValueError, match="norm_type"):
        accelerator.clip_grad_norm_(model.parameters(), 1.0, norm_type=1)
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=K, cpu=True)
    opt = follow(accelerator, fused_accum.AdamW(model.parameters(), max_grad_norm=0.5))
    with pytest.raises(ValueError, match=r"max_grad_norm=0.5 .*clip_grad_norm_ asks for 1.0; set one"):
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
    accelerator.clip_grad_norm_(model.parameters(), 0.5)   # the same clipping, said twice: fine
    assert opt.max_grad_norm == 0.5


def test_without_follow_a_fused_optimizer_is_a_torch_optimizer():
    """accumulation_steps=1 leaves gradients in .grad: accelerate's windows sum and clip them as
    with torch's AdamW, and the fused kernels step them."""
    stock, stock_norms, _ = train(fused=False)
    ours, norms, _ = train(fused=True, followed=False)
    assert_same_model(ours, stock)
    torch.testing.assert_close(norms, stock_norms, rtol=1e-5, atol=0)


def test_accelerator_clipping_what_a_fused_optimizer_takes_is_refused():
    """accelerator.clip_grad_norm_ skips parameters whose .grad is None: around a fused optimizer
    that takes gradients as they arrive (accumulation_steps > 1) it would clip nothing and return
    0.  Refused; other parameters clip."""
    accelerator = accelerate.Accelerator(cpu=True)
    model = _model()
    inner = fused_accum.AdamW(model.parameters(), accumulation_steps=2)
    model, opt = accelerator.prepare(model, inner)
    tokens, targets = next(iter(_loader()))
    accelerator.backward(nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()))
    for clip in (lambda: accelerator.clip_grad_norm_(model.parameters(), 1.0),
                 lambda: accelerator.clip_grad_value_(model.parameters(), 1.0)):
        with pytest.raises(RuntimeError, match=r"accelerator.clip_grad_(norm|value)_.*max_grad_norm="):
            clip()
    other = nn.Linear(3, 3)
    other(torch.randn(2, 3)).sum().backward()
    assert accelerator.clip_grad_norm_(other.parameters(), 1e-3) > 0   # not held: clipped as before
    opt.step()   # the window is still whole
    assert inner.micro_batches == 1


def test_fp16_grad_scaler_becomes_the_optimizer_s_loss_scaling():
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=K, cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)   # fp16 on a GPU does this
    model = _model()
    with pytest.raises(ValueError, match="loss_scale='dynamic'"):
        follow(accelerator, fused_accum.AdamW(model.parameters()))
    opt = fused_accum.AdamW(model.parameters(), loss_scale="dynamic")
    follow(accelerator, opt)
    assert accelerator.scaler is None and opt.loss_scale is not None


DDP_SCRIPT = r'''
import os, sys, torch
sys.path.insert(0, {tests!r})
from test_accelerate import train
model, norms, _ = train(fused=sys.argv[1] == "fused", epochs=1)
import torch.distributed as dist
assert dist.get_world_size() == 2
torch.save([p.detach() for p in model.parameters()], f"{{sys.argv[2]}}.rank{{dist.get_rank()}}")
dist.barrier()
dist.destroy_process_group()
# gloo's threads abort now and then in the interpreter's teardown ("terminate called without an
# active exception", stock runs too): everything is saved, so skip the teardown
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
'''


def test_the_loss_scaling_backward_divides_by_accelerate_s_window():
    """Under fp16 follow() routes accelerator.backward through the optimizer's loss scaling; it
    divides the loss by accelerate's gradient_accumulation_steps as accelerate's own does."""
    stock, stock_norms, _ = train(fused=False, epochs=1)
    ours, norms, opt = train(fused=True, epochs=1, scaler=True)
    assert opt.loss_scale is not None
    torch.testing.assert_close(norms, stock_norms, rtol=1e-5, atol=0)
    assert_same_model(ours, stock)


def test_ddp_on_two_cpu_ranks_as_the_stock_recipe(tmp_path):
    assert_ranks_match_stock(tmp_path, DDP_SCRIPT.format(tests=os.path.dirname(__file__)),
                             *TORCHRUN)


def test_the_readme_spelling_works_after_a_plain_import():
    """README writes fused_accum.integrations.accelerate.follow(...) after `import fused_accum`;
    a fresh interpreter, so that no earlier import has loaded the submodule."""
    import subprocess
    import sys
    code = ("import sys, fused_accum; assert 'fused_accum.integrations' not in sys.modules; "
            "print(fused_accum.integrations.accelerate.follow.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "follow", out.stderr
