"""VAE_NP_BLAS: the products of the CPU ops through NumPy's BLAS (the default) or MKL.

With MKL the products sum their terms in MKL's order, so results differ from NumPy's in the
last bits: these tests compare with tolerances (float64: 1e-12 of the terms' scale, a few
hundred units of its last place for sums of up to 784 terms; float32: 1e-5), and check
that the choice is refused clearly when it cannot be had. The MKL tests run where MKL's
runtime library is installed (`pip install -e ".[mkl]"`) and skip elsewhere; the refusals
run everywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from vae_np import VAE, backend as backend_module, get_backend  # noqa: E402
from vae_np import _twins_cpu as twins  # noqa: E402
from vae_np.backend import BackendUnavailableError, use_fast_paths  # noqa: E402

HAVE_MKL = twins.load_mkl()[1] is not None
needs_mkl = pytest.mark.skipif(not HAVE_MKL, reason="MKL's runtime library (libmkl_rt) is "
                               'not installed (pip install -e ".[mkl]")')


@pytest.fixture
def through_mkl():
    """The products through MKL for one test, then NumPy's BLAS again (the twin table
    loaded first: its first load sets the BLAS that VAE_NP_BLAS asks for)."""
    backend_module._twin_table("cpu")
    twins.use_blas("mkl")
    try:
        yield
    finally:
        twins.use_blas("numpy")


def fresh_twin_tables(monkeypatch, blas):
    """VAE_NP_BLAS=blas and no twin table loaded yet, as in a new process (both restored
    after the test)."""
    monkeypatch.setenv("VAE_NP_BLAS", blas)
    monkeypatch.setattr(backend_module, "_TWIN_TABLES", {})


def test_an_unknown_blas_is_refused_naming_the_variable_and_the_choices(monkeypatch):
    fresh_twin_tables(monkeypatch, "openblas")
    with pytest.raises(BackendUnavailableError, match=r"VAE_NP_BLAS=openblas: expected one "
                                                      r"of numpy, mkl, got 'openblas'"):
        get_backend("numpy")


def test_mkl_asked_for_but_missing_is_refused_with_the_install_hint(monkeypatch):
    fresh_twin_tables(monkeypatch, "mkl")
    monkeypatch.setattr(twins, "load_mkl", lambda: (None, None))
    with pytest.raises(BackendUnavailableError, match=r"VAE_NP_BLAS=mkl: MKL's runtime "
                                                      r"library \(libmkl_rt\) was not found"):
        get_backend("numpy", "float64")
    assert twins._MKL_GEMM is None          # nothing half-switched: NumPy's BLAS still runs


@pytest.mark.slow
def test_the_cli_refuses_an_unknown_blas_in_one_line_and_writes_nothing(tmp_path):
    env = {**os.environ, "VAE_NP_BLAS": "openblas"}
    out = subprocess.run([sys.executable, "-m", "vae_np", "train", "--out",
                          str(tmp_path / "run"), "--epochs", "1"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "vae-np train: error: VAE_NP_BLAS=openblas: expected one of numpy, mkl, got "
        "'openblas'"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_mkl_asked_for_without_numba_is_refused_in_a_fresh_process():
    code = ("import sys; sys.modules['numba'] = None\n"
            "import vae_np\n"
            "try:\n"
            "    vae_np.get_backend('numpy')\n"
            "except vae_np.BackendUnavailableError as exc:\n"
            "    print(exc)\n")
    env = {**os.environ, "VAE_NP_BLAS": "mkl"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "VAE_NP_BLAS=mkl" in out.stdout and "need numba" in out.stdout


def test_the_default_blas_is_numpys_own(monkeypatch):
    fresh_twin_tables(monkeypatch, "")
    get_backend("numpy")
    assert twins._MKL_GEMM is None


@needs_mkl
@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(0, 9), n=st.integers(1, 9),
       trans_a=st.booleans(), trans_b=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
def test_products_through_mkl_match_numpys(m, k, n, trans_a, trans_b, dtype, seed):
    """Every operand layout a layer passes (C-ordered, or the transpose of a C-ordered
    matrix), an empty inner dimension included (NumPy's own call then)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    a, b = (a.T if trans_a else a), (b.T if trans_b else b)
    expected = a @ b
    twins.use_blas("mkl")
    try:
        got = twins.matmul(a, b)
        into = twins.matmul_into(np.full((m, n), np.nan, dtype), a, b)
    finally:
        twins.use_blas("numpy")
    scale = np.abs(a) @ np.abs(b) + np.finfo(dtype).tiny
    tolerance = 1e-12 if dtype == np.float64 else 1e-5
    for result in (got, into):
        assert result.dtype == dtype and result.shape == (m, n)
        assert np.all(np.abs(result - expected) <= tolerance * scale)


@needs_mkl
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_step_through_mkl_has_the_references_gradients(dtype, through_mkl):
    """The whole loss and backward of a VAE with its products through MKL against the
    readable reference (NumPy's BLAS, no twins), from the same weights and noise."""
    backend = get_backend("numpy", dtype)
    rng = np.random.default_rng(0)
    x = backend.asarray((rng.random((16, 784)) < 0.3).astype(dtype))
    eps = backend.asarray(rng.standard_normal((1, 16, 8)).astype(dtype))
    results = []
    for fast in (True, False):
        model = VAE(784, (64, 32), 8, backend=backend, seed=3)
        with use_fast_paths(fast):
            loss = float(model.loss(x, eps=eps).loss)
            model.backward()
        results.append((loss, model.parameters.grad.copy()))
    (fast_loss, fast_grad), (ref_loss, ref_grad) = results
    tolerance = 1e-12 if dtype == "float64" else 2e-5
    assert abs(fast_loss - ref_loss) <= tolerance * abs(ref_loss)
    assert np.max(np.abs(fast_grad - ref_grad)) <= tolerance * np.max(np.abs(ref_grad))
    assert twins._MKL_GEMM is not None      # the products did run through MKL

