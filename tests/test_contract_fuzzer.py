"""The differential contract fuzzer (tests/contract_fuzzer.py) on a bounded number of seeds.

More seeds: ``python tests/contract_fuzzer.py --seeds 500``.  A failing seed prints its
configuration and a minimal sequence of calls that still fails.
"""
import pytest
import torch

import contract_fuzzer as fuzzer
from fused_accum.accumulation import Window
from fused_accum.optim.base import AccumulatingOptimizer

SEEDS = 36   # about a minute and a half on 2 CPU cores


@pytest.mark.parametrize("seed", range(SEEDS))
def test_a_seed_keeps_the_contract(seed):
    fuzzer.check_seed(seed, fuzzer.cpu_backends())


def test_the_fuzzer_catches_a_wrong_window_weight(monkeypatch):
    """Not a fuzzer that passes everything: a window mean off by one micro-batch is found."""
    weight = Window.inverse_weight
    monkeypatch.setattr(Window, "inverse_weight", lambda self, device, collecting=True:
                        weight(self, device, collecting) * (self.micro / (self.micro + 1)))
    seed = next(s for s in range(100) if fuzzer.draw_config(s, ["reference"]).k > 1
                and fuzzer.draw_config(s, ["reference"]).optimizer == "SGD")
    with pytest.raises(AssertionError, match=r"(?s)contract broken.*minimal calls"):
        fuzzer.check_seed(seed, ["reference"])


def test_the_fuzzer_catches_a_sparse_sum_stepped_twice(monkeypatch):
    """Its sparse-embedding seeds reach the sparse path: a sparse step applied twice is found."""
    from fused_accum.accumulation import sparse
    step = sparse.sgd_step

    def twice(*args, **kwargs):
        step(*args, **kwargs)
        step(*args, **kwargs)
    monkeypatch.setattr(sparse, "sgd_step", twice)
    seed = next(s for s in range(200) if fuzzer.draw_config(s, ["reference"]).sparse)
    with pytest.raises(AssertionError, match=r"(?s)contract broken.*minimal calls"):
        fuzzer.check_seed(seed, ["reference"])


def test_the_fuzzer_catches_a_zero_grad_that_discards_nothing(monkeypatch):
    """At accumulation_steps=1 the fused optimizer must be torch.optim: a zero_grad() that does
    nothing is found."""
    monkeypatch.setattr(AccumulatingOptimizer, "zero_grad", lambda self, set_to_none=True: None)
    seeds = [s for s in range(60) if fuzzer.draw_config(s, ["reference"]).k == 1][:5]
    with pytest.raises(AssertionError, match="contract broken"):
        for seed in seeds:
            fuzzer.check_seed(seed, ["reference"])
    assert torch.is_grad_enabled()


def test_the_fuzzer_catches_an_unfrozen_parameter_left_unhooked(monkeypatch):
    """Its seeds with accumulation_steps > 1 unfreeze a parameter frozen at construction: one
    that the optimizer stops tracking without hooking it (autograd's gradients then pile up in
    its .grad, outside the window) is found."""
    from fused_accum.accumulation.grad_attribute import GradAttribute

    def take_unfrozen_without_hooking(self):
        for p in [p for p in self.unhooked if p.requires_grad]:
            del self.unhooked[p]
    monkeypatch.setattr(GradAttribute, "take_unfrozen", take_unfrozen_without_hooking)

    def unfreezes_before_a_backward(seed):
        config = fuzzer.draw_config(seed, ["reference"])
        calls = fuzzer.draw_calls(config, 30)
        return config.k > 1 and config.frozen and any(
            call == ("freeze", "norm", False) and "backward" in {c[0] for c in calls[n:]}
            for n, call in enumerate(calls))
    seeds = [s for s in range(SEEDS) if unfreezes_before_a_backward(s)]
    assert seeds, "the seeds CI runs never unfreeze a parameter before a backward pass"
    with pytest.raises(AssertionError, match="contract broken"):
        for seed in seeds:
            fuzzer.check_seed(seed, ["reference"])


def test_the_fuzzer_catches_a_fused_linear_that_adds_a_later_touch_twice(monkeypatch):
    """Its seeds with fused Linears (opt.fuse_linear(model)) reach the GEMM path, CI's seeds
    included: a later micro-batch's weight gradient added twice inside its GEMM is found."""
    from fused_accum.kernels import reference
    assert any(fuzzer.draw_config(s, ["reference"]).fused for s in range(SEEDS))
    add = reference.accumulate_linear

    def twice(grad_outputs, inputs, accs, first, weight, sumsq=None):
        add(grad_outputs, inputs, accs, first, weight, sumsq)
        later = [not f for f in first]
        if any(later):
            add(grad_outputs, inputs, accs, [False] * len(accs), weight)
    monkeypatch.setattr(reference, "accumulate_linear", twice)
    seeds = [s for s in range(SEEDS) if fuzzer.draw_config(s, ["reference"]).fused]
    with pytest.raises(AssertionError, match=r"(?s)contract broken.*minimal calls"):
        for seed in seeds:
            fuzzer.check_seed(seed, ["reference"])
