"""torch.distributed.checkpoint (DCP): dcp.save / dcp.load of a fused optimizer, also into a freshly
built one and across numbers of ranks, and the state-dict helpers of
torch.distributed.checkpoint.state_dict."""
import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

import fused_accum
from helpers import IGNORE, assert_same_params, leave_rank, lm_loss, make_batches, make_model

K = 2
WINDOWS = 4
# One process without a process group is how DCP is used here outside the spawned ranks.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _window(w, rank=0, ranks=1, size=2 * K, items=False):
    """The micro-batches of window w (``size`` in all) that ``rank`` of ``ranks`` trains on
    (``items``: with targets ignored at random, so that their item counts differ)."""
    return make_batches(100 + w, size, 2, pad_fraction=0.3 if items else 0.0)[rank::ranks]


def _micro_batch(model, opt, batch, items=False):
    tokens, targets = batch
    opt.backward(lm_loss(model, tokens, targets),
                 num_items=(targets != IGNORE).sum() if items else None)
    opt.step()


def _train(model, opt, windows, rank=0, ranks=1, size=2 * K, items=False):
    for w in windows:
        for batch in _window(w, rank, ranks, size, items):
            _micro_batch(model, opt, batch, items)


def _make(seed, dtype, k=K * 2, **kwargs):
    model = make_model(seed=seed, dtype=dtype)
    opt = fused_accum.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, accumulation_steps=k,
                            max_grad_norm=1.0, **kwargs)
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dcp_into_a_freshly_built_optimizer_resumes_as_uninterrupted(dtype, tmp_path, backend):
    straight, opt = _make(1, dtype, backend=backend)
    _train(straight, opt, range(WINDOWS))

    model, opt = _make(1, dtype, backend=backend)
    _train(model, opt, range(2))
    dcp.save({"model": model, "optim": opt}, checkpoint_id=str(tmp_path))
    resumed, fresh = _make(7, dtype, backend=backend)   # other weights, no state, until loaded
    dcp.load({"model": resumed, "optim": fresh}, checkpoint_id=str(tmp_path))
    state = fresh.state_dict()["state"]
    assert all(entry["step"].item() == 2 for entry in state.values())
    _train(resumed, fresh, range(2, WINDOWS))
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)


def test_a_fresh_optimizer_lists_every_parameter_s_state(backend):
    """What DCP loads into is what state_dict() lists: before any step, every parameter with step
    0, zero moments (and masters), as torch's DCP helpers make for a fresh torch optimizer."""
    model, opt = _make(2, torch.bfloat16, backend=backend)
    state = opt.state_dict()["state"]
    assert sorted(state) == list(range(len(list(model.parameters()))))
    for entry, p in zip(state.values(), model.parameters()):
        assert entry["step"].item() == 0
        assert not entry["exp_avg"].any() and not entry["exp_avg_sq"].any()
        assert torch.equal(entry["master_param"], p.float())


def test_the_state_dict_helpers_load_into_a_fresh_optimizer(tmp_path, backend):
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                           set_optimizer_state_dict)
    straight, opt = _make(3, torch.float32, backend=backend)
    _train(straight, opt, range(WINDOWS))
    model, opt = _make(3, torch.float32, backend=backend)
    _train(model, opt, range(2))
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
    fresh = fused_accum.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1,
                              accumulation_steps=K * 2, max_grad_norm=1.0, backend=backend)
    target = {"optim": get_optimizer_state_dict(model, fresh)}
    dcp.load(target, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(model, fresh, target["optim"])
    _train(model, fresh, range(2, WINDOWS))
    assert_same_params(model, straight, rtol=1e-6)


def test_the_state_dict_helpers_refuse_a_window_they_dropped(tmp_path, backend):
    """get_optimizer_state_dict keeps only "state" and "param_groups": a mid-window checkpoint
    through it would lose the window's sums silently, so loading it raises, naming the helpers."""
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                           set_optimizer_state_dict)
    model, opt = _make(6, torch.float32, backend=backend)
    _train(model, opt, range(1))
    boundary = get_optimizer_state_dict(model, opt)
    opt.backward(lm_loss(model, *_window(1)[0]))
    opt.step()   # one micro-batch into window 1
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
    fresh = fused_accum.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1,
                              accumulation_steps=K * 2, max_grad_norm=1.0, backend=backend)
    target = {"optim": get_optimizer_state_dict(model, fresh)}
    dcp.load(target, checkpoint_id=str(tmp_path))
    with pytest.raises(ValueError, match="without its .fused_accum. entry.*get_optimizer_state_dict"):
        set_optimizer_state_dict(model, fresh, target["optim"])
    set_optimizer_state_dict(model, fresh, boundary)   # at a boundary nothing is lost: it loads
    assert fresh.micro_batches == 0
    assert "fused_accum_mid_window" not in fresh.param_groups[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mid_window_dcp_checkpoint_resumes_its_window_in_a_fresh_optimizer(dtype, tmp_path,
                                                                              backend):
    """DCP loads what the loading optimizer lists: the window in progress is one entry that a
    fresh optimizer lists too (empty), so its sums come through, and training goes on bit for bit
    as if uninterrupted."""
    straight, opt = _make(4, dtype, backend=backend)
    _train(straight, opt, range(WINDOWS))
    model, opt = _make(4, dtype, backend=backend)
    _train(model, opt, range(1))
    first, *rest = _window(1)
    opt.backward(lm_loss(model, *first))
    opt.step()   # one micro-batch into window 1
    dcp.save({"model": model, "optim": opt}, checkpoint_id=str(tmp_path))
    resumed, fresh = _make(5, dtype, backend=backend)
    assert fresh.state_dict()["fused_accum"]["window"] is None
    dcp.load({"model": resumed, "optim": fresh}, checkpoint_id=str(tmp_path))
    assert fresh.micro_batches == 1
    for batch in rest:
        fresh.backward(lm_loss(resumed, *batch))
        fresh.step()
    _train(resumed, fresh, range(2, WINDOWS))
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)


# -- several gloo ranks -----------------------------------------------------------------------

GLOBAL = 8   # micro-batches of a window over all ranks: k = GLOBAL / ranks on each


def _worker(rank, ranks, phase, init_file, ckpt, out_dir, shard, dtype, items):
    result = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=ranks, timeout=datetime.timedelta(seconds=60))
        k = GLOBAL // ranks
        window = lambda w: _window(w, rank, ranks, GLOBAL, items)   # noqa: E731
        if phase == "save":
            model, opt = _make(10, dtype, k=k, process_group=True, shard_state=shard)
            _train(model, opt, range(2), rank, ranks, GLOBAL, items)
            dcp.save({"model": model, "optim": opt}, checkpoint_id=os.path.join(ckpt, "boundary"))
            result["state"] = _copied(opt.full_state_dict()["state"])   # live views: copied now
            _micro_batch(model, opt, window(2)[0], items)
            dcp.save({"model": model, "optim": opt}, checkpoint_id=os.path.join(ckpt, "mid"))
            for batch in window(2)[1:]:
                _micro_batch(model, opt, batch, items)
            _train(model, opt, range(3, WINDOWS), rank, ranks, GLOBAL, items)
        else:
            model, opt = _make(11 + rank, dtype, k=k, process_group=True, shard_state=shard)
            dcp.load({"model": model, "optim": opt}, checkpoint_id=os.path.join(ckpt, "boundary"))
            result["state"] = _copied(opt.full_state_dict()["state"])
            _train(model, opt, range(2, WINDOWS), rank, ranks, GLOBAL, items)
            result["mid"] = _resume_mid_window(rank, ranks, ckpt, dtype, k, shard, items)
        result["params"] = [p.detach().clone() for p in model.parameters()]
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    finally:
        leave_rank(result, os.path.join(out_dir, f"{phase}{rank}.pt"))


SAVED_RANKS = 4   # the save phase's ranks: the mid-window checkpoint follows one micro-batch on each


def _resume_mid_window(rank, ranks, ckpt, dtype, k, shard=False, items=False):
    """Load the checkpoint saved one micro-batch into window 2 on SAVED_RANKS ranks, train the
    window's other micro-batches (split over this run's ranks) and the windows after it; returns
    the parameters."""
    model, opt = _make(20 + rank, dtype, k=k, process_group=ranks > 1 or None, shard_state=shard)
    dcp.load({"model": model, "optim": opt}, checkpoint_id=os.path.join(ckpt, "mid"))
    assert opt.micro_batches == SAVED_RANKS // ranks, opt.micro_batches
    for batch in _window(2, size=GLOBAL, items=items)[SAVED_RANKS:][rank::ranks]:
        _micro_batch(model, opt, batch, items)
    assert opt.micro_batches == 0 and opt.stepped
    _train(model, opt, range(3, WINDOWS), rank, ranks, size=GLOBAL, items=items)
    return [p.detach().clone() for p in model.parameters()]


def _spawn(phase, ranks, tmp_path, shard=False, dtype=torch.float32, items=False):
    init = tmp_path / f"init-{phase}"
    mp.spawn(_worker, args=(ranks, phase, str(init), str(tmp_path / "ckpt"), str(tmp_path), shard,
                            dtype, items), nprocs=ranks, join=True)
    results = [torch.load(tmp_path / f"{phase}{r}.pt") for r in range(ranks)]
    for r in results:
        assert "error" not in r, r["error"]
    return results


def _copied(state):
    return {key: {name: value.clone() for name, value in entry.items()} for key, entry in state.items()}


def _assert_same_state(got, expected):
    assert got.keys() == expected.keys()
    for key, entry in expected.items():
        assert got[key].keys() == entry.keys()
        for name, value in entry.items():
            assert torch.equal(got[key][name], value), (key, name)


def _assert_close(params, expected):
    for a, b in zip(params, expected):
        scale = b.abs().max().item()
        # fp32: the sums run in other orders; bf16: the fp32 masters then round to within one
        # bf16 step of each other
        tolerance = 1e-5 if b.dtype == torch.float32 else 2.0 ** -8
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=tolerance * scale)


@pytest.mark.parametrize("saved_sharded, loaded_sharded, dtype, items", [
    (False, False, torch.float32, False), (True, True, torch.float32, False),
    (True, True, torch.bfloat16, False), (False, True, torch.float32, True),
    (True, False, torch.float32, False)])
def test_dcp_saved_on_four_ranks_resumes_on_two_and_on_one(saved_sharded, loaded_sharded, dtype,
                                                           items, tmp_path):
    """Saved at a window boundary on 4 ranks (k = 2 each), resumed by fresh optimizers on 2 ranks
    (k = 4) and in one process (k = 8): the same windows of 8 micro-batches, so the same training
    as the 4 ranks uninterrupted (to float rounding: the sums run in other orders).  Sharded
    (shard_state=True), 4 ranks save their quarters (blocks of ShardedTensors, nothing gathered)
    and 2 ranks load halves; unsharded and sharded checkpoints load into either.  A checkpoint
    saved one micro-batch into a window (4 of its 8 micro-batches ended) resumes there: at
    micro-batch 2 of 4 on each of 2 ranks, at 4 of 8 in one process.  One case weighs the
    micro-batches by their items (num_items), whose count rank 0 alone carries over."""
    saved = _spawn("save", 4, tmp_path, saved_sharded, dtype, items)
    for other in saved[1:]:
        for a, b in zip(other["params"], saved[0]["params"]):
            assert torch.equal(a, b)   # the data-parallel ranks agree
    expected = saved[0]["params"]
    loaded = _spawn("load", 2, tmp_path, loaded_sharded, dtype, items)
    for r in loaded:   # the state itself came through unchanged, bit for bit
        _assert_same_state(r["state"], saved[0]["state"])
        _assert_close(r["params"], expected)
        _assert_close(r["mid"], expected)   # the window in progress came through too
    model, opt = _make(30, dtype, k=GLOBAL)
    dcp.load({"model": model, "optim": opt}, checkpoint_id=str(tmp_path / "ckpt" / "boundary"))
    _assert_same_state(opt.state_dict()["state"], saved[0]["state"])
    _train(model, opt, range(2, WINDOWS), size=GLOBAL, items=items)
    _assert_close(list(model.parameters()), expected)
    _assert_close(_resume_mid_window(0, 1, str(tmp_path / "ckpt"), dtype, GLOBAL, items=items),
                  expected)


def _refusals_worker(rank, init_file, out_dir):
    result = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=2, timeout=datetime.timedelta(seconds=60))
        first, last = _window(0, rank, 2, size=4)
        model, opt = _make(40, torch.float32, k=2, process_group=True)
        _micro_batch(model, opt, first)
        opt.backward(lm_loss(model, *last))   # the window's last: its reduction is under way
        try:
            opt.state_dict()
        except RuntimeError as exc:
            result["in reduction"] = str(exc)
        opt.step()
        result["stepped"] = opt.stepped
        model, opt = _make(41, torch.float32, k=1, process_group=True)   # driven from outside
        opt.final_micro_batch = False
        (lm_loss(model, *first) / 2).backward()
        result["driven"] = opt.state_dict()["fused_accum"]["window"]   # summed over both ranks
        opt.final_micro_batch = True
        (lm_loss(model, *last) / 2).backward()
        opt.step()
        result["driven stepped"] = opt.stepped
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    finally:
        leave_rank(result, os.path.join(out_dir, f"refusals{rank}.pt"))


def test_a_data_parallel_window_being_reduced_is_refused_on_every_rank(tmp_path):
    """Under data parallelism a mid-window state_dict() sums the window over the ranks: between
    the last backward pass and step() (the reduction under way) every rank raises before any
    collective, and training goes on; a window driven from outside (final_micro_batch: no
    micro-batch counted yet) is summed like any other."""
    mp.spawn(_refusals_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(tmp_path / f"refusals{rank}.pt")
        assert "error" not in r, r["error"]
        assert "between a window's last backward pass and its step()" in r["in reduction"]
        tag, window = r["driven"]
        assert window["ranks"] == 2 and window["accumulated_grads"]
        assert r["stepped"] and r["driven stepped"]
