"""The training step's matrix products through NumPy's BLAS and through Intel's MKL and BLIS,
side by side: is another BLAS worth an optional extra on this machine?

    pip install mkl blis                  # oneMKL's runtime wheel (libmkl_rt), cython-blis
    python benchmarks/bench_gemm.py       # float32, 2 threads each

For each Linear of the starting configuration (784-512-512-128 encoder, 64-512-512-784
decoder) and batch 32 / 128 / 512, the three products of a step (forward x W, weight
gradient x^T dout, input gradient dout W^T, the transposes as views, as vae_np passes them)
are timed through ``numpy.matmul`` and through MKL's ``cblas_sgemm`` called with ctypes on
the same arrays, each product alone, best of 5 interleaved blocks of 20 (each library's
turn after a pause that lets the other's threads go to sleep: ``interleaved_best``). The
input gradient is also timed as its transpose, W dout^T through NumPy (the same numbers,
the BLAS given the operands the other way round and the result in the other layout). MKL
is found as ``libmkl_rt.so*`` in the environment's lib folder (where the ``mkl`` wheel
puts it) or on the loader's path; BLIS is cython-blis's ``blis.py.gemm`` (its own bundled kernels,
``BLIS_NUM_THREADS``). With neither installed, NumPy's BLAS is measured alone. Each side's
total is also given in GFLOP/s and as a share of NumPy's best square product (sizes
1024-2048), the peak the step's products are measured against.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import batch_sizes, matmul_peak, note_forced_blas_kernel  # noqa: E402  (bench_step puts the checkout on the path)

from vae_np.backend import get_backend  # noqa: E402

# The step's six Linears, encoder then decoder (the decoder's 512 x 512 too: it is timed,
# and counted in the totals, as often as the step runs it).
LAYERS = ((784, 512), (512, 512), (512, 128), (64, 512), (512, 512), (512, 784))
STEP_PRODUCTS = ("forward", "weight grad", "input grad")
# The same input gradient computed as its transpose, W dout^T (fan_in, batch): the BLAS
# given the operands the other way round, the result in the other memory layout.
TRANSPOSED_INPUT_GRAD = "input grad as (W dout^T)^T"
SETTLE_SECONDS = 0.3    # longer than any BLAS pool's spin after its last call (below)


def numpy_matmul(a, b, out):
    """out = a @ b through NumPy's BLAS: one function object for every NumPy case, which
    ``interleaved_best`` reads as one library."""
    return np.matmul(a, b, out=out)


def load_mkl():
    """(path of libmkl_rt, out = a @ b through MKL's cblas_sgemm), or (None, None): the
    library's own loader and call (vae_np/_twins_cpu.py, VAE_NP_BLAS=mkl)."""
    try:
        from vae_np import _twins_cpu as twins
    except ImportError:           # no numba: no compiled CPU ops, and no MKL path either
        return None, None
    path, gemms = twins.load_mkl()
    if gemms is None:
        return None, None

    def mkl_matmul(a, b, out):
        if not twins.mkl_product(gemms, a, b, out):
            raise ValueError("bench_gemm: MKL does not serve these operands")
        return out
    return path, mkl_matmul


def load_blis(threads: int):
    """cython-blis's gemm (``pip install blis``) as out = a @ b, or None."""
    try:
        import blis.py as blis_py
    except ImportError:
        return None
    os.environ.setdefault("BLIS_NUM_THREADS", str(threads))

    def blis_matmul(a, b, out):
        trans_a, trans_b = not a.flags.c_contiguous, not b.flags.c_contiguous
        return blis_py.gemm(a.T if trans_a else a, b.T if trans_b else b, out=out,
                            trans1=trans_a, trans2=trans_b, alpha=1.0, beta=0.0)
    return blis_matmul


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batches", type=batch_sizes, default="32,128,512")
    args = p.parse_args(argv)
    sides = {"numpy": numpy_matmul}
    path, mkl_matmul = load_mkl()
    if mkl_matmul is not None:
        sides["mkl"] = mkl_matmul
        print(f"MKL: {path}")
    try:  # after MKL is loaded, so that the limit reaches its threads too
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(args.threads, user_api="blas")  # noqa: F841 (held)
    except ImportError:
        print("threadpoolctl missing: the BLAS libraries keep their own thread counts")
    blis_matmul = load_blis(args.threads)
    if blis_matmul is not None:
        sides["blis"] = blis_matmul
    if len(sides) == 1:
        print("neither MKL nor blis found (pip install mkl blis): NumPy's BLAS alone")
    note_forced_blas_kernel()
    peak = matmul_peak(get_backend("numpy", "float32"))
    names = list(sides)
    print(f"{args.threads} threads each; float32; ms per step's three products (forward, "
          f"weight gradient, input gradient); NumPy's square-product peak {peak:.1f} GFLOP/s")
    rng = np.random.default_rng(0)
    totals: dict = {}
    for batch in args.batches:
        for fan_in, fan_out in LAYERS:
            x = rng.standard_normal((batch, fan_in)).astype(np.float32)
            w = rng.standard_normal((fan_in, fan_out)).astype(np.float32)
            dout = rng.standard_normal((batch, fan_out)).astype(np.float32)
            differ = [name for name, f in sides.items() if not np.allclose(
                f(x.T, dout, np.empty((fan_in, fan_out), np.float32)), x.T @ dout,
                rtol=1e-4, atol=1e-3)]
            if not np.allclose((w @ dout.T).T, dout @ w.T, rtol=1e-4, atol=1e-3):
                differ.append(TRANSPOSED_INPUT_GRAD)
            products = {  # name -> (a, b, out shape), as vae_np's Linear passes them
                "forward": (x, w, (batch, fan_out)),
                "weight grad": (x.T, dout, (fan_in, fan_out)),
                "input grad": (dout, w.T, (batch, fan_in)),
                TRANSPOSED_INPUT_GRAD: (w, dout.T, (fan_in, batch)),
            }
            best = interleaved_best({
                (name, product): (sides[name], operands)
                for product, operands in products.items()
                for name in (names if product != TRANSPOSED_INPUT_GRAD else ["numpy"])})
            for name in names:
                totals[(batch, name)] = totals.get((batch, name), 0.0) + totals_of(best, name)
            print(f"batch {batch:3d}  {fan_in:3d} x {fan_out:3d}: "
                  + "  ".join(f"{name} " + " + ".join(
                      f"{best[(name, product)]:.3f}" for product in STEP_PRODUCTS)
                      for name in names)
                  + "".join(f"  {name} / numpy {totals_of(best, name) / totals_of(best, 'numpy'):.2f}"
                            for name in names[1:])
                  + f"  (input grad transposed: {best[('numpy', TRANSPOSED_INPUT_GRAD)]:.3f})"
                  + (f"  (results differ: {', '.join(differ)}!)" if differ else ""))
        flops = 3 * 2 * batch * sum(a * b for a, b in LAYERS)
        print(f"batch {batch:3d}  all six layers: " + ", ".join(
            f"{name} {totals[(batch, name)]:.2f} ms ({flops / totals[(batch, name)] / 1e6:.1f} "
            f"GFLOP/s, {100 * flops / totals[(batch, name)] / 1e6 / peak:.0f}% of peak)"
            for name in names))
    return 0


def interleaved_best(cases: dict, blocks: int = 5, calls: int = 20,
                     settle_seconds: float = SETTLE_SECONDS) -> dict:
    """{key: (matmul, (a, b, out shape))} -> {key: best ms a product}: ``blocks`` rounds,
    each timing ``calls`` products into fresh outputs for every case (so a drift of the
    machine's speed reaches all cases alike).

    Cases that share a matmul (one library: the same function object) run back to back,
    the libraries in rotating order, with a pause of ``settle_seconds`` before each
    library's turn. A BLAS keeps its worker threads spinning for a while after its last
    call (OpenBLAS about 0.1 s, Intel OpenMP's KMP_BLOCKTIME 0.2 s), and the next library's
    threads would share the cores with them: measured on a 2-core Intel Xeon, MKL's
    2-thread products timed 0.02 s after OpenBLAS's took 1.5-6 times OpenBLAS's time, and
    0.70-0.81 of it in a process of their own."""
    by_library: dict = {}
    for key, (matmul, _) in cases.items():
        by_library.setdefault(matmul, []).append(key)
    libraries = list(by_library)
    best = {key: float("inf") for key in cases}
    for r in range(blocks):
        for matmul in libraries[r % len(libraries):] + libraries[:r % len(libraries)]:
            time.sleep(settle_seconds)
            for key in by_library[matmul]:
                a, b, out_shape = cases[key][1]
                start = time.perf_counter()
                for _ in range(calls):
                    matmul(a, b, np.empty(out_shape, np.float32))
                best[key] = min(best[key], (time.perf_counter() - start) / calls * 1e3)
    return best


def totals_of(best: dict, name: str) -> float:
    """One side's three products of a layer, in ms."""
    return sum(best[(name, product)] for product in STEP_PRODUCTS)


if __name__ == "__main__":
    sys.exit(main())
