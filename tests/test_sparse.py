"""Sparse gradients (nn.Embedding(sparse=True)) are summed sparse and stepped as torch steps them."""
import copy
import io

import pytest
import torch
from torch import nn

import fused_accum
from helpers import FailsInBackward

VOCAB, DIM = 60, 5


class SparseLM(nn.Module):
    def __init__(self, sparse: bool = True):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, sparse=sparse)
        self.head = nn.Linear(DIM, 3)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens))).square().mean()


def _model(seed):
    torch.manual_seed(seed)
    return SparseLM()


def _tokens(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB // 2, (7,), generator=g) for _ in range(n)]


def _dense_twin(model):
    twin = copy.deepcopy(model)
    twin.embed.sparse = False
    return twin


def _large_batch(model, windows, max_grad_norm=None, **kwargs):
    """torch.optim.SGD with dense gradients, one step per window on its mean."""
    twin = _dense_twin(model)
    opt = torch.optim.SGD(twin.parameters(), **kwargs)
    for window in windows:
        (sum(twin(t) for t in window) / len(window)).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(twin.parameters(), max_grad_norm)
        opt.step()
        opt.zero_grad()
    return twin


def _assert_close(expected, actual, rtol=1e-5):
    for (name, e), a in zip(expected.named_parameters(), actual.parameters()):
        scale = e.detach().abs().max().item()
        torch.testing.assert_close(a.detach(), e.detach(), rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


HYPER = pytest.mark.parametrize(
    "hyper", [dict(lr=0.5), dict(lr=0.5, momentum=0.9),
              dict(lr=0.5, momentum=0.5, nesterov=True, weight_decay=0.01)],
    ids=["plain", "momentum", "nesterov-decay"])


@HYPER
@pytest.mark.parametrize("clip", [None, 0.05])
def test_sparse_sgd_gives_the_large_batch(hyper, clip, backend, hooks):
    _train_and_compare(3, hyper, clip, backend)


@HYPER
@pytest.mark.parametrize("clip", [None, 0.05])
def test_sparse_sgd_with_gradients_in_grad_is_torch_sgd(hyper, clip, backend):
    _train_and_compare(1, hyper, clip, backend)


def _train_and_compare(k, hyper, clip, backend):
    model = _model(1)
    windows = [_tokens(10 + w, k) for w in range(3)]
    expected = _large_batch(model, windows, clip, **hyper)
    opt = fused_accum.SGD(model.parameters(), **hyper, accumulation_steps=k, max_grad_norm=clip,
                          backend=backend)
    for window in windows:
        for tokens in window:
            model(tokens).backward()
            if k > 1:   # summed sparse, never in a dense accumulator, and never coalesced
                (bucket, i), = opt._window.sparse.sums
                assert bucket.params[i] is model.embed.weight and not bucket.touched[i]
                assert not opt._window.sparse.sums[(bucket, i)].coalesced
            opt.step()
            opt.zero_grad()
    _assert_close(expected, model)


def _large_batch_norms(model, windows):
    """The norm of each window's mean gradient, as torch's clip_grad_norm_ computes it."""
    twin, norms = _dense_twin(model), []
    for window in windows:
        twin.zero_grad()
        (sum(twin(t) for t in window) / len(window)).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(twin.parameters(), float("inf")))
    return norms


@pytest.mark.parametrize("read", ["at once", "late", "live"])
def test_grad_norm_of_a_sparse_window_is_the_large_batch_norm(read, backend):
    """Without clipping the sparse part of the norm waits for grad_norm's first read; read late,
    with the next window's sparse gradients arriving, it is still its own window's;
    live_grad_norm() makes every window compute it at its end."""
    model = _model(11)
    windows = [_tokens(110 + w, 3) for w in range(3)]
    expected = _large_batch_norms(model, windows)
    opt = fused_accum.SGD(model.parameters(), lr=0.0, accumulation_steps=3, backend=backend)
    live = opt.live_grad_norm() if read == "live" else None
    for w, window in enumerate(windows):
        for m, tokens in enumerate(window):
            model(tokens).backward()
            if read == "late" and w > 0 and m == 0:
                torch.testing.assert_close(opt.grad_norm, expected[w - 1], rtol=1e-5, atol=0)
            opt.step()
        if read != "late":
            norm = live if read == "live" else opt.grad_norm
            torch.testing.assert_close(norm, expected[w], rtol=1e-5, atol=0)
    torch.testing.assert_close(opt.grad_norm, expected[-1], rtol=1e-5, atol=0)


@pytest.mark.parametrize("sparse", [True, False])
def test_a_sum_of_squares_beyond_fp32_skips_a_clipped_window(sparse, backend):
    """Finite gradients whose norm overflows fp32 skip the window, sparse as dense (the sparse
    part of the norm used to miss the check: the window stepped with clip 0, its weight decay
    applied)."""
    torch.manual_seed(14)
    embed, head = nn.Embedding(VOCAB, DIM, sparse=sparse), nn.Linear(DIM, 1)
    params = list(embed.parameters()) + list(head.parameters())
    before = [p.detach().clone() for p in params]
    opt = fused_accum.SGD(params, lr=0.1, weight_decay=0.1, accumulation_steps=2,
                          max_grad_norm=1.0, backend=backend)
    for _ in range(2):
        (head(embed(torch.tensor([1, 2]))).sum() + 1e20 * embed(torch.tensor([3])).sum()).backward()
        opt.step()
    assert opt.stepped and opt.skipped_steps == 1
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("flag", [1.0, 2.0])
def test_a_grad_scalers_inf_flag_skips_the_sparse_step(flag, backend):
    """torch.amp.GradScaler hands step() the sum of its devices' flags: 2 skips as 1 does (the
    sparse step once ran backwards on 2)."""
    model = _model(13)
    before = [p.detach().clone() for p in model.parameters()]
    opt = fused_accum.SGD(model.parameters(), lr=0.5, backend=backend)
    model(_tokens(130, 1)[0]).backward()
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(flag)   # as GradScaler.step
    opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert opt.state[model.embed.weight]["step"].item() == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("k", [1, 3])
def test_a_non_finite_sparse_gradient_skips_the_window(value, k, backend):
    """Only the embedding has a gradient, so only the sparse check can see the bad element."""
    torch.manual_seed(12)
    embed = nn.Embedding(VOCAB, DIM, sparse=True)
    before = embed.weight.detach().clone()
    opt = fused_accum.SGD(embed.parameters(), lr=0.5, accumulation_steps=k, backend=backend)
    for m, tokens in enumerate(_tokens(120, k)):
        upstream = torch.randn(len(tokens), DIM)
        if m == k - 1:
            upstream[3, 2] = value
        (embed(tokens) * upstream).sum().backward()
        opt.step()
    assert opt.stepped and opt.skipped_steps == 1
    assert torch.equal(embed.weight.detach(), before)
    assert not torch.isfinite(opt.grad_norm)


def test_num_items_and_loss_scaling_weigh_sparse_gradients(backend):
    model = _model(2)
    window = _tokens(20, 3)
    counts = [3.0, 1.0, 5.0]
    twin = _dense_twin(model)
    ref = torch.optim.SGD(twin.parameters(), lr=0.5)
    (sum(twin(t) * n for t, n in zip(window, counts)) / sum(counts)).backward()
    ref.step()
    opt = fused_accum.SGD(model.parameters(), lr=0.5, accumulation_steps=3, loss_scale=64.0,
                          backend=backend)
    for tokens, n in zip(window, counts):
        opt.backward(model(tokens), num_items=n)
        opt.step()
    assert opt.stepped
    _assert_close(twin, model)


def test_adam_refuses_sparse_gradients_as_torch_does_and_changes_nothing(backend):
    model = _model(3)
    before = copy.deepcopy(model)
    opt = fused_accum.AdamW(model.parameters(), backend=backend)
    model(_tokens(30, 1)[0]).backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients.*SparseAdam"):
        opt.step()
    for a, b in zip(model.parameters(), before.parameters()):
        assert torch.equal(a, b)


def test_sparse_adam_through_the_accumulator(backend):
    model = _model(4)
    twin = copy.deepcopy(model)
    windows = [_tokens(40 + w, 2) for w in range(2)]
    ref = torch.optim.SparseAdam(list(twin.embed.parameters()), lr=1e-2)
    for window in windows:
        (sum(twin(t) for t in window) / 2).backward()
        ref.step()
        ref.zero_grad()
    opt = fused_accum.FusedAccumulator(torch.optim.SparseAdam(list(model.embed.parameters()),
                                                              lr=1e-2),
                                       accumulation_steps=2, backend=backend)
    for window in windows:
        for tokens in window:
            model(tokens).backward()
            opt.step()
    assert opt.stepped
    _assert_close(twin.embed, model.embed)


@pytest.mark.parametrize("pending", [True, False])
def test_a_mid_window_checkpoint_keeps_the_sparse_sums(pending, backend):
    model = _model(5)
    window = _tokens(50, 3)
    expected = _large_batch(model, [window], lr=0.5, momentum=0.9)
    opt = fused_accum.SGD(model.parameters(), lr=0.5, momentum=0.9, accumulation_steps=3,
                          backend=backend)
    model(window[0]).backward()
    opt.step()
    model(window[1]).backward()
    if not pending:
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    del opt
    buffer.seek(0)
    fresh = fused_accum.SGD(model.parameters(), lr=0.5, momentum=0.9, accumulation_steps=3,
                            backend=backend)
    fresh.load_state_dict(torch.load(buffer, weights_only=False))
    if pending:
        fresh.step()
    model(window[2]).backward()
    fresh.step()
    assert fresh.stepped
    _assert_close(expected, model)


def test_a_failed_pass_that_began_a_sparse_sum_is_undone(backend, hooks):
    model = _model(6)
    window = _tokens(60, 2)
    expected = _large_batch(model, [window], lr=0.5)
    opt = fused_accum.SGD(model.parameters(), lr=0.5, accumulation_steps=2, backend=backend)
    failing = FailsInBackward.apply(model.head.bias).sum() * 0   # built first: runs last
    with pytest.raises(Exception, match="fails here"):
        (model(window[0]) + failing).backward()   # the embedding's gradient came first
    for tokens in window:
        model(tokens).backward()
        opt.step()
    assert opt.stepped and opt.skipped_steps == 0
    _assert_close(expected, model)


def test_zero_grad_drops_a_stray_sparse_sum(backend, hooks):
    model = _model(7)
    window = _tokens(70, 2)
    expected = _large_batch(model, [window], lr=0.5)
    opt = fused_accum.SGD(model.parameters(), lr=0.5, accumulation_steps=2, backend=backend)
    model(_tokens(71, 1)[0]).backward()
    model.zero_grad()
    assert not opt._window.sparse
    for tokens in window:
        model(tokens).backward()
        opt.step()
    _assert_close(expected, model)


def test_loading_a_state_dict_replaces_the_sparse_sums_of_the_window_in_progress(backend):
    """load_state_dict replaces the window in progress with the saved one (here none, saved at a
    boundary): sparse sums of the window in progress go too, as dense ones do."""
    model = _model(8)
    window = _tokens(80, 2)
    expected = _large_batch(model, [window], lr=0.5)
    opt = fused_accum.SGD(model.parameters(), lr=0.5, accumulation_steps=2, backend=backend)
    boundary = copy.deepcopy(opt.state_dict())
    model(_tokens(81, 1)[0]).backward()   # a micro-batch the load throws away
    assert opt._window.sparse
    opt.load_state_dict(boundary)
    assert not opt._window.sparse and opt.micro_batches == 0
    for tokens in window:
        model(tokens).backward()
        opt.step()
    _assert_close(expected, model)


def test_sparse_gradients_of_bf16_parameters_are_refused(backend):
    model = _model(8).to(torch.bfloat16)
    opt = fused_accum.SGD(model.parameters(), lr=0.5, backend=backend)
    model(_tokens(80, 1)[0]).backward()
    with pytest.raises(RuntimeError, match="bfloat16 with a sparse gradient"):
        opt.step()


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_an_empty_sparse_gradient_steps_as_torch(k, momentum, backend):
    """A micro-batch without tokens gives a sparse gradient with no rows (so does torch's
    zero_grad(set_to_none=False) of a sparse .grad): a zero gradient, not an error."""
    torch.manual_seed(13)
    embed = nn.Embedding(VOCAB, DIM, sparse=True)
    twin = copy.deepcopy(embed)
    opt = fused_accum.SGD(embed.parameters(), lr=0.5, momentum=momentum, accumulation_steps=k,
                          backend=backend)
    ref = torch.optim.SGD(twin.parameters(), lr=0.5, momentum=momentum)
    windows = [[torch.tensor([3, 4, 4])] * k, [torch.empty(0, dtype=torch.long)] * k]
    for window in windows:
        for tokens in window:
            embed(tokens).square().sum().backward()
            opt.step()
            twin(tokens).square().sum().div(k).backward()
        ref.step()
        ref.zero_grad()
        opt.zero_grad()
        assert opt.stepped
        _assert_close(twin, embed)
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("unused", ["frozen", "unused"])
@pytest.mark.parametrize("hyper", [dict(lr=0.5, momentum=0.9), dict(lr=0.5, weight_decay=0.1)],
                         ids=["momentum", "decay"])
def test_a_zeroed_sparse_gradient_is_stepped_in_a_window_without_one(unused, hyper, backend):
    """zero_grad(set_to_none=False) leaves torch's sparse .grad zeroed: a window in which the
    embedding gets no gradient still steps it (momentum, weight decay), as torch does."""
    model = _model(14)
    windows = [_tokens(140 + w, 2) for w in range(2)]
    twin = _dense_twin(model)
    ref = torch.optim.SGD(twin.parameters(), **hyper)
    opt = fused_accum.SGD(model.parameters(), **hyper, accumulation_steps=2, backend=backend)
    for w, window in enumerate(windows):
        if w == 1:
            opt.zero_grad(set_to_none=False)
            ref.zero_grad(set_to_none=False)
            if unused == "frozen":
                model.embed.weight.requires_grad_(False)
                twin.embed.weight.requires_grad_(False)
        for tokens in window:
            loss = model(tokens) if w == 0 else model.head(torch.tanh(tokens.float()[:DIM])).sum()
            loss.backward()
            opt.step()
        twin_loss = [twin(t) if w == 0 else twin.head(torch.tanh(t.float()[:DIM])).sum()
                     for t in window]
        (sum(twin_loss) / 2).backward()
        ref.step()
    assert twin.embed.weight.grad is not None   # torch stepped its zeroed gradient
    _assert_close(twin, model)


def test_a_sparse_parameter_unfrozen_after_building_joins_the_window(backend):
    """Frozen when the optimizer was built, unfrozen later: its .grad from plain backward passes
    is sparse, and joins the window summed sparse."""
    model = _model(15)
    model.embed.weight.requires_grad_(False)
    window = _tokens(150, 2)
    expected = _dense_twin(model)
    opt = fused_accum.SGD(model.parameters(), lr=0.5, accumulation_steps=2, backend=backend)
    model.embed.weight.requires_grad_(True)
    expected.embed.weight.requires_grad_(True)
    for tokens in window:
        model(tokens).backward()
        opt.step()
    assert opt.stepped
    ref = torch.optim.SGD(expected.parameters(), lr=0.5)
    (sum(expected(t) for t in window) / 2).backward()
    ref.step()
    _assert_close(expected, model)


def test_a_checkpoint_after_zero_grad_kept_zeros_steps_a_sparse_sum_once(backend):
    """zero_grad(set_to_none=False) marks the embedding as holding a zeroed gradient; the next
    micro-batch's sparse sum, restored from a mid-window checkpoint, is its gradient: stepped
    once, not also as a dense zero (momentum and decay would act twice)."""
    model = _model(16)
    window = _tokens(160, 2)
    hyper = dict(lr=0.5, momentum=0.9, weight_decay=0.01)
    twin = _dense_twin(model)
    opt = fused_accum.SGD(model.parameters(), **hyper, accumulation_steps=3, backend=backend)
    model(window[0]).backward()
    model.zero_grad(set_to_none=False)   # discards that micro-batch (it only began sums)
    model(window[1]).backward()
    state = copy.deepcopy(opt.state_dict())
    opt.remove_hooks()
    fresh = fused_accum.SGD(model.parameters(), **hyper, accumulation_steps=3, backend=backend)
    fresh.load_state_dict(state)
    assert fresh.flush()
    ref = torch.optim.SGD(twin.parameters(), **hyper)
    twin(window[1]).backward()
    ref.step()
    _assert_close(twin, model)
