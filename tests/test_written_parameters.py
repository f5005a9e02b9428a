"""bf16 parameters with fp32 masters, written after the optimizer was built (load_state_dict,
reset_parameters, clamp_): training goes on from the written weights, as if the masters had been
rebuilt from them; the masters of the elements not written keep their sub-ulp detail."""
import pytest
import torch

import fused_accum
from fused_accum.kernels import reference
from helpers import lm_loss, make_batches, make_model, train_accumulated

K = 2                 # micro-batches per window
WINDOWS = 5
WRITTEN_AFTER = 2     # windows trained before the weights are written
SEED = 31


def _windows():
    return [make_batches(SEED + w, K, 2) for w in range(WINDOWS)]


def _load_other_weights(model):
    model.load_state_dict(make_model(SEED + 100, torch.bfloat16).state_dict())


def _reset_one_module(model):
    torch.manual_seed(7)   # reset_parameters draws from torch's generator: the same in every run
    model.up.reset_parameters()


def _clamp_one_parameter(model):
    model.down.weight.data.clamp_(-0.05, 0.05)


WRITES = {"load_state_dict": _load_other_weights, "reset_parameters": _reset_one_module,
          "clamp_": _clamp_one_parameter}

OPTIMIZERS = {
    "adamw": (lambda params, **kw: fused_accum.AdamW(params, lr=3e-3, weight_decay=0.1, **kw),
              lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1)),
    "sgd": (lambda params, **kw: fused_accum.SGD(params, lr=0.1, momentum=0.9, nesterov=True,
                                                 weight_decay=0.01, **kw),
            lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True,
                                           weight_decay=0.01)),
}


def _bits(t):
    return t.detach().view(torch.int16 if t.element_size() == 2 else torch.int32)


def _masters(opt, model):
    return [opt.state[p]["master_param"] for p in model.parameters()]


def _written_elements(model, before):
    """Per parameter, the elements a write changed (a write of the same bits is no write)."""
    return [_bits(p) != _bits(b) for p, b in zip(model.parameters(), before)]


def _fused_run(optimizer, write, backend, rebuild_masters=False, skip_first_after=False):
    """Trains WRITTEN_AFTER windows, writes the weights, trains the rest (from the one after the
    next with skip_first_after).  With rebuild_masters, the masters of the elements written are
    set to the written values by hand at the write."""
    model = make_model(SEED, torch.bfloat16)
    opt = OPTIMIZERS[optimizer][0](model.parameters(), accumulation_steps=K, backend=backend)
    windows = _windows()
    train_accumulated(model, opt, windows[:WRITTEN_AFTER])
    before = [p.detach().clone() for p in model.parameters()]
    for p, m in zip(before, _masters(opt, model)):   # what the kernels rely on
        assert torch.equal(_bits(p), _bits(m.to(p.dtype)))
    write(model)
    written = _written_elements(model, before)
    assert any(w.any() for w in written)
    if rebuild_masters:
        for p, m, w in zip(model.parameters(), _masters(opt, model), written):
            m.copy_(torch.where(w, p.detach().float(), m))
    train_accumulated(model, opt, windows[WRITTEN_AFTER + skip_first_after:])
    return model, opt


def _torch_run(optimizer, write):
    """torch.optim on fp32 copies of the bf16 parameters, stepping on the fp32 mean gradient of
    each window; at the write, the copies of the elements written are taken again from them."""
    model = make_model(SEED, torch.bfloat16)
    params = list(model.parameters())
    masters = [p.detach().float() for p in params]
    opt = OPTIMIZERS[optimizer][1](masters)
    for w, window in enumerate(_windows()):
        if w == WRITTEN_AFTER:
            before = [p.detach().clone() for p in params]
            write(model)
            for p, m, changed in zip(params, masters, _written_elements(model, before)):
                m.data.copy_(torch.where(changed, p.detach().float(), m))
        sums = [torch.zeros_like(m) for m in masters]
        for batch in window:
            lm_loss(model, *batch).backward()
            for s, p in zip(sums, params):
                s.add_(p.grad.float())
                p.grad = None
        for m, s in zip(masters, sums):
            m.grad = s / len(window)
        opt.step()
        with torch.no_grad():
            for p, m in zip(params, masters):
                p.copy_(m)
    return model, masters


@pytest.mark.parametrize("write", WRITES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_training_goes_on_from_written_weights(backend, optimizer, write):
    model, opt = _fused_run(optimizer, WRITES[write], backend)
    # bit for bit: the same optimizer whose masters were rebuilt by hand at the write
    rebuilt, rebuilt_opt = _fused_run(optimizer, WRITES[write], "reference", rebuild_masters=True)
    for p, q in zip(model.parameters(), rebuilt.parameters()):
        assert torch.equal(_bits(p), _bits(q))
    for m, n in zip(_masters(opt, model), _masters(rebuilt_opt, rebuilt)):
        assert torch.equal(_bits(m), _bits(n))
    # and torch.optim on fp32 copies taken again from the written weights, to fp32 rounding
    _, torch_masters = _torch_run(optimizer, WRITES[write])
    for (name, p), m, expected in zip(model.named_parameters(), _masters(opt, model), torch_masters):
        scale = expected.abs().max().item()
        torch.testing.assert_close(m, expected.detach(), rtol=0, atol=1e-5 * scale,
                                   msg=lambda text, name=name: f"{name}: {text}")


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_without_writes_every_step_is_the_one_before_written_parameters_were_followed(
        backend, optimizer, monkeypatch):
    """The reference with the rule it had before (the fp32 master, always) against ``backend``
    with today's rule: where nothing is written, the parameter always holds its master's rounding,
    and nothing may change."""
    model = make_model(SEED, torch.bfloat16)
    opt = OPTIMIZERS[optimizer][0](model.parameters(), accumulation_steps=K, backend=backend)
    train_accumulated(model, opt, _windows())

    current = reference._load_fp32

    def master_always(param, master):
        if master is not None and master.dtype == torch.float32:
            return master.clone()
        return current(param, master)

    monkeypatch.setattr(reference, "_load_fp32", master_always)
    before = make_model(SEED, torch.bfloat16)
    before_opt = OPTIMIZERS[optimizer][0](before.parameters(), accumulation_steps=K,
                                          backend="reference")
    train_accumulated(before, before_opt, _windows())
    for p, q in zip(model.parameters(), before.parameters()):
        assert torch.equal(_bits(p), _bits(q))
    for m, n in zip(_masters(opt, model), _masters(before_opt, before)):
        assert torch.equal(_bits(m), _bits(n))


@pytest.mark.parametrize("master_weights", [True, "compact"])
@pytest.mark.parametrize("write", ["load_state_dict", "clamp_"])
def test_a_window_with_lr_zero_keeps_the_written_weights(backend, master_weights, write):
    model = make_model(SEED, torch.bfloat16)
    opt = fused_accum.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, accumulation_steps=K,
                            master_weights=master_weights, backend=backend)
    windows = _windows()
    train_accumulated(model, opt, windows[:WRITTEN_AFTER])
    WRITES[write](model)
    written = [p.detach().clone() for p in model.parameters()]
    for group in opt.param_groups:
        group["lr"] = 0.0
    train_accumulated(model, opt, windows[WRITTEN_AFTER:WRITTEN_AFTER + 1])
    for p, w in zip(model.parameters(), written):
        assert torch.equal(_bits(p), _bits(w))


@pytest.mark.filterwarnings("ignore:.*skipped")
def test_a_skipped_window_keeps_the_written_weights(backend):
    model = make_model(SEED, torch.bfloat16)
    opt = fused_accum.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, accumulation_steps=K,
                            backend=backend)
    windows = _windows()
    train_accumulated(model, opt, windows[:WRITTEN_AFTER])
    _clamp_one_parameter(model)
    written = [p.detach().clone() for p in model.parameters()]
    for tokens, targets in windows[WRITTEN_AFTER]:
        (lm_loss(model, tokens, targets) * float("inf")).backward()
        opt.step()
    assert opt.skipped_steps == 1
    for p, w in zip(model.parameters(), written):
        assert torch.equal(_bits(p), _bits(w))
    # the next window trains from the written weights, as if the skipped one had not been
    train_accumulated(model, opt, windows[WRITTEN_AFTER + 1:])
    expected, _ = _fused_run("adamw", _clamp_one_parameter, "reference", rebuild_masters=True,
                             skip_first_after=True)
    for p, q in zip(model.parameters(), expected.parameters()):
        assert torch.equal(_bits(p), _bits(q))
