"""The compiled CPU twins of the ops (numba), keyed by op name: see ``backend.fast_twin``.

A leaf: it imports nothing from the package. Loaded by ``backend`` on the first op called
on a NumPy array; importing it fails with ImportError(name="numba") when numba is missing,
and the references run.

Each twin takes its reference's arguments and returns its results, to the last bit
(tests/test_fast_paths.py), or NotImplemented for arguments it does not serve: anything but
NumPy arrays of one float dtype in the shapes the op documents. The reference then runs,
and it also raises the errors that bad arguments deserve, so a twin never validates.

Each compiled loop performs the reference's floating-point operations in the reference's
order on the array dtype (constants arrive already rounded to it). numba compiles without
``fastmath``, so LLVM neither reorders them nor contracts ``a * b + c`` into a fused
multiply-add. Transcendental functions (exp, log1p, tanh, expm1) stay NumPy's own, whose
last bits a compiled loop would not reproduce: the loops run around them.

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

import math

import numba
import numpy as np

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_jit = numba.njit(cache=True, nogil=True, error_model="numpy")


def _served(*arrays) -> bool:
    """All plain NumPy arrays of one float dtype (what the compiled loops are for)."""
    first = arrays[0]
    if type(first) is not np.ndarray or first.dtype not in _FLOATS:
        return False
    return all(type(a) is np.ndarray and a.dtype == first.dtype for a in arrays[1:])


# ------------------------------------------------------------------------------------------
# layers: Linear + ReLU forward, ReLU backward, a product written into a gradient buffer


@_jit
def bias_relu(y, b):  # pragma: no cover - compiled
    """y = maximum(y + b, 0) in place, (N, D) and (D,). numpy.maximum(s, 0.0) returns s for
    s > 0 or NaN, else +0.0 (also for s = -0.0), and so does this."""
    zero = y.dtype.type(0)
    for i in range(y.shape[0]):
        for j in range(y.shape[1]):
            s = y[i, j] + b[j]
            y[i, j] = s if (s > zero or s != s) else zero


def linear_relu_forward(x, W, b):
    """The product in a fresh array, then the bias add and the ReLU in place, one pass."""
    if not (_served(x, W, b) and x.ndim == 2 and W.ndim == 2 and b.shape == (W.shape[1],)
            and x.shape[1] == W.shape[0]):
        return NotImplemented
    out = np.matmul(x, W)
    bias_relu(out, b)
    return out


@_jit
def relu_mask(out, dout, dx):  # pragma: no cover - compiled
    """dx = where(out > 0, dout, 0), (N, D) arrays."""
    zero = dout.dtype.type(0)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            dx[i, j] = dout[i, j] if out[i, j] > zero else zero


def relu_backward(out, dout):
    """One pass instead of the reference's mask and where() (C-ordered arrays only, so the
    result has the reference's layout and the products after it see the same operands)."""
    if not (_served(out, dout) and out.ndim == 2 and out.shape == dout.shape
            and out.flags.c_contiguous and dout.flags.c_contiguous):
        return NotImplemented
    dx = np.empty(dout.shape, dtype=dout.dtype)
    relu_mask(out, dout, dx)
    return dx


def matmul_into(out, a, b):
    """The product written by BLAS straight into ``out`` (no temporary, no copy)."""
    if not (_served(out, a, b) and a.ndim == 2 and b.ndim == 2 and out.flags.c_contiguous
            and out.shape == (a.shape[0], b.shape[1]) and a.shape[1] == b.shape[0]):
        return NotImplemented
    return np.matmul(a, b, out=out)


# ------------------------------------------------------------------------------------------
# losses: the KL term and the Bernoulli negative log-likelihood


@_jit
def kl_terms(mu, logvar, vm1, term, h):  # pragma: no cover - compiled
    """``vm1`` = expm1(logvar) in, the log-variance gradient h vm1 out (h = 0.5, in place);
    term = (vm1 - logvar) + mu mu, which the caller sums over rows (pairwise, as NumPy)."""
    for i in range(mu.shape[0]):
        for j in range(mu.shape[1]):
            v = vm1[i, j]
            m = mu[i, j]
            term[i, j] = (v - logvar[i, j]) + m * m
            vm1[i, j] = h * v


def kl_standard_normal(mu, logvar, reduction="none"):
    """One compiled pass after NumPy's own expm1 (reduction "none" only)."""
    if not (reduction == "none" and _served(mu, logvar) and mu.ndim == 2
            and mu.shape == logvar.shape):
        return NotImplemented
    dlogvar = np.expm1(logvar)
    term = np.empty_like(dlogvar)
    kl_terms(mu, logvar, dlogvar, term, mu.dtype.type(0.5))
    kl = np.sum(term, axis=1)
    kl *= 0.5
    return kl, mu, dlogvar


@_jit
def bernoulli_split(logits, neg_abs, half, h):  # pragma: no cover - compiled
    """The arguments of the transcendental functions: -|l| and h l (h = 0.5)."""
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            a = logits[i, j]
            neg_abs[i, j] = -abs(a)
            half[i, j] = h * a


@_jit
def bernoulli_combine(x, logits, t, u, h):  # pragma: no cover - compiled
    """In place: t = log1p(exp(-|l|)) becomes term = softplus(l) - x l, and u = tanh(l / 2)
    becomes grad = sigmoid(l) - x, operation for operation as ops.softplus, ops.sigmoid
    and losses.bernoulli_nll (numpy.maximum's NaN propagation included). In place rather
    than into separate outputs that may be the same arrays: LLVM vectorises a loop only
    after checking that its arrays do not overlap."""
    zero = logits.dtype.type(0)
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            a = logits[i, j]
            xi = x[i, j]
            positive = a if (a > zero or a != a) else zero  # numpy.maximum(a, 0.0)
            t[i, j] = (positive + t[i, j]) - xi * a
            u[i, j] = (h * u[i, j] + h) - xi


#: Elements per row block of the Bernoulli twin: four such float64 blocks fit in a 2 MiB
#: L2 cache across its passes.
BERNOULLI_BLOCK = 1 << 16


def bernoulli_nll(x, logits, reduction="none"):
    """Three arrays instead of a dozen (reduction "none" only): compiled passes around
    NumPy's exp, log1p and tanh, in blocks of rows that stay in cache, the per-pixel terms
    living only in one block-sized scratch. Rows are independent, so blocks change no
    result (each row's sum is NumPy's pairwise sum over the same c numbers)."""
    if not (reduction == "none" and _served(x, logits) and logits.ndim == 2
            and x.shape == logits.shape):
        return NotImplemented
    h = logits.dtype.type(0.5)
    m, c = logits.shape
    grad = np.empty_like(logits, order="C")
    nll = np.empty(m, dtype=logits.dtype)
    rows = max(1, min(m, BERNOULLI_BLOCK // max(c, 1)))
    scratch = np.empty((rows, c), dtype=logits.dtype)
    for lo in range(0, m, rows):
        block = slice(lo, lo + rows)
        lb, u = logits[block], grad[block]
        t = scratch[:lb.shape[0]]
        bernoulli_split(lb, t, u, h)                       # t = -|l|, u = l / 2
        np.exp(t, out=t)
        np.log1p(t, out=t)                                  # t = log1p(exp(-|l|))
        np.tanh(u, out=u)                                   # u = tanh(l / 2)
        bernoulli_combine(x[block], lb, t, u, h)           # t = term, u = grad
        np.sum(t, axis=1, out=nll[block])
    return nll, grad


# ------------------------------------------------------------------------------------------
# optim: Adam


@_jit
def adam_step(p, g, m, v, b1, c1, b2, c2, d1, d2, lr, eps, tiny):  # pragma: no cover - compiled
    """One Adam step over flat buffers, in place: moments below ``tiny`` (the dtype's
    smallest normal number) in magnitude become +0.
    c1 = 1 - beta1, c2 = 1 - beta2, d1 = 1 - beta1^t, d2 = 1 - beta2^t."""
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


def adam_update(p, g, m, v, t, lr, beta1, beta2, eps):
    """The reference's operations in one pass over the flat buffers, without temporaries
    (the reference makes some sixteen passes and five temporaries)."""
    if not (_served(p, g, m, v) and p.ndim == 1 and p.shape == g.shape == m.shape == v.shape):
        return NotImplemented
    dt = p.dtype.type
    # Each Python-float constant rounded to the array dtype once, as NumPy rounds a Python
    # float meeting an array (1 - beta1 is formed in double first, as there).
    adam_step(p, g, m, v, dt(beta1), dt(1.0 - beta1), dt(beta2), dt(1.0 - beta2),
          dt(1.0 - beta1 ** t), dt(1.0 - beta2 ** t), dt(lr), dt(eps), dt(np.finfo(dt).tiny))
    return None


# ------------------------------------------------------------------------------------------
# objectives: reparameterisation and the importance-weighted bound


@_jit
def mu_plus_std_eps(mu, std, eps, z):  # pragma: no cover - compiled
    """z[s] = mu + std * eps[s] (std = exp(0.5 logvar) from NumPy)."""
    for s in range(eps.shape[0]):
        for i in range(mu.shape[0]):
            for j in range(mu.shape[1]):
                z[s, i, j] = mu[i, j] + std[i, j] * eps[s, i, j]


def reparameterize(mu, logvar, eps):
    """NumPy's own exp, then one compiled pass for the S samples."""
    if not (_served(mu, logvar, eps) and mu.ndim == 2 and mu.shape == logvar.shape
            and eps.ndim == 3 and eps.shape[1:] == mu.shape):
        return NotImplemented
    std = np.multiply(logvar, 0.5)
    np.exp(std, out=std)
    z = np.empty(eps.shape, dtype=mu.dtype)
    mu_plus_std_eps(mu, std, eps, z)
    return z


def iwae_bound(log_w):
    """One (S, N) array instead of four: the reference's operations in place (the arrays
    are a few thousand numbers, so a compiled loop, which could not reproduce NumPy's exp
    anyway, would gain nothing)."""
    if not (_served(log_w) and log_w.ndim == 2):
        return NotImplemented
    peak = np.max(log_w, axis=0, keepdims=True)                     # (1, N)
    peak[~np.isfinite(peak)] = 0.0       # an all -inf example: shift by 0, not -inf
    weights = np.subtract(log_w, peak)
    np.exp(weights, out=weights)
    total = np.sum(weights, axis=0, keepdims=True)
    bound = np.log(total)
    bound += peak
    bound -= math.log(log_w.shape[0])
    total[~(total > 0)] = 1.0            # its weights are 0 / 1 = 0
    weights /= total
    return np.reshape(bound, (-1,)), weights


def iwae_latent_backward(dz, dloss_dnll, z, logvar, eps):
    """The prior's term added in place (a z + dz is dz + a z to the bit), then
    reparameterize_backward's two sums, and ln q's term subtracted in place."""
    if not (_served(dz, dloss_dnll, z, logvar, eps) and dz.ndim == 3
            and dz.shape == z.shape == eps.shape and dloss_dnll.shape == dz.shape[:2]
            and logvar.shape == dz.shape[1:]):
        return NotImplemented
    total = np.multiply(dloss_dnll[:, :, None], z)
    total += dz
    dmu = np.sum(total, axis=0)
    dlogvar = np.sum(total * eps, axis=0) * (0.5 * np.exp(0.5 * logvar))
    half = np.sum(dloss_dnll, axis=0)
    half *= 0.5
    dlogvar -= half[:, None]
    return dmu, dlogvar


#: op name ("module.qualname") -> twin taking the reference's arguments.
TWINS: dict = {
    "layers.linear_relu_forward": linear_relu_forward,
    "layers.relu_backward": relu_backward,
    "layers.matmul_into": matmul_into,
    "losses.kl_standard_normal": kl_standard_normal,
    "losses.bernoulli_nll": bernoulli_nll,
    "optim.adam_update": adam_update,
    "objectives.reparameterize": reparameterize,
    "objectives.iwae_bound": iwae_bound,
    "objectives.iwae_latent_backward": iwae_latent_backward,
}
