"""Compiled CPU kernels (numba), imported by ``vae_np.kernels`` only when numba is installed.

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
def adam(p, g, m, v, b1, c1, b2, c2, d1, d2, lr, eps):  # pragma: no cover - compiled
    """One Adam step over flat buffers, in place (optim.Adam._update_reference).

    c1 = 1 - beta1, c2 = 1 - beta2, d1 = 1 - beta1^t, d2 = 1 - beta2^t.
    """
    for i in range(p.shape[0]):
        gi = g[i]
        mi = b1 * m[i] + c1 * gi
        vi = b2 * v[i] + c2 * (gi * gi)
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
def bernoulli_split(out, b, neg_abs, half, h):  # pragma: no cover - compiled
    """The two arguments of the transcendental functions for the logits l = out + b (the
    decoder's last bias add, done here instead of in a pass of its own): -|l| and h l
    (h = 0.5)."""
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            a = out[i, j] + b[j]
            neg_abs[i, j] = -abs(a)
            half[i, j] = h * a


@numba.njit(cache=True, nogil=True, error_model="numpy")
def bernoulli_combine(x, out, b, t, u, h, scale, db):  # pragma: no cover - compiled
    """In place: t = log1p(exp(-|l|)) becomes term = softplus(l) - x l, and u = tanh(l / 2)
    becomes grad = (sigmoid(l) - x) * scale, operation for operation as ops.softplus,
    ops.sigmoid and losses.bernoulli_nll (numpy.maximum's NaN propagation included), with
    l = out + b recomputed (the same addition as in bernoulli_split, so the same bits).

    ``scale`` is VAE.backward's 1 / (S N) (1 gives the plain gradient: an exact multiply),
    and the scaled gradient is added row by row into ``db``, the decoder's output bias
    gradient (NumPy's axis-0 sum of a C-ordered array; the caller zeroes ``db`` before the
    first block of rows). In place rather than into separate outputs that may be the same
    arrays: LLVM vectorises a loop only after checking that its arrays do not overlap."""
    zero = out.dtype.type(0)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            a = out[i, j] + b[j]
            xi = x[i, j]
            positive = a if (a > zero or a != a) else zero  # numpy.maximum(a, 0.0)
            t[i, j] = (positive + t[i, j]) - xi * a
            g = ((h * u[i, j] + h) - xi) * scale
            u[i, j] = g
            db[j] += g


@numba.njit(cache=True, nogil=True, error_model="numpy")
def reparameterize(mu, std, eps, z):  # pragma: no cover - compiled
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


@numba.njit(cache=True, nogil=True, error_model="numpy")
def latent_backward(dz, eps, mu, std, dkl_dlogvar, c, h, g):  # pragma: no cover - compiled
    """VAE.backward from dz (S, N, d) to the encoder's output gradient g (N, 2d), in one
    pass and without the concatenate:

        g[:, :d] = sum_s dz[s]         + c mu             (dmu + beta/N dkl_dmu)
        g[:, d:] = sum_s dz[s] eps[s] * (h std) + c dkl_dlogvar

    c = beta / N, h = 0.5, std = exp(0.5 logvar) (the forward's, same bits as the
    reference's recomputation). The S-sums run from zero in order s = 0, 1, ..., as
    NumPy's axis-0 sum of a C-ordered array does."""
    zero = g.dtype.type(0)
    d = mu.shape[1]
    for i in range(mu.shape[0]):
        for j in range(d):
            a = zero
            b = zero
            for s in range(dz.shape[0]):
                a += dz[s, i, j]
                b += dz[s, i, j] * eps[s, i, j]
            g[i, j] = a + c * mu[i, j]
            g[i, d + j] = b * (h * std[i, j]) + c * dkl_dlogvar[i, j]
