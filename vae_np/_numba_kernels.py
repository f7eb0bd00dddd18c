"""Compiled CPU kernels (numba), imported by ``vae_np.kernels`` only when numba is installed.

Each loop performs the reference's floating-point operations in the reference's order on the
array dtype. numba compiles without ``fastmath``, so LLVM neither reorders them nor contracts
``a * b + c`` into a fused multiply-add: the results are the reference's to the last bit
(tests/test_fast_paths.py checks it). ``cache=True`` keeps the machine code on disk, so
only the first run on a machine pays the compile time (about a second).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, cache=True, nogil=True)
def adam(p, g, m, v, b1, c1, b2, c2, d1, d2, lr, eps):  # pragma: no cover - compiled
    """One Adam step over flat buffers, in place; the scalars have the arrays' dtype.

    c1 = 1 - beta1, c2 = 1 - beta2, d1 = 1 - beta1^t, d2 = 1 - beta2^t (rounded once, as
    NumPy rounds a Python float when it meets an array).
    """
    for i in numba.prange(p.shape[0]):
        gi = g[i]
        mi = b1 * m[i] + c1 * gi
        vi = b2 * v[i] + c2 * (gi * gi)
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - lr * (mi / d1) / (np.sqrt(vi / d2) + eps)
