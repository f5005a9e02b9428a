"""Data parallel by default, beside DistributedDataParallel: two gloo ranks started by the test.

The one-line change in a DDP script must give every rank the large-batch result, with DDP's own
per-micro-batch reduction switched off; a configuration that would let the ranks drift apart is
refused, or said in a warning when asked for explicitly."""
import datetime
import os
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import fused_accum
from fused_accum.placeholders import is_placeholder
from helpers import assert_same_params, concat, leave_rank, lm_loss, make_batches, make_model

WINDOWS, K = 3, 2   # per rank: K micro-batches of each window; the window is 2K micro-batches


def _windows():
    return [make_batches(10 + w, 2 * K, 2) for w in range(WINDOWS)]


def _counting_hook(counter):
    """DDP's default reduction, counted (every bucket DDP would all-reduce calls it)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        counter.append(bucket.buffer().numel())
        return allreduce_hook(state, bucket)
    return hook


def _worker(rank: int, scenario: str, init_file: str, out_dir: str) -> None:
    result = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=2, timeout=datetime.timedelta(seconds=20))
        tied = scenario == "ddp, fused linear"   # a head tied to the embedding: fused and hooked
        model = make_model(seed=1, tie=tied)
        reduced = []
        make_opt = lambda params, **kw: fused_accum.SGD(params, lr=0.5, momentum=0.9,
                                                        accumulation_steps=K, **kw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if scenario == "optimizer first":   # as transformers and accelerate build them
                opt = make_opt(model.parameters())
                net = DDP(model)
                net.register_comm_hook(None, _counting_hook(reduced))
            elif scenario == "no ddp":
                net, opt = model, make_opt(model.parameters())
            elif scenario == "ddp, fused linear":   # weight gradients accumulated in the GEMMs
                net = DDP(model)
                net.register_comm_hook(None, _counting_hook(reduced))
                opt = make_opt(net)
                assert opt.fuse_linear(net)
            elif scenario == "explicit none":
                net, opt = model, make_opt(model.parameters(), process_group=None)
            else:
                net = DDP(model)
                net.register_comm_hook(None, _counting_hook(reduced))
                opt = make_opt(net.parameters(),
                               **({"process_group": None} if scenario == "ddp, none" else {}))
        result["warnings"] = [str(w.message) for w in caught]
        result["warned at"] = [w.filename for w in caught]
        for window in _windows():
            for m, (tokens, targets) in enumerate(window[rank::2]):
                lm_loss(net, tokens, targets).backward()
                if m == 0:   # no gradient left in .grad (DDP writes its reduction there)
                    result.setdefault("grads after backward", []).append(
                        all(p.grad is None or is_placeholder(p.grad) for p in model.parameters()))
                opt.step()
                result.setdefault("reduced by ddp", []).append(len(reduced))
        result["params"] = [p.detach().clone() for p in model.parameters()]
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    finally:
        leave_rank(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _run(scenario: str, tmp_path) -> list[dict]:
    mp.spawn(_worker, args=(scenario, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def _large_batch(tie=False):
    model = make_model(seed=1, tie=tie)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for window in _windows():
        lm_loss(model, *concat(window)).backward()
        opt.step()
        opt.zero_grad()
    return model


def _assert_large_batch(results, tie=False):
    expected = _large_batch(tie)
    for r in results:
        assert "error" not in r, r["error"]
        model = make_model(seed=1, tie=tie)
        with torch.no_grad():
            for p, q in zip(model.parameters(), r["params"]):
                p.copy_(q)
        assert_same_params(model, expected)


@pytest.mark.parametrize("scenario", ["ddp", "optimizer first", "no ddp", "ddp, fused linear"])
def test_the_one_line_change_gives_every_rank_the_large_batch(scenario, tmp_path):
    results = _run(scenario, tmp_path)
    _assert_large_batch(results, tie=scenario == "ddp, fused linear")
    for r in results:
        assert r["warnings"] == []
        counts = r["reduced by ddp"]   # DDP's bucket reductions so far, after each step()
        if scenario == "optimizer first":   # DDP made later: found and stopped at the first step
            assert counts[0] > 0 and counts[-1] == counts[0]
            assert r["grads after backward"][1:] == [True] * (WINDOWS - 1)
        else:
            assert counts[-1] == 0
            assert r["grads after backward"] == [True] * WINDOWS


def test_process_group_none_under_ddp_is_refused(tmp_path):
    results = _run("ddp, none", tmp_path)
    for r in results:
        assert "process_group=None" in r["error"] and "DistributedDataParallel" in r["error"]


def test_process_group_none_without_ddp_trains_each_rank_alone_and_says_so(tmp_path):
    results = _run("explicit none", tmp_path)
    for r in results:
        assert "error" not in r, r["error"]
        assert any("process_group=None" in w and "drift apart" in w for w in r["warnings"])
        assert r["warned at"] == [__file__]   # the line that built the optimizer, not ours
    assert not torch.equal(results[0]["params"][0], results[1]["params"][0])


def test_fsdp_and_dtensor_parameters_are_refused():
    flat = torch.nn.Parameter(torch.randn(4))
    flat._is_flat_param = True   # what FSDP1's FlatParameter carries
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\].*FSDP"):
        fused_accum.AdamW([flat])
    view = torch.nn.Parameter(torch.randn(4))
    view._fsdp_flattened = True   # FSDP1 with use_orig_params=True
    with pytest.raises(TypeError, match="FSDP"):
        fused_accum.AdamW([view])


def test_bad_process_group_argument():
    with pytest.raises(ValueError, match="process_group"):
        fused_accum.SGD(make_model(0).parameters(), process_group="everyone")
    with pytest.raises(ValueError, match="process_group"):
        fused_accum.SGD(make_model(0).parameters(), process_group=False)


def _dtensor_worker(rank: int, ranks: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor
    result = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=ranks)
        mesh = init_device_mesh("cpu", (ranks,))
        if ranks == 1:   # a bare DTensor (tensor parallel)
            params = [torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh))]
        else:            # a model sharded with FSDP2 on a CPU mesh
            model = make_model(0)
            fully_shard(model, mesh=mesh)
            params = list(model.parameters())
        fused_accum.AdamW(params)
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        leave_rank(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("ranks", [1, 2])
def test_dtensor_and_fsdp2_parameters_are_refused_naming_what_is_missing(ranks, tmp_path):
    mp.spawn(_dtensor_worker, args=(ranks, str(tmp_path / "init"), str(tmp_path)), nprocs=ranks,
             join=True)
    for rank in range(ranks):
        error = torch.load(tmp_path / f"rank{rank}.pt")["error"]
        assert error.startswith("TypeError") and "DTensor" in error and "FSDP2" in error
        assert "accumulate those shards" in error and "shard_state=True" in error
