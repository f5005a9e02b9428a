"""Low-precision parameters: fp32 accumulation and fp32 master weights."""
import pytest
import torch

import fused_accum
from helpers import clone, lm_loss, make_batches, make_model, train_large_batch

K = 8


def _windows():
    return [make_batches(s, K, 2) for s in range(70, 76)]


def _plain_bf16_accumulation(model, windows, lr):
    """The hand-written loop: bf16 .grad summed by autograd in bf16, torch AdamW on bf16."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for window in windows:
        for batch in window:
            (lm_loss(model, *batch) / len(window)).backward()
        opt.step()
        opt.zero_grad()
    return model


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def test_bf16_with_master_weights_beats_plain_bf16_accumulation(backend):
    # All runs start from the same bf16-representable weights; each error is the distance to the
    # fp32 large-batch run relative to how far that run moved, so rounding of the start point and
    # of the final bf16 copy do not hide what accumulation and master weights change.
    lr, windows = 1e-3, _windows()
    base = make_model(seed=70).to(torch.bfloat16).float()
    truth = train_large_batch(clone(base), lambda p: torch.optim.AdamW(p, lr=lr), windows)
    moved = (_flat(truth.parameters()) - _flat(base.parameters())).norm()
    error = lambda tensors: ((_flat(tensors) - _flat(truth.parameters())).norm() / moved).item()

    ours = clone(base).to(torch.bfloat16)
    opt = fused_accum.AdamW(ours.parameters(), lr=lr, accumulation_steps=K, backend=backend)
    for window in windows:
        for batch in window:
            lm_loss(ours, *batch).backward()
            opt.step()
    plain = _plain_bf16_accumulation(clone(base).to(torch.bfloat16), windows, lr)
    masters = [opt.state[p]["master_param"] for p in ours.parameters()]
    errors = {"fused_accum fp32 master": error(masters),
              "fused_accum bf16 parameter": error(ours.parameters()),
              "plain bf16 accumulation": error(plain.parameters())}
    print("\nerror vs the fp32 large-batch run, relative to its displacement: "
          + ", ".join(f"{k} {v:.3f}" for k, v in errors.items()))
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert errors["fused_accum fp32 master"] < errors["plain bf16 accumulation"] / 4
    assert errors["fused_accum bf16 parameter"] < errors["plain bf16 accumulation"]
    for p, m in zip(ours.parameters(), masters):
        assert torch.equal(p, m.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_without_master_weights_the_low_precision_parameter_is_updated_from_fp32_maths(dtype, backend):
    window = make_batches(75, 4, 2)
    base = make_model(seed=75).to(dtype)
    model = clone(base)
    opt = fused_accum.SGD(model.parameters(), lr=0.5, momentum=0.9, accumulation_steps=4,
                          master_weights=False, loss_scale=None, backend=backend)
    for batch in window:
        lm_loss(model, *batch).backward()
        opt.step()
    assert opt.stepped
    assert all("master_param" not in opt.state[p] for p in model.parameters())
    # Expected: fp32 SGD on the same fp32 gradient mean, rounded once to the parameter dtype.
    probe = clone(base)
    (sum(lm_loss(probe, *b) for b in window) / len(window)).backward()
    for p, before, q in zip(model.parameters(), base.parameters(), probe.parameters()):
        expected = (before.float() - 0.5 * q.grad.float()).to(dtype)
        ulp = torch.finfo(dtype).eps * expected.float().abs().max()
        assert (p.float() - expected.float()).abs().max() <= 2 * ulp
        assert p.dtype == dtype


def test_mixed_dtypes_make_separate_buckets(backend):
    model = make_model(seed=76)
    model.head.to(torch.bfloat16)
    opt = fused_accum.SGD(model.parameters(), lr=0.1, backend=backend)
    assert sorted(str(b.dtype) for b in opt._buffers.buckets) == ["torch.bfloat16", "torch.float32"]
