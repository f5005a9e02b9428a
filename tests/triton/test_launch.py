"""The Triton launch tables: grouping, program map, pointer rows and their cache."""
import pytest
import torch

pytest.importorskip("triton")
from fused_accum import kernels  # noqa: E402

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not kernels.availability("triton", CPU)[0],
                                reason="the Triton backend cannot run here")


def _launch():
    from fused_accum.kernels.triton_ops import launch
    return launch


def test_groups_split_by_dtype_and_by_alignment_of_every_list():
    launch = _launch()
    flat = torch.randn(1000)
    aligned = [torch.randn(8), torch.randn(8)]
    shifted = flat[1:9]                                  # 4 bytes past an aligned address
    grads = [aligned[0], shifted, aligned[1].half(), torch.randn(8)]
    accs = [torch.randn(8), torch.randn(8), torch.randn(8), flat[3:11]]
    groups = {(g.dtype, g.aligned): g.indices for g in launch.groups(launch.addresses([grads, accs, None]), grads)}
    assert groups == {(torch.float32, True): (0,), (torch.float32, False): (1, 3),
                      (torch.float16, True): (2,)}


def test_program_map_gives_each_program_its_tensor_and_chunk():
    launch = _launch()
    pmap, programs = launch.program_map([5, 0, 2048, 2049], 1024, CPU)
    entries = [(int(v) >> 32, int(v) & 0xFFFFFFFF) for v in pmap]
    assert programs == len(entries) == 1 + 0 + 2 + 3
    assert entries == [(0, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
    assert launch.program_map([0, 0], 1024, CPU)[1] == 0


def test_pointer_table_rows_and_cache():
    launch = _launch()
    a, b = [torch.randn(4), torch.randn(6)], [torch.randn(4), torch.randn(6)]
    group = launch.Group((1, 0), torch.float32, True)
    rows = launch.addresses([a, None, b])
    table = launch.pointer_table(rows, group, CPU, [[4, 6], [7, 9]])
    assert table.tolist() == [a[1].data_ptr(), a[0].data_ptr(), 0, 0, b[1].data_ptr(),
                              b[0].data_ptr(), 6, 4, 9, 7]
    # The same contents again: the cached device table, no new upload.
    assert launch.pointer_table(launch.addresses([a, None, b]), group, CPU,
                                [[4, 6], [7, 9]]) is table
    other = launch.pointer_table(launch.addresses([b, None, a]), group, CPU, [[4, 6], [7, 9]])
    assert other is not table and other.tolist()[0] == b[1].data_ptr()
