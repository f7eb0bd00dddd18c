"""backend.fast_twin: an op's reference, and the one fast twin per device kind that runs
in its place (the dispatch itself; tests/test_fast_paths.py checks each twin's bits)."""

from __future__ import annotations

import numpy as np
import pytest

import vae_np  # noqa: F401  (registers every op of the package in FAST_OPS)
from vae_np import backend as backend_module
from vae_np.backend import FAST_OPS, _twin_table, fast_twin, twin_of, use_fast_paths


@pytest.fixture
def toy_op(monkeypatch):
    """A registered op ``test_twins.double`` whose CPU twin adds one, so the two differ."""
    monkeypatch.setattr(backend_module, "FAST_OPS", dict(FAST_OPS))

    def double(x, scale=2.0):
        return x * scale

    double.__module__, double.__qualname__ = "tests.test_twins", "double"
    op = fast_twin(double)
    calls = []

    def twin(x, scale=2.0):
        calls.append(scale)
        return NotImplemented if scale != 2.0 else x * scale + 1.0

    table = dict(_twin_table("cpu"), **{op.op_name: twin})
    monkeypatch.setitem(backend_module._TWIN_TABLES, "cpu", table)
    return op, calls


def test_numpy_arrays_run_the_cpu_twin(toy_op):
    op, calls = toy_op
    assert op.op_name == "test_twins.double"
    np.testing.assert_array_equal(op(np.ones(3)), np.full(3, 3.0))
    assert calls == [2.0]
    assert twin_of("test_twins.double", np.ones(3)) is not None


def test_the_reference_runs_when_fast_paths_are_off(toy_op):
    op, calls = toy_op
    with use_fast_paths(False):
        np.testing.assert_array_equal(op(np.ones(3)), np.full(3, 2.0))
        assert twin_of("test_twins.double", np.ones(3)) is None
    assert calls == []


def test_not_implemented_hands_back_to_the_reference(toy_op):
    op, calls = toy_op
    np.testing.assert_array_equal(op(np.ones(2), scale=3.0), np.full(2, 3.0))
    assert calls == [3.0]


def test_array_api_strict_and_python_numbers_run_the_reference(toy_op):
    xps = pytest.importorskip("array_api_strict")
    op, calls = toy_op
    out = op(xps.ones(3, dtype=xps.float64))
    assert float(xps.sum(out)) == 6.0
    assert op(1.5) == 3.0
    assert calls == []


def test_the_first_array_argument_picks_the_device(monkeypatch):
    """Leading non-array arguments (a method's self, a number) are skipped."""
    monkeypatch.setattr(backend_module, "FAST_OPS", dict(FAST_OPS))

    def scaled(factor, x):
        return factor * x

    scaled.__module__, scaled.__qualname__ = "tests.test_twins", "scaled"
    op = fast_twin(scaled)
    table = dict(_twin_table("cpu"), **{op.op_name: lambda factor, x: factor * x - 1.0})
    monkeypatch.setitem(backend_module._TWIN_TABLES, "cpu", table)
    np.testing.assert_array_equal(op(2.0, np.ones(2)), np.ones(2))


def test_a_name_is_registered_once(toy_op):
    op, _ = toy_op
    with pytest.raises(ValueError, match="test_twins.double.*already registered"):
        fast_twin(op.reference)


def test_every_twin_has_a_registered_reference():
    """A twin whose op was renamed or removed would silently never run."""
    for kind in ("cpu", "cuda"):
        try:
            table = _twin_table(kind)
        except ImportError:  # the CUDA twins need nothing at import; numba is optional
            continue
        orphans = sorted(set(table) - set(FAST_OPS))
        assert orphans == [], f"{kind} twins without a reference: {orphans}"


def test_decorated_op_keeps_its_reference_and_docstring():
    @fast_twin
    def halve(x):
        """x / 2: (N,) -> (N,)."""
        return x / 2

    try:
        assert halve.reference(4.0) == 2.0
        assert halve.__doc__ == "x / 2: (N,) -> (N,)."
    finally:
        del FAST_OPS[halve.op_name]


def test_the_backend_names_no_fast_path():
    """The old per-backend switches (Backend.fast, .numba, .cuda_kernel) are gone: the
    twins are reached only through fast_twin, and fast_paths_enabled is the one predicate."""
    from vae_np.backend import Backend
    assert [n for n in ("fast", "numba", "cuda_kernel") if hasattr(Backend, n)] == []


@pytest.mark.parametrize("kind", ("cpu", "cuda"))
def test_every_twin_takes_its_references_arguments(kind):
    """Same parameter names, kinds and defaults as the reference, so a call by keyword or
    with a default means the same to both (the CUDA twins cannot run without a GPU: this
    is what the CPU-only suite can check of them)."""
    import inspect
    try:
        table = _twin_table(kind)
    except ImportError:
        pytest.skip(f"the {kind} twins cannot be imported here")
    if not table:
        pytest.skip(f"no {kind} twins here (numba missing)")
    for name in sorted(set(table) & set(FAST_OPS)):
        def shape(function):
            return [(p.name, p.kind, p.default)
                    for p in inspect.signature(function).parameters.values()]
        assert shape(table[name]) == shape(FAST_OPS[name]), name
