"""shard_state=True with gloo on CPU, on 2 and 4 ranks started by the test itself.

Each scenario runs the same windows (8 micro-batches each, split between the ranks) twice on the
same ranks: sharded, and with today's all-reduce (unsharded), which test_distributed.py already
holds to one process training on the whole batch.  Sharded must give the same parameters, keep
1/d of the state on each rank, and reshard through its state dicts.
"""
import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fused_accum
from helpers import IGNORE, assert_same_params, concat, leave_rank, lm_loss, make_batches, make_model

WINDOWS = 3
MICRO = 8   # micro-batches per window, over all ranks


def _windows(uneven: bool = False):
    if uneven:   # different sizes and padded targets: the item mean is not a mean of means
        return [sum((make_batches(100 * s + m, 1, 1 + m % 3, 0.4) for m in range(MICRO)), [])
                for s in range(WINDOWS)]
    return [make_batches(s, MICRO, 2) for s in range(WINDOWS)]


def _optimizer(params, scenario: str, shard: bool, ranks: int):
    k = MICRO // ranks
    if scenario in ("sgd", "momentum later"):
        momentum = 0.9 if scenario == "sgd" else 0.0
        return fused_accum.SGD(params, lr=0.1, momentum=momentum, weight_decay=0.01,
                               accumulation_steps=k, shard_state=shard)
    extra = {}
    if scenario == "wrapped":   # torch's AdamW, stepped by the kernels on this rank's shard
        inner = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        return fused_accum.FusedAccumulator(inner, accumulation_steps=k, shard_state=shard)
    if scenario == "driven":   # windows driven from outside, as the framework integrations do
        k = 1
    if scenario == "raise":
        extra["nonfinite"] = "raise"
    if scenario == "compact":
        extra["master_weights"] = "compact"
    if scenario == "overflow":
        extra["loss_scale"] = fused_accum.DynamicLossScale(init_scale=2.0 ** 8)
    if scenario == "clip":
        extra["max_grad_norm"] = 0.05
    return fused_accum.AdamW(params, lr=1e-2, weight_decay=0.1, accumulation_steps=k,
                             shard_state=shard, **extra)


def _dtype(scenario: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "compact": torch.bfloat16, "to compact": torch.bfloat16,
            "overflow": torch.float16}.get(
        scenario, torch.float32)


def _worker(rank: int, ranks: int, runs: list, tmp: str) -> None:
    """Each (scenario, shard) of ``runs`` in turn on one process group: starting ranks costs
    more than the scenarios themselves.  A scenario that fails is recorded and its peers time out
    on the group; the next scenarios report the broken group."""
    os.environ["FUSED_ACCUM_REDUCE_CHUNK_MB"] = "0.002"   # ~2 KB chunks: parameters cut by pieces
    results = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank,
                                world_size=ranks, timeout=datetime.timedelta(seconds=15))
        for scenario, shard in runs:
            results[scenario, shard] = _train(rank, ranks, scenario, shard)
    except BaseException as exc:   # the parent reads the outcome; never leave the peers hanging
        results["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    finally:
        failed = "error" in results or any("error" in r for r in results.values()
                                           if isinstance(r, dict))
        leave_rank({**results, **({"error": "a scenario failed"} if failed else {})},
                   os.path.join(tmp, f"rank{rank}.pt"))


def _train(rank: int, ranks: int, scenario: str, shard: bool) -> dict:
    result = {}
    try:
        model = make_model(seed=1 + rank, dtype=_dtype(scenario))   # rank 0's are broadcast
        if scenario == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        params = list(model.parameters())
        if scenario == "fused linear":   # the model passed: its Linear weights fused (issue #20)
            opt = fused_accum.AdamW(model, lr=1e-2, weight_decay=0.1,
                                    accumulation_steps=MICRO // ranks, shard_state=shard)
            result["fused"] = fused_accum.linear.fused_modules(model)
        elif scenario == "added group":   # a group added after construction is laid out then
            opt = _optimizer(params[:3], scenario, shard, ranks)
            opt.add_param_group({"params": params[3:], "lr": 3e-3})
        else:
            opt = _optimizer(params, scenario, shard, ranks)
        if scenario == "momentum later":   # a group of 8 elements: one rank owns only padding
            extra = torch.nn.Parameter(torch.linspace(-1, 1, 8))
            opt.add_param_group({"params": [extra]})
        for w, window in enumerate(_windows(scenario == "uneven")):
            for m, (tokens, targets) in enumerate(window[rank::ranks]):
                if scenario == "rank fails" and rank == 1 and w == 1:
                    raise SystemExit("rank 1 stops mid-window")
                if scenario == "to compact" and w == 1 and m == 1:   # fp32 masters -> compact
                    saved = {"model": model.state_dict(), "opt": opt.state_dict(),
                             "whole": opt.full_state_dict()}
                    opt.remove_hooks()
                    model = make_model(seed=50 + rank, dtype=_dtype(scenario))
                    opt = _optimizer(model.parameters(), "compact", shard, ranks)
                    model.load_state_dict(saved["model"])
                    try:   # sharded, it holds no whole master to split: refused, unchanged
                        opt.load_state_dict(saved["opt"])
                        result["refused"] = None
                    except ValueError as exc:
                        result["refused"] = str(exc)
                    opt.load_state_dict(saved["whole"])
                if scenario == "resume" and w == 1 and m == 1:   # mid-window: state and window
                    saved = {"model": model.state_dict(), "opt": opt.state_dict()}
                    opt.remove_hooks()
                    model = make_model(seed=50 + rank, dtype=_dtype(scenario))
                    opt = _optimizer(model.parameters(), scenario, shard, ranks)
                    model.load_state_dict(saved["model"])
                    opt.load_state_dict(saved["opt"])
                loss = lm_loss(model, tokens, targets)
                # the norm comes after the reduction: none is folded into the last accumulate
                result["folds"] = result.get("folds", False) or opt._window.fold_norm
                if scenario == "momentum later":
                    loss = loss + (extra * tokens.float().mean()).square().sum()
                    if w == 1 and m == 0:   # state made after construction, e.g. by a scheduler
                        for group in opt.param_groups:
                            group["momentum"] = 0.9
                if scenario in ("overflow", "raise") and rank == 1 and w == 1 and m == 0:
                    loss = loss * float("inf")
                if scenario == "flush" and w == WINDOWS - 1:   # a short last window: 1 of 4
                    opt.backward(loss)
                    opt.step()
                    assert not opt.stepped and opt.flush()
                    break
                if scenario == "driven":
                    last = m == MICRO // ranks - 1
                    opt.final_micro_batch = last
                    (loss / (MICRO // ranks)).backward()
                    if last:
                        opt.step()
                    continue
                if scenario == "raise" and w == 1 and m == MICRO // ranks - 1:
                    opt.backward(loss)
                    try:
                        opt.step()
                    except FloatingPointError as exc:
                        result["raised"] = str(exc)
                    continue
                items = (targets != IGNORE).sum() if scenario == "uneven" else None
                opt.backward(loss, num_items=items)
                opt.step()
            result.setdefault("stepped", []).append(opt.stepped)
        result["params"] = [p.detach().clone() for p in model.parameters()]
        if scenario == "momentum later":
            result["params"].append(extra.detach().clone())
        result["memory"] = opt.memory_bytes()
        result["skipped"] = opt.skipped_steps
        result["scale"] = opt.loss_scale
        result["grad_norm"] = opt.grad_norm
        result["state_dict"] = opt.full_state_dict()   # sharded: gathered, torch's format
        own = opt.state_dict()["state"]   # sharded: this rank's blocks (ShardedTensors)
        result["own_elements"] = sum(
            sum(s.tensor.numel() for s in v.local_shards()) if hasattr(v, "local_shards") else v.numel()
            for entry in own.values() for name, v in entry.items() if name == "exp_avg")
        result["overlapped"] = opt._reducer.launched_during_backward
        result["chunks"] = len(opt._reducer.chunks)
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    return result


_RUNS: dict[int, list[dict]] = {}


def _run(scenario: str, ranks: int, shard: bool, tmp_path_factory) -> list[dict]:
    """The outcome of ``scenario`` on each of ``ranks`` ranks; the first call for a rank count
    runs every scenario of CASES on that many ranks, sharded and not, in one spawn."""
    if ranks not in _RUNS:
        runs = [(s, sh) for s, r in CASES if r == ranks for sh in (True, False)]
        tmp = tmp_path_factory.mktemp(f"sharded{ranks}")
        mp.spawn(_worker, args=(ranks, runs, str(tmp)), nprocs=ranks, join=True)
        _RUNS[ranks] = [torch.load(tmp / f"rank{r}.pt") for r in range(ranks)]
    outcomes = _RUNS[ranks]
    for r in outcomes:   # the group itself failed: say so, with its traceback
        if (scenario, shard) not in r:
            assert "error" not in r, r["error"]
    return [r[scenario, shard] for r in outcomes]


def _ok(results: list[dict]) -> None:
    for r in results:
        assert "error" not in r, r.get("error")


# Every scenario on 2 ranks; the dtypes, clipping and an overflow on 4 as well.
CASES = ([(s, 2) for s in ("sgd", "adamw", "clip", "bf16", "compact", "uneven", "overflow",
                          "resume", "ddp", "added group", "to compact", "flush", "driven",
                          "wrapped", "raise", "momentum later", "fused linear")]
         + [(s, 4) for s in ("adamw", "clip", "bf16", "compact", "overflow")])


@pytest.mark.parametrize("scenario, ranks", CASES)
def test_sharded_equals_the_all_reduced_window(scenario, ranks, tmp_path_factory):
    sharded = _run(scenario, ranks, True, tmp_path_factory)
    plain = _run(scenario, ranks, False, tmp_path_factory)
    _ok(sharded + plain)
    # Two ranks sum in one order either way: bit for bit, unless the clipping norm's sum of
    # squares (added in pieces) is involved.  On four, gloo's reduce-scatter adds the ranks in
    # another order than its all-reduce: within fp32 rounding.
    rtol = 0 if ranks == 2 and scenario != "clip" else 1e-5
    for run in (plain, sharded):   # the ranks agree (a group added later is broadcast too)
        for r in run[1:]:
            assert all(torch.equal(a, b) for a, b in zip(r["params"], run[0]["params"]))
    if scenario == "raise":   # the same names on every rank, sharded or not
        assert all("non-finite" in r["raised"] for r in sharded + plain)
        assert len({r["raised"] for r in sharded + plain}) == 1
        assert "no single parameter" not in sharded[0]["raised"]
    if scenario == "to compact":
        assert all(r["refused"] is None for r in plain)
        assert all("full_state_dict()" in r["refused"] for r in sharded)
    assert not any(r["folds"] for r in sharded + plain)
    for r in sharded:
        assert r["stepped"] == [scenario != "raise" or w != 1 for w in range(WINDOWS)]
        assert r["skipped"] == plain[0]["skipped"] == (1 if scenario == "overflow" else 0)
        assert r["scale"] == plain[0]["scale"]
        for a, b in zip(r["params"], plain[0]["params"]):
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())
        torch.testing.assert_close(r["grad_norm"], plain[0]["grad_norm"], rtol=1e-6, atol=0)
        # the chunks were reduce-scattered while the last backward pass ran (a fused weight's
        # chunk, and those after it, wait for the window's end: docs/fused-linear.md)
        assert r["chunks"] > 1
        if scenario == "fused linear":
            assert r["fused"] and r["overlapped"] < r["chunks"]
        else:
            assert r["overlapped"] >= r["chunks"]
    start = make_model(seed=1, dtype=_dtype(scenario)).parameters()
    assert not all(torch.equal(a, b.detach()) for a, b in zip(sharded[0]["params"], start))   # it trained
    # Each rank keeps 1/d of every state buffer (up to padding of the chunks to d pieces).
    for name, whole in plain[0]["memory"].items():
        if name in ("accumulators", "parameters", "step"):
            continue
        per_rank = [r["memory"][name] for r in sharded]
        assert len(set(per_rank)) == 1, per_rank
        assert whole / ranks <= per_rank[0] <= whole / ranks * 1.25 + 64 * ranks, (name, per_rank, whole)
    # The gathered state dict is the unsharded one, on every rank; the sharded one holds each
    # rank's part, the parts adding up to the whole.
    for r in sharded:
        _assert_same_state(r["state_dict"], plain[0]["state_dict"], rtol)
    if "exp_avg" in plain[0]["memory"]:
        whole = sum(p.numel() for p in plain[0]["params"])
        assert plain[0]["own_elements"] == whole
        assert sum(r["own_elements"] for r in sharded) == whole
        assert all(r["own_elements"] < whole for r in sharded)


def _assert_same_state(got: dict, expected: dict, rtol: float) -> None:
    assert got["state"].keys() == expected["state"].keys()
    for key, entry in expected["state"].items():
        assert got["state"][key].keys() == entry.keys()
        for name, value in entry.items():
            scale = value.abs().max().item() if value.is_floating_point() else 0
            torch.testing.assert_close(got["state"][key][name], value, rtol=rtol, atol=rtol * scale)


def test_fused_linear_shards_as_the_hook_path(tmp_path_factory):
    """The same windows, the Linear weights' gradients summed inside their GEMMs or through the
    hooks: the same parameters to fp32 rounding, sharded and not."""
    for shard in (True, False):
        fused = _run("fused linear", 2, shard, tmp_path_factory)
        hooked = _run("adamw", 2, shard, tmp_path_factory)
        _ok(fused + hooked)
        for a, b in zip(fused[0]["params"], hooked[0]["params"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_sharded_fp32_equals_one_process_on_the_whole_batch(tmp_path_factory):
    """Against torch.optim.AdamW on one batch of all 8 micro-batches, with clipping."""
    _ok(results := _run("clip", 4, True, tmp_path_factory))
    expected = make_model(seed=1)
    opt = torch.optim.AdamW(expected.parameters(), lr=1e-2, weight_decay=0.1)
    for window in _windows():
        lm_loss(expected, *concat(window)).backward()
        assert torch.nn.utils.clip_grad_norm_(expected.parameters(), 0.05) > 0.05   # clipping acts
        opt.step()
        opt.zero_grad()
    for r in results:
        model = make_model(seed=1)
        with torch.no_grad():
            for p, q in zip(model.parameters(), r["params"]):
                p.copy_(q)
        assert_same_params(model, expected)


def test_sharded_bf16_equals_one_process_on_the_same_micro_batches(tmp_path_factory):
    """4 ranks, bf16 with fp32 masters, against one process accumulating all 8 micro-batches of
    each window: the fp32 sums run in another order, so the bf16 parameters agree to within one
    bf16 step of the largest."""
    _ok(results := _run("bf16", 4, True, tmp_path_factory))
    model = make_model(seed=1, dtype=torch.bfloat16)
    opt = _optimizer(model.parameters(), "bf16", False, 1)
    for window in _windows():
        for tokens, targets in window:
            opt.backward(lm_loss(model, tokens, targets))
            opt.step()
        assert opt.stepped
    start = list(make_model(seed=1, dtype=torch.bfloat16).parameters())
    for r in results:
        for a, b, a0 in zip(r["params"], model.parameters(), start):
            tolerance = 2.0 ** -8 * b.detach().float().abs().max().item()
            torch.testing.assert_close(a.float(), b.detach().float(), rtol=0, atol=tolerance)
            assert (a.float() - a0.detach().float()).abs().max() > 2 * tolerance   # it trained


def test_a_rank_that_stops_mid_window_makes_the_others_fail_clearly(tmp_path):
    mp.spawn(_worker, args=(2, [("rank fails", True)], str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt")["rank fails", True] for r in range(2)]
    assert "rank 1 stops mid-window" in results[1]["error"]
    assert "fused_accum: the reduce-scatter" in results[0]["error"] or \
        "fused_accum: the all-reduce" in results[0]["error"], results[0].get("error")


@pytest.mark.parametrize("shape", [[37], [5, 7], [3, 4, 5], [2, 3, 4, 6]])
def test_a_flat_range_is_cut_into_contiguous_blocks(shape):
    """What a sharded state dict's ShardedTensors are made of: every flat range of a tensor as
    rectangular blocks that cover it exactly, in order, each contiguous in memory."""
    from fused_accum.distributed.sharded_checkpoint import blocks
    numel = torch.Size(shape).numel()
    flat = torch.arange(numel)
    tensor = flat.view(shape)
    g = torch.Generator().manual_seed(len(shape))
    ranges = [(0, numel), (0, 1), (numel - 1, numel)] + [
        tuple(sorted(torch.randint(0, numel + 1, (2,), generator=g).tolist())) for _ in range(40)]
    for start, stop in ranges:
        got = []
        for offsets, sizes in blocks(shape, start, stop):
            block = tensor[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]
            values = block.reshape(-1)
            assert torch.equal(values, torch.arange(values[0], values[0] + values.numel()))   # contiguous
            got.append(values)
        assert torch.equal(torch.cat(got) if got else flat[:0], flat[start:stop]), (start, stop)


def _special_worker(rank: int, ranks: int, case: str, tmp: str) -> None:
    result = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init-{case}", rank=rank,
                                world_size=ranks, timeout=datetime.timedelta(seconds=15))
        torch.manual_seed(100 + rank)   # each rank's generator differs, as in a real run
        if case == "subgroup":   # ranks 1 and 2 train together; rank 0 is elsewhere
            group = dist.new_group([1, 2])
            if rank == 0:
                return
            model = make_model(seed=rank)
            opt = fused_accum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=2,
                                    process_group=group, shard_state=True)
            for tokens, targets in make_batches(rank, 2, 2):
                opt.backward(lm_loss(model, tokens, targets))
                opt.step()
            saved = opt.state_dict()   # ShardedTensors placed by global rank
            result["whole"] = opt.full_state_dict()
            fresh = fused_accum.AdamW(make_model(seed=9).parameters(), lr=1e-2, accumulation_steps=2,
                                      process_group=group, shard_state=True)
            fresh.load_state_dict(saved)
            result["reloaded"] = fresh.full_state_dict()
        elif case == "mixed":   # one rank sharded, the other not: refused when built, on both
            fused_accum.AdamW(make_model(seed=rank).parameters(), shard_state=rank == 0)
        else:   # stochastic rounding: two parameters with the same gradient, in separate chunks
            os.environ["FUSED_ACCUM_REDUCE_CHUNK_MB"] = "0.0005"   # a chunk per parameter
            p, q = (torch.nn.Parameter(torch.ones(256, dtype=torch.bfloat16)) for _ in range(2))
            opt = fused_accum.SGD([p, q], lr=1e-3, master_weights=False, stochastic_rounding=True,
                                  shard_state=case == "rounding, sharded")
            (p.float().sum() * 0.37 + q.float().sum() * 0.37).backward()
            opt.step()
            result["p"], result["q"] = p.detach().clone(), q.detach().clone()
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    finally:
        leave_rank(result, os.path.join(tmp, f"{case}{rank}.pt"))


def _run_special(case: str, ranks: int, tmp_path, ok: bool = True) -> list[dict]:
    mp.spawn(_special_worker, args=(ranks, case, str(tmp_path)), nprocs=ranks, join=True)
    results = [torch.load(tmp_path / f"{case}{r}.pt") for r in range(ranks)]
    if ok:
        _ok(results)
    return results


def test_ranks_that_disagree_on_shard_state_are_refused_when_the_optimizer_is_built(tmp_path):
    """A sharded rank would reduce-scatter where the other all-reduces."""
    for r in _run_special("mixed", 2, tmp_path, ok=False):
        assert "ranks disagree on shard_state" in r.get("error", ""), r.get("error")


def test_a_subgroup_shards_and_saves_by_global_rank(tmp_path):
    """A process group of ranks 1 and 2 of 3: ShardedTensors name blocks by global rank."""
    _, one, two = _run_special("subgroup", 3, tmp_path)
    for r in (one, two):
        _assert_same_state(r["reloaded"], one["whole"], 0)


@pytest.mark.parametrize("case", ["rounding", "rounding, sharded"])
def test_stochastic_rounding_agrees_across_ranks_and_differs_across_parameters(case, tmp_path):
    """Every rank draws rank 0's seed (each drew its own before); sharded, each chunk piece gets
    a seed of its own, so two parameters stepped alike do not round alike."""
    results = _run_special(case, 2, tmp_path)
    for r in results:
        assert torch.equal(r["p"], results[0]["p"]) and torch.equal(r["q"], results[0]["q"])
        assert not torch.equal(r["p"], r["q"])
