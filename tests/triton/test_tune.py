"""The tuning command's measurement and file, run under Triton's interpreter on CPU tensors."""
import pytest
import torch

pytest.importorskip("triton")
from fused_accum import kernels  # noqa: E402

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not kernels.availability("triton", CPU)[0],
                                reason="the Triton backend cannot run here")


def test_tune_times_every_candidate_and_writes_the_fastest_per_op_and_dtype(tmp_path):
    from fused_accum.bench import tune
    from fused_accum.kernels.triton_ops import configs
    candidates = (configs.Config(1024, 4), configs.Config(2048, 8))
    entry = tune.tune(CPU, 0.01, 1, candidates)
    expected = {"accumulate": {"float32", "bfloat16", "float16"}, "norm": {"float32"},
                "sgd_step": {"float32", "bfloat16", "float16"},
                "adam_step": {"float32", "bfloat16", "float16"}}
    assert {op: set(d) for op, d in entry["configs"].items()} == expected
    assert len(entry["timings"]) == 10 * len(candidates)
    for row in entry["timings"]:
        fastest = min(r["time_s"] for r in entry["timings"]
                      if (r["op"], r["dtype"]) == (row["op"], row["dtype"]))
        assert row["best"] == (row["time_s"] == fastest)
        if row["best"]:
            assert entry["configs"][row["op"]][row["dtype"]] == dict(block=row["block"],
                                                                     num_warps=row["num_warps"])
    path = tmp_path / "tuned.json"
    path.write_text('{"Some Other GPU": {"configs": {}}}')
    tune.write(entry, CPU, path)
    table = configs.read(path)
    assert set(table) == {"Some Other GPU", configs.device_key(CPU)}
    assert table[configs.device_key(CPU)]["configs"] == entry["configs"]


def test_forced_config_applies_inside_the_block_only():
    from fused_accum.kernels.triton_ops import configs
    before = configs.lookup("accumulate", torch.float32, CPU)
    with configs.forced(configs.Config(4096, 16)):
        assert configs.lookup("adam_step", torch.bfloat16, CPU) == configs.Config(4096, 16)
    assert configs.lookup("accumulate", torch.float32, CPU) == before


def test_the_committed_tuning_file_names_known_ops_and_candidate_configs():
    from fused_accum.kernels.triton_ops import configs
    for device, entry in configs.read().items():
        for op, by_dtype in entry["configs"].items():
            assert op in configs.OPS, (device, op)
            for config in by_dtype.values():
                assert configs.Config(**config) in configs.CANDIDATES, (device, op, config)
