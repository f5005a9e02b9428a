"""The Triton launch tables: grouping, program map, pointer rows and their cache.

Host-side logic on CPU tensors: it needs Triton importable, not a GPU or the interpreter, so it
runs on GPU machines too (where the interpreter is off and the first H200 run skipped it)."""
import pytest
import torch

pytest.importorskip("triton")

CPU = torch.device("cpu")


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


def _fresh_cache(monkeypatch, size=512):
    launch = _launch()
    cache = launch._TableCache(size)
    monkeypatch.setattr(launch, "_cache", cache)
    return launch, cache


def test_a_table_found_during_capture_is_pinned_and_outlives_eviction(monkeypatch):
    launch, cache = _fresh_cache(monkeypatch, size=8)
    before = cache.get((1, 2, 3), CPU)
    monkeypatch.setattr(launch, "_capturing", lambda device: True)
    assert cache.get((1, 2, 3), CPU) is before          # the eager table: valid, now pinned
    monkeypatch.setattr(launch, "_capturing", lambda device: False)
    for i in range(20):                                 # more than the LRU holds
        cache.get((i, 0), CPU)
    assert cache.get((1, 2, 3), CPU) is before          # still there for the graph's replays


def test_a_table_made_during_capture_is_never_handed_to_eager_calls(monkeypatch):
    launch, cache = _fresh_cache(monkeypatch)
    monkeypatch.setattr(launch, "_capturing", lambda device: True)
    captured = cache.get((4, 5), CPU)
    assert cache.get((4, 5), CPU) is captured           # the same capture (or another) reuses it
    monkeypatch.setattr(launch, "_capturing", lambda device: False)
    eager = cache.get((4, 5), CPU)
    assert eager is not captured and eager.tolist() == [4, 5]
    launch.release_captured_tables()
    monkeypatch.setattr(launch, "_capturing", lambda device: True)
    assert cache.get((4, 5), CPU) is eager              # released: the eager one is pinned anew


def test_tables_are_per_stream(monkeypatch):
    launch, cache = _fresh_cache(monkeypatch)
    monkeypatch.setattr(launch, "_stream", lambda device: 1)
    first = cache.get((7,), CPU)
    monkeypatch.setattr(launch, "_stream", lambda device: 2)
    assert cache.get((7,), CPU) is not first            # no ordering against the other upload
    monkeypatch.setattr(launch, "_stream", lambda device: 1)
    assert cache.get((7,), CPU) is first


def test_the_cache_takes_several_threads_at_once(monkeypatch):
    import threading
    launch, cache = _fresh_cache(monkeypatch, size=16)
    errors = []

    def work(offset):
        try:
            for i in range(300):
                assert cache.get((offset, i % 40), CPU).tolist() == [offset, i % 40]
        except Exception as exc:   # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_large_program_map_is_built_vectorised():
    launch = _launch()
    numels = [2**20 + 3] * 300   # 300M elements: a 1.2 GB fp32 bucket
    pmap, programs = launch.program_map(numels, 1024, CPU)
    assert programs == 300 * 1025 and pmap.numel() == programs
    assert int(pmap[1025]) == (1 << 32) and int(pmap[-1]) == (299 << 32) | 1024


def test_ops_run_with_their_tensors_device_current(monkeypatch):
    """Triton launches on the current device: a bucket on cuda:1 while cuda:0 is current must
    switch devices first.  Checked with a stand-in device context (no GPU here)."""
    import contextlib
    from fused_accum.kernels import triton_ops
    entered = []

    @contextlib.contextmanager
    def recording(device):
        entered.append(device)
        yield
    monkeypatch.setattr(triton_ops.launch, "on_device", recording)

    class OnGpu1:
        device = torch.device("cuda", 1)
    seen = []
    guarded = triton_ops._on_tensors_device(1)(lambda grads, accs: seen.append(list(entered)))
    guarded([], [OnGpu1()])
    assert seen == [[torch.device("cuda", 1)]]
