"""Bad input: a clear error naming the argument or parameter, and an optimizer that stays usable
with every accumulated gradient kept."""
import pytest
import torch
from torch import nn

import fused_accum
from fused_accum.placeholders import is_placeholder
from helpers import IGNORE, assert_same_params, clone, lm_loss, make_batches, make_model


def _window_in_progress(seed, k, backend, named=False, algorithm="AdamW"):
    """A window (AdamW unless said) with its first micro-batch accumulated, the remaining
    micro-batches, and the large-batch result the window must reach."""
    batches = make_batches(seed, k, 2)
    base = make_model(seed=seed)
    expected = clone(base)
    ref = getattr(torch.optim, algorithm)(expected.parameters(), lr=1e-2)
    (sum(lm_loss(expected, *b) for b in batches) / len(batches)).backward()
    ref.step()
    model = clone(base)
    params = model.named_parameters() if named else model.parameters()
    opt = getattr(fused_accum, algorithm)(params, lr=1e-2, accumulation_steps=k, backend=backend)
    lm_loss(model, *batches[0]).backward()
    opt.step()
    return model, opt, batches[1:], expected


def _finish(model, opt, batches, expected):
    for batch in batches:
        lm_loss(model, *batch).backward()
        opt.step()
    assert opt.stepped
    assert_same_params(model, expected)


def test_a_window_that_turns_sparse_midway_gives_the_large_batch(backend):
    # SGD takes sparse gradients as torch.SGD does (Adam refuses them in torch's words: test_sparse)
    model, opt, rest, expected = _window_in_progress(60, 3, backend, named=True, algorithm="SGD")
    model.embed.sparse = True   # the rest of the window: nn.Embedding hands out sparse gradients
    _finish(model, opt, rest, expected)


def test_non_leaf_parameter_is_refused_by_name():
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*not a leaf"):
        fused_accum.SGD([w, w * 2])
    with pytest.raises(ValueError, match=r"'doubled'.*not a leaf"):
        fused_accum.SGD([("w", w), ("doubled", w * 2)])


def test_bad_param_group_mid_window_changes_nothing(backend):
    model, opt, rest, expected = _window_in_progress(61, 2, backend)
    extra = torch.randn(4, requires_grad=True)
    with pytest.raises(ValueError, match="not a leaf"):
        opt.add_param_group({"params": [extra * 3]})
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [extra], "lr": -1.0})
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\].*float64"):
        opt.add_param_group({"params": [torch.randn(2, dtype=torch.float64, requires_grad=True)]})
    assert len(opt.param_groups) == 1
    _finish(model, opt, rest, expected)


@pytest.mark.parametrize("plain_first", [True, False])
def test_mixing_num_items_with_plain_backward_in_a_window(plain_first, backend):
    batches = make_batches(62, 3, 2, pad_fraction=0.0 if plain_first else 0.3)
    base = make_model(seed=62)
    expected = clone(base)
    ref = torch.optim.AdamW(expected.parameters(), lr=1e-2)
    from helpers import concat
    lm_loss(expected, *concat(batches)).backward()
    ref.step()
    model = clone(base)
    opt = fused_accum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=3, backend=backend)
    count = lambda y: (y != IGNORE).sum()
    first = lm_loss(model, *batches[0])
    if plain_first:
        first.backward()
        opt.step()
        with pytest.raises(ValueError, match="num_items"):
            opt.backward(lm_loss(model, *batches[1]), num_items=count(batches[1][1]))
        for batch in batches[1:]:
            lm_loss(model, *batch).backward()
            opt.step()
    else:
        opt.backward(first, num_items=count(batches[0][1]))
        opt.step()
        with pytest.raises(RuntimeError, match="mixes opt.backward"):
            lm_loss(model, *batches[1]).backward()
        for batch in batches[1:]:
            opt.backward(lm_loss(model, *batch), num_items=count(batch[1]))
            opt.step()
    assert opt.stepped
    assert_same_params(model, expected)


@pytest.mark.parametrize("num_items,error", [
    (-1, ValueError), (float("nan"), ValueError), (torch.ones(2), ValueError), ("3", TypeError)])
def test_bad_num_items(num_items, error, backend):
    model = make_model(seed=63)
    opt = fused_accum.AdamW(model.parameters(), accumulation_steps=2, backend=backend)
    with pytest.raises(error, match="num_items"):
        opt.backward(lm_loss(model, *make_batches(1, 1, 2)[0]), num_items=num_items)
    assert all(p.grad is None for p in model.parameters())
    assert opt.micro_batches == 0


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "4", None])
def test_accumulation_steps_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="accumulation_steps"):
        fused_accum.AdamW(make_model(0).parameters(), accumulation_steps=value)


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True])
def test_max_grad_norm_must_be_positive(value):
    with pytest.raises(ValueError, match="max_grad_norm"):
        fused_accum.SGD(make_model(0).parameters(), max_grad_norm=value)


def test_unknown_backend(monkeypatch):
    with pytest.raises(ValueError, match=r"backend: unknown backend 'cuda-magic'"):
        fused_accum.AdamW(make_model(0).parameters(), backend="cuda-magic")
    monkeypatch.setenv("FUSED_ACCUM_BACKEND", "nope")
    with pytest.raises(ValueError, match="FUSED_ACCUM_BACKEND='nope'"):
        fused_accum.AdamW(make_model(0).parameters())


@pytest.mark.parametrize("cls,kwargs,name", [
    (fused_accum.SGD, dict(lr=-0.1), "lr"),
    (fused_accum.SGD, dict(momentum=-0.5), "momentum"),
    (fused_accum.SGD, dict(nesterov=True), "nesterov"),
    (fused_accum.SGD, dict(weight_decay=-1), "weight_decay"),
    (fused_accum.Adam, dict(betas=(1.0, 0.999)), r"betas\[0\]"),
    (fused_accum.Adam, dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (fused_accum.AdamW, dict(eps=-1e-8), "eps"),
    (fused_accum.AdamW, dict(differentiable=True), "differentiable"),
    (fused_accum.AdamW, dict(master_weights="yes"), "master_weights"),
])
def test_bad_hyper_parameters_are_named(cls, kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        cls(make_model(0).parameters(), **kwargs)


def test_fused_accumulator_argument_errors():
    model = make_model(0)
    with pytest.raises(TypeError, match="optimizer"):
        fused_accum.FusedAccumulator(model)
    with pytest.raises(TypeError, match="already a fused_accum optimizer"):
        fused_accum.FusedAccumulator(fused_accum.SGD(model.parameters()))
    with pytest.raises(ValueError, match="master_weights=True.*RMSprop"):
        fused_accum.FusedAccumulator(torch.optim.RMSprop(model.parameters()), master_weights=True)


def test_deleting_the_optimizer_hands_gradients_back():
    model = nn.Linear(3, 2)
    opt = fused_accum.SGD(model.parameters(), accumulation_steps=2)
    model(torch.randn(4, 3)).sum().backward()
    assert is_placeholder(model.weight.grad)
    del opt   # its placeholders leave with it
    model(torch.randn(4, 3)).sum().backward()
    assert model.weight.grad is not None and not is_placeholder(model.weight.grad)


@pytest.mark.parametrize("clip", ["clip_grad_norm_", "clip_grad_value_"])
def test_clipping_by_hand_what_the_optimizer_holds_is_refused_not_silently_skipped(clip):
    """.grad is empty between backward() and step(): torch's clipping would clip nothing."""
    model = make_model(seed=3)
    opt = fused_accum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=2)
    lm_loss(model, *make_batches(3, 1, 2)[0]).backward()
    with pytest.raises(RuntimeError, match=rf"torch.nn.utils.{clip} was called.*max_grad_norm="):
        getattr(torch.nn.utils, clip)(model.parameters(), 1.0)
    opt.step()   # the optimizer is still usable and the micro-batch still counted
    lm_loss(model, *make_batches(4, 1, 2)[0]).backward()
    opt.step()
    assert opt.stepped
    other = torch.nn.Linear(3, 3)   # parameters no fused optimizer holds: torch's own behaviour
    other(torch.randn(2, 3)).sum().backward()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in other.parameters()]))
    result = getattr(torch.nn.utils, clip)(other.parameters(), 1e-3)
    if clip == "clip_grad_norm_":
        torch.testing.assert_close(result, expected)
    else:
        assert max(p.grad.abs().max() for p in other.parameters()) == 1e-3
