"""fused_accum.eager: entry points run untraced under torch.compile, and directly otherwise."""
import torch

from fused_accum import eager as eager_module
from fused_accum.eager import eager


def _recorder():
    seen = []

    @eager
    def record(x):
        seen.append(torch.compiler.is_compiling())
        return x + 1
    return record, seen


def test_outside_compilation_the_function_runs_directly(monkeypatch):
    record, seen = _recorder()
    calls = []
    monkeypatch.setattr(eager_module, "_compiling", lambda: calls.append(1))   # None: not compiling
    assert record(torch.tensor(1.0)).item() == 2.0
    assert seen == [False] and calls == [1]


def test_inside_a_compiled_function_it_runs_eagerly_every_call():
    """Traced, its Python side effect would run once, at tracing, and is_compiling() be True."""
    record, seen = _recorder()

    @torch.compile(backend="eager")
    def f(x):
        return record(x) * 2

    for i in range(3):
        assert f(torch.tensor(float(i))).item() == 2.0 * (i + 1)
    assert seen == [False, False, False]


def test_called_from_autograd_inside_a_compiled_function():
    """A hook autograd runs from a compiled function's backward() call, as the gradient
    engine's entry points are."""
    record, seen = _recorder()
    w = torch.randn(3, requires_grad=True)
    w.register_hook(lambda g: record(g) - 1)

    @torch.compile(backend="eager")
    def f(x):
        (w * x).sum().backward()

    x = torch.randn(3)
    f(x)
    f(x)
    assert seen == [False, False]
    torch.testing.assert_close(w.grad, 2 * x)


def test_the_wrapper_keeps_the_functions_name_and_marks_it_for_dynamo():
    def step():
        """Doc."""
    wrapped = eager(step)
    assert wrapped.__name__ == "step" and wrapped.__doc__ == "Doc."
    assert wrapped._torchdynamo_disable is True


def test_without_dynamos_private_calls_it_is_torchs_wrapper(monkeypatch):
    monkeypatch.setattr(eager_module, "_FAST", False)
    record, seen = _recorder()

    @torch.compile(backend="eager")
    def f(x):
        return record(x) * 2

    assert f(torch.tensor(1.0)).item() == 4.0 and record(torch.tensor(0.0)).item() == 1.0
    assert seen == [False, False]
