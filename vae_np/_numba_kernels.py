"""Compiled CPU kernels (numba), loaded by ``Backend.numba`` only when numba is installed.

A leaf module: it imports nothing from the package. The Python that calls each kernel sits
beside the math it reproduces (``layers.MLP``, ``likelihoods.Bernoulli``, ``losses``,
``model.reparameterize``, ``optim.Adam``).

Each loop performs the reference's floating-point operations in the reference's order on the
array dtype (constants arrive already rounded to it). numba compiles without ``fastmath``,
so LLVM neither reorders them nor contracts ``a * b + c`` into a fused multiply-add: the
results are the reference's to the last bit (tests/test_fast_paths.py checks it).

Single-threaded on purpose. A parallel loop (``prange``) brings numba's own thread pool,
whose idle workers spin next to OpenBLAS's and starve its matrix products: measured on two
cores, the parallel Adam made the whole step twice as slow. One core streaming the buffers
is close to the memory bandwidth anyway. ``cache=True`` keeps the machine code on disk, so
only the first run on a machine pays the compile time (a second or two).
``error_model="numpy"``: a division by zero gives inf or NaN, as in NumPy, instead of
raising; it also drops the per-element zero check that kept LLVM from vectorising the
loops (Adam ran 4.7 times slower with Python's error model).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, error_model="numpy")
def adam(p, g, m, v, b1, c1, b2, c2, d1, d2, lr, eps, tiny):  # pragma: no cover - compiled
    """One Adam step over flat buffers, in place (optim.Adam._update_reference): moments
    below ``tiny`` (the dtype's smallest normal number) in magnitude become +0.

    c1 = 1 - beta1, c2 = 1 - beta2, d1 = 1 - beta1^t, d2 = 1 - beta2^t.
    """
    zero = m.dtype.type(0)
    for i in range(p.shape[0]):
        gi = g[i]
        mi = b1 * m[i] + c1 * gi
        vi = b2 * v[i] + c2 * (gi * gi)
        if abs(mi) < tiny:          # NaN compares False and stays, as in the reference
            mi = zero
        if vi < tiny:
            vi = zero
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - lr * (mi / d1) / (np.sqrt(vi / d2) + eps)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def bias_relu(y, b):  # pragma: no cover - compiled
    """y = maximum(y + b, 0) in place, (N, D) and (D,): Linear's bias add and the ReLU after
    it in one pass. numpy.maximum(s, 0.0) returns s for s > 0 or NaN, else +0.0 (also for
    s = -0.0), and so does this."""
    zero = y.dtype.type(0)
    for i in range(y.shape[0]):
        for j in range(y.shape[1]):
            s = y[i, j] + b[j]
            y[i, j] = s if (s > zero or s != s) else zero


@numba.njit(cache=True, nogil=True, error_model="numpy")
def relu_backward(out, dout):  # pragma: no cover - compiled
    """dout = where(out > 0, dout, 0) in place, (N, D) arrays (layers.ReLU.backward)."""
    zero = dout.dtype.type(0)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            if not out[i, j] > 0:
                dout[i, j] = zero


@numba.njit(cache=True, nogil=True, error_model="numpy")
def relu_backward_bias_grad(out, dout, db):  # pragma: no cover - compiled
    """relu_backward, and db = sum(dout, axis=0) of the Linear below in the same pass.
    NumPy sums axis 0 of a C-ordered (N, D >= 2) array row after row from zero, as here."""
    zero = dout.dtype.type(0)
    for j in range(dout.shape[1]):
        db[j] = zero
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            d = dout[i, j] if out[i, j] > zero else zero
            dout[i, j] = d
            db[j] += d


@numba.njit(cache=True, nogil=True, error_model="numpy")
def bernoulli_split(logits, neg_abs, half, h):  # pragma: no cover - compiled
    """The two arguments of the transcendental functions of the Bernoulli tail
    (likelihoods.Bernoulli._nll_fused): -|l| and h l (h = 0.5)."""
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            a = logits[i, j]
            neg_abs[i, j] = -abs(a)
            half[i, j] = h * a


@numba.njit(cache=True, nogil=True, error_model="numpy")
def bernoulli_combine(x, logits, t, u, h, scale):  # pragma: no cover - compiled
    """In place: t = log1p(exp(-|l|)) becomes term = softplus(l) - x l, and u = tanh(l / 2)
    becomes grad = (sigmoid(l) - x) * scale, operation for operation as ops.softplus,
    ops.sigmoid and losses.bernoulli_nll (numpy.maximum's NaN propagation included).
    ``scale`` is the model's 1 / (S N) (1 gives the plain gradient: an exact multiply).
    In place rather than into separate outputs that may be the same arrays: LLVM
    vectorises a loop only after checking that its arrays do not overlap."""
    zero = logits.dtype.type(0)
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            a = logits[i, j]
            xi = x[i, j]
            positive = a if (a > zero or a != a) else zero  # numpy.maximum(a, 0.0)
            t[i, j] = (positive + t[i, j]) - xi * a
            u[i, j] = ((h * u[i, j] + h) - xi) * scale


@numba.njit(cache=True, nogil=True, error_model="numpy")
def mu_plus_std_eps(mu, std, eps, z):  # pragma: no cover - compiled
    """z[s] = mu + std * eps[s] (model.reparameterize; std = exp(0.5 logvar) from NumPy)."""
    for s in range(eps.shape[0]):
        for i in range(mu.shape[0]):
            for j in range(mu.shape[1]):
                z[s, i, j] = mu[i, j] + std[i, j] * eps[s, i, j]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def kl_terms(mu, logvar, vm1, term, h):  # pragma: no cover - compiled
    """losses.kl_standard_normal after NumPy's expm1: ``vm1`` = expm1(logvar) in, the
    log-variance gradient h vm1 out (h = 0.5, in place); term = (vm1 - logvar) + mu mu,
    which the caller sums over rows with NumPy (pairwise, as the reference)."""
    for i in range(mu.shape[0]):
        for j in range(mu.shape[1]):
            v = vm1[i, j]
            m = mu[i, j]
            term[i, j] = (v - logvar[i, j]) + m * m
            vm1[i, j] = h * v
