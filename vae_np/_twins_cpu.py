"""The compiled CPU twins of the ops (numba), keyed by op name: see ``backend.fast_twin``.

A leaf: it imports nothing from the package. Loaded by ``backend`` on the first op called
on a NumPy array; importing it fails with ImportError(name="numba") when numba is missing,
and the references run.

Each twin takes its reference's arguments and returns its results, to the last bit
(tests/test_fast_paths.py; with VAE_NP_BLAS=mkl the matrix products excepted, see
``product``), or NotImplemented for arguments it does not serve: anything but
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

import ctypes
import ctypes.util
import glob
import math
import os
import sys

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
# The BLAS of the layers' matrix products: NumPy's own (OpenBLAS, in NumPy's wheels) or,
# with VAE_NP_BLAS=mkl, Intel's MKL through its C interface (cblas_sgemm / cblas_dgemm).
# On a 2-core Intel Xeon MKL's products took 0.67 / 0.75 / 0.86 of OpenBLAS's time at batch
# 32 / 128 / 512 (benchmarks/README.md, "MKL on this Intel Xeon"). MKL sums a product's
# terms in its own order, so with it the products, and what follows from them, differ from
# the references' (NumPy's) in the last bits: opt-in, outside the to-the-bit contract.

BLAS_NAMES = ("numpy", "mkl")
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def load_mkl():
    """(path, {dtype: cblas_?gemm}) from MKL's single dynamic library (libmkl_rt, which the
    ``mkl`` wheel puts in the environment's lib folder), or (None, None) when it is not
    found. (benchmarks/bench_gemm.py times the same functions.)"""
    candidates = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
    found = ctypes.util.find_library("mkl_rt")
    for path in [*candidates, *([found] if found else [])]:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        return path, _cblas_gemms(lib, lambda letter: f"cblas_{letter}gemm", ctypes.c_int)
    return None, None


def _cblas_gemms(lib, name_of, integer):
    """{dtype: cblas_?gemm} of ``lib``, the functions ``name_of("s")`` and ``name_of("d")``
    declared with ``integer`` for the sizes (ctypes.c_int for LP64 BLAS, ctypes.c_int64
    for ILP64); AttributeError when one is missing."""
    gemms = {}
    for dtype, letter, scalar in ((np.float32, "s", ctypes.c_float),
                                  (np.float64, "d", ctypes.c_double)):
        gemm = getattr(lib, name_of(letter))
        gemm.restype = None
        gemm.argtypes = ([ctypes.c_int] * 3 + [integer] * 3
                         + [scalar, ctypes.c_void_p, integer, ctypes.c_void_p, integer,
                            scalar, ctypes.c_void_p, integer])
        gemms[np.dtype(dtype)] = gemm
    return gemms


def load_numpy_blas():
    """{dtype: cblas_?gemm} of the BLAS inside NumPy's own wheels (scipy-openblas, 64-bit
    integers: ``scipy_cblas_sgemm64_``), the library NumPy's matmul already runs on, or
    None where NumPy was built otherwise. The same loaded library, so its threads are
    NumPy's (threadpoolctl's limits hold). Used where a product must add into its output
    (beta = 1), which numpy.matmul cannot: the conv twin's per-offset products. A 2x2
    product is checked against numpy.matmul before the functions are handed out."""
    folder = os.path.dirname(np.__file__)
    # NumPy 2's wheels (scipy-openblas64), then NumPy 1's (openblas64_): both suffix 64_
    for library, prefix in (("libscipy_openblas64_*", "scipy_"), ("libopenblas64_*", "")):
        for path in sorted(glob.glob(os.path.join(folder, os.pardir, "numpy.libs", library))
                           + glob.glob(os.path.join(folder, ".dylibs", library))):
            gemms = _ilp64_gemms(path, prefix)
            if gemms is not None:
                return gemms
    return None


def _ilp64_gemms(path, prefix):
    """{dtype: gemm} from the ILP64 OpenBLAS at ``path`` whose symbols are
    ``{prefix}cblas_?gemm64_``, or None when it does not load, lacks them, or fails the
    check."""
    try:
        gemms = _cblas_gemms(ctypes.CDLL(path), lambda letter: f"{prefix}cblas_{letter}gemm64_",
                             ctypes.c_int64)
    except (OSError, AttributeError):
        return None
    if all(_gemm_adds_into_its_output(gemm, dtype) for dtype, gemm in gemms.items()):
        return gemms
    return None


def _gemm_adds_into_its_output(gemm, dtype) -> bool:
    a = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=dtype)
    b = np.array([[5.0, 6.0], [7.0, 8.0]], dtype=dtype)
    out = np.ones((2, 2), dtype=dtype)
    gemm(_ROW_MAJOR, _NO_TRANS, _TRANS, 2, 2, 2, 1.0, a.ctypes.data, 2, b.ctypes.data, 2,
         1.0, out.ctypes.data, 2)
    return bool(np.array_equal(out, a @ b.T + 1))


_MKL_GEMM = None     # {dtype: cblas_?gemm} while the products run through MKL


def use_blas(name: str) -> None:
    """Run the products through ``name``, one of BLAS_NAMES (the backend passes what
    VAE_NP_BLAS asks for). Raises ValueError for another name, LookupError when MKL's
    runtime library is not found."""
    global _MKL_GEMM
    if name not in BLAS_NAMES:
        raise ValueError(f"expected one of {', '.join(BLAS_NAMES)}, got {name!r}")
    gemms = load_mkl()[1] if name == "mkl" else None
    if name == "mkl" and gemms is None:
        raise LookupError("MKL's runtime library (libmkl_rt) was not found; install it "
                          "with `pip install -e \".[mkl]\"`")
    _MKL_GEMM = gemms


def _gemm_operand(a):
    """(C-ordered base, transposed?) for a C-ordered matrix or the transpose of one."""
    if a.flags.c_contiguous:
        return a, False
    if a.T.flags.c_contiguous:
        return a.T, True
    return None, False


def mkl_product(gemms, a, b, out) -> bool:
    """out[...] = a @ b through MKL's ``gemms`` (:func:`load_mkl`) when a and b are
    C-ordered matrices or transposes of C-ordered ones, none of the sizes 0, and out a
    C-ordered (M, N) array of their dtype; False (out untouched) when not served."""
    base_a, trans_a = _gemm_operand(a)
    base_b, trans_b = _gemm_operand(b)
    if base_a is None or base_b is None or min(a.shape[0], a.shape[1], b.shape[1]) == 0:
        return False
    m, k = a.shape
    n = b.shape[1]
    gemms[out.dtype](_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS,
                     _TRANS if trans_b else _NO_TRANS, m, n, k, 1.0, base_a.ctypes.data,
                     base_a.shape[1], base_b.ctypes.data, base_b.shape[1], 0.0,
                     out.ctypes.data, n)
    return True


def product(a, b, out):
    """out[...] = a @ b for matrices a (M, K), b (K, N) and a C-ordered out (M, N) of one
    float dtype; returns out. Through MKL when VAE_NP_BLAS=mkl and it serves the operands
    (:func:`mkl_product`), else through numpy.matmul (NumPy's BLAS)."""
    if _MKL_GEMM is not None and mkl_product(_MKL_GEMM, a, b, out):
        return out
    return np.matmul(a, b, out=out)


def _product_shapes(a, b) -> bool:
    """a (M, K) and b (K, N): matrices whose product is defined."""
    return a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[0]


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
    if not (_served(x, W, b) and _product_shapes(x, W) and b.shape == (W.shape[1],)):
        return NotImplemented
    out = product(x, W, np.empty((x.shape[0], W.shape[1]), dtype=x.dtype))
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
    """One pass instead of the reference's mask and where() (C-ordered arrays of any shape
    only, so the result has the reference's layout and the products after it see the same
    operands)."""
    if not (_served(out, dout) and out.ndim >= 1 and out.shape == dout.shape and out.size
            and out.flags.c_contiguous and dout.flags.c_contiguous):
        return NotImplemented
    dx = np.empty(dout.shape, dtype=dout.dtype)
    rows = (-1, out.shape[-1])              # images (N, C, H, W) as rows of W: the same loop
    relu_mask(out.reshape(rows), dout.reshape(rows), dx.reshape(rows))
    return dx


@_jit
def relu_mask_column_sum(out, dout, dx, db):  # pragma: no cover - compiled
    """dx = where(out > 0, dout, 0) and db = sum(dx, axis=0), (N, D) arrays and (D,).
    NumPy sums axis 0 of a C-ordered (N, D >= 2) array row after row from zero, as here."""
    zero = dout.dtype.type(0)
    for j in range(db.shape[0]):
        db[j] = zero
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            d = dout[i, j] if out[i, j] > zero else zero
            dx[i, j] = d
            db[j] += d


def relu_backward_and_bias_grad(out, dout):
    """The mask and the column sum in one pass (C-ordered (N, D >= 2) only: a single
    column NumPy sums pairwise, which this loop would not reproduce)."""
    if not (_served(out, dout) and out.ndim == 2 and out.shape == dout.shape
            and out.shape[1] >= 2 and out.flags.c_contiguous and dout.flags.c_contiguous):
        return NotImplemented
    dx = np.empty(dout.shape, dtype=dout.dtype)
    db = np.empty(dout.shape[1], dtype=dout.dtype)
    relu_mask_column_sum(out, dout, dx, db)
    return dx, db


def matmul(a, b):
    """The product through the chosen BLAS (with NumPy's, the reference's own call)."""
    if not (_served(a, b) and _product_shapes(a, b)):
        return NotImplemented
    return product(a, b, np.empty((a.shape[0], b.shape[1]), dtype=a.dtype))


def matmul_into(out, a, b):
    """The product written by BLAS straight into ``out`` (no temporary, no copy)."""
    if not (_served(out, a, b) and _product_shapes(a, b) and out.flags.c_contiguous
            and out.shape == (a.shape[0], b.shape[1])):
        return NotImplemented
    return product(a, b, out)


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
def bernoulli_combine(x, logits, t, u, h, scale):  # pragma: no cover - compiled
    """In place: t = log1p(exp(-|l|)) becomes term = softplus(l) - x l, and u = tanh(l / 2)
    becomes grad = (sigmoid(l) - x) * scale (1 is an exact multiply), operation for
    operation as ops.softplus, ops.sigmoid and losses.bernoulli_nll (numpy.maximum's NaN
    propagation included). In place rather
    than into separate outputs that may be the same arrays: LLVM vectorises a loop only
    after checking that its arrays do not overlap."""
    zero = logits.dtype.type(0)
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            a = logits[i, j]
            xi = x[i, j]
            positive = a if (a > zero or a != a) else zero  # numpy.maximum(a, 0.0)
            t[i, j] = (positive + t[i, j]) - xi * a
            u[i, j] = ((h * u[i, j] + h) - xi) * scale


#: Elements per row block of the Bernoulli twin: four such float64 blocks fit in a 2 MiB
#: L2 cache across its passes.
BERNOULLI_BLOCK = 1 << 16


def bernoulli_nll(x, logits, reduction="none", grad_scale=1.0):
    """Three arrays instead of a dozen (reduction "none" only): compiled passes around
    NumPy's exp, log1p and tanh, in blocks of rows that stay in cache, the per-pixel terms
    living only in one block-sized scratch. Rows are independent, so blocks change no
    result (each row's sum is NumPy's pairwise sum over the same c numbers)."""
    if not (reduction == "none" and _served(x, logits) and logits.ndim == 2
            and x.shape == logits.shape and type(grad_scale) in (int, float)):
        return NotImplemented
    h = logits.dtype.type(0.5)
    scale = logits.dtype.type(grad_scale)       # as NumPy rounds a Python number
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
        bernoulli_combine(x[block], lb, t, u, h, scale)    # t = term, u = grad
        np.sum(t, axis=1, out=nll[block])
    return nll, grad


# ------------------------------------------------------------------------------------------
# optim: Adam


@_jit
def adam_step(p, g, m, v, b1, c1, b2, c2, step_size, inv_sqrt_correction2, eps,
              m_floor, tiny):  # pragma: no cover - compiled
    """One Adam step over flat buffers, in place: first moments below ``m_floor`` in
    magnitude and second moments below ``tiny`` (the dtype's smallest normal number)
    become +0. c1 = 1 - beta1, c2 = 1 - beta2, step_size = lr / (1 - beta1^t),
    inv_sqrt_correction2 = 1 / sqrt(1 - beta2^t), m_floor = tiny / min(step_size, 1)."""
    zero = m.dtype.type(0)
    for i in range(p.shape[0]):
        gi = g[i]
        mi = b1 * m[i] + c1 * gi
        vi = b2 * v[i] + c2 * (gi * gi)
        if abs(mi) < m_floor:       # NaN compares False and stays, as in the reference
            mi = zero
        if vi < tiny:
            vi = zero
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - step_size * mi / (np.sqrt(vi) * inv_sqrt_correction2 + eps)


def adam_update(p, g, m, v, t, lr, beta1, beta2, eps):
    """The reference's operations in one pass over the flat buffers, without temporaries
    (the reference makes some sixteen passes and five temporaries)."""
    if not (_served(p, g, m, v) and p.ndim == 1 and p.shape == g.shape == m.shape == v.shape):
        return NotImplemented
    dt = p.dtype.type
    # Each Python-float constant rounded to the array dtype once, as NumPy rounds a Python
    # float meeting an array (1 - beta1, the bias corrections and the flush threshold are
    # formed in double first, as there).
    tiny, step_size = float(np.finfo(dt).tiny), lr / (1.0 - beta1 ** t)
    adam_step(p, g, m, v, dt(beta1), dt(1.0 - beta1), dt(beta2), dt(1.0 - beta2),
              dt(step_size), dt(1.0 / math.sqrt(1.0 - beta2 ** t)), dt(eps),
              dt(tiny / min(step_size, 1.0)), dt(tiny))
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


# ------------------------------------------------------------------------------------------
# data: an epoch's images


@_jit
def _gather_binarize_rows(x, order, u):  # pragma: no cover - compiled
    """u[i, j] = 1 if x[order[i], j] > u[i, j] else 0, in place."""
    one, zero = u.dtype.type(1), u.dtype.type(0)
    for i in range(order.shape[0]):
        row = order[i]
        for j in range(u.shape[1]):
            u[i, j] = one if x[row, j] > u[i, j] else zero


def gather_binarize(x, order, u):
    """The gather, the comparison and the cast in one pass over ``u``, with no temporary."""
    if not (_served(x, u) and x.ndim == u.ndim == 2 and isinstance(order, np.ndarray)
            and order.dtype == np.int64 and order.ndim == 1
            and u.shape == (order.shape[0], x.shape[1]) and u.flags.c_contiguous
            and not np.may_share_memory(x, u)):   # the reference gathers before it writes
        return NotImplemented
    # The reference's take wraps negative indices and raises IndexError past the end;
    # the loop reads only rows that exist, so anything else goes to the reference.
    if order.size and not (0 <= order.min() and order.max() < x.shape[0]):
        return NotImplemented
    _gather_binarize_rows(x, order, u)
    return u


#: op name ("module.qualname") -> twin taking the reference's arguments.
TWINS: dict = {
    "layers.linear_relu_forward": linear_relu_forward,
    "layers.relu_backward": relu_backward,
    "layers.relu_backward_and_bias_grad": relu_backward_and_bias_grad,
    "layers.matmul": matmul,
    "layers.matmul_into": matmul_into,
    "losses.kl_standard_normal": kl_standard_normal,
    "losses.bernoulli_nll": bernoulli_nll,
    "optim.adam_update": adam_update,
    "objectives.reparameterize": reparameterize,
    "objectives.iwae_bound": iwae_bound,
    "objectives.iwae_latent_backward": iwae_latent_backward,
    "batches.gather_binarize": gather_binarize,
}


# ---- convolution twins (vae_np/conv.py) ---------------------------------------------------
# im2col: the input's k x k windows as the columns of one matrix, so that each product of
# the convolution's math is ONE matrix product (BLAS); col2im, its transpose, adds the
# column gradients back onto the pixels they came from. Rows are the window entries
# (c, i, j), the order of W.reshape(O, C kh kw); columns the output positions (n, p, q).
# This layout (not its transpose) is built by kh kw strided copies that write contiguous
# blocks (measured 13x faster than one 6-d transposing copy at 32 channels, and 2x faster
# than a numba loop), and col2im is one numba pass over the column gradients. See
# CONV_CHUNK_BYTES for the batch's chunks. The products sum the references' terms in
# another order (tolerance in tests/test_conv.py); col2im adds the offsets (i, j) in the
# reference's order; the max-pool loops compare and copy, so they are the references' bits.


def _offset_region(i, j, rows, cols, stride):
    """The pixels of the padded image that kernel offset (i, j) reads, as slices."""
    sh, sw = stride
    return (slice(None), slice(None), slice(i, i + sh * (rows - 1) + 1, sh),
            slice(j, j + sw * (cols - 1) + 1, sw))


def _im2col(x, kh, kw, stride, padding):
    """(columns (C kh kw, N Ho Wo), Ho, Wo) of x (N, C, H, W), zero-padded:
    columns[(c, i, j), (n, p, q)] = xpad[n, c, s_h p + i, s_w q + j]."""
    (sh, sw), (ph, pw) = stride, padding
    n, c, h, w = x.shape
    if ph or pw:
        xpad = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
        xpad[:, :, ph:ph + h, pw:pw + w] = x
    else:
        xpad = x
    rows = (h + 2 * ph - kh) // sh + 1
    cols = (w + 2 * pw - kw) // sw + 1
    columns = np.empty((c, kh, kw, n, rows, cols), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            columns[:, i, j] = xpad[_offset_region(i, j, rows, cols, stride)].transpose(1, 0, 2, 3)
    return columns.reshape(c * kh * kw, n * rows * cols), rows, cols


# The columns of a whole batch are 9 C times the input (115 MB for 128 images of 32
# channels at 28x28): written, read back by BLAS and freed on every call, they made the
# layer memory-bound. So the twins run the batch in chunks of images whose columns fit in
# CONV_CHUNK_BYTES (cache-sized), one matrix product per product of the math per chunk:
# 1.5-4x faster at batch 128 here (benchmarks/README.md). 1 MiB, not the 2 MiB of a core's
# L2: the packed BLAS panels and the products share it (a layer 0.8-0.97x the time at 2 MiB,
# benchmarks/README.md). dW sums its chunks' products.
CONV_CHUNK_BYTES = 1 << 20


def _chunks(x, kh, kw, rows, cols):
    """Slices of images whose columns take at most CONV_CHUNK_BYTES (one image at least)."""
    per_image = x.shape[1] * kh * kw * rows * cols * x.itemsize
    step = max(1, CONV_CHUNK_BYTES // per_image)
    return [slice(n, n + step) for n in range(0, x.shape[0], step)]


def _correlate(x, weight, bias, stride, padding):
    """conv2d_forward by im2col, chunk by chunk; ``bias`` None adds none."""
    o, _, kh, kw = weight.shape
    rows = (x.shape[2] + 2 * padding[0] - kh) // stride[0] + 1
    cols = (x.shape[3] + 2 * padding[1] - kw) // stride[1] + 1
    out = np.empty((x.shape[0], o, rows, cols), dtype=x.dtype)
    for chunk in _chunks(x, kh, kw, rows, cols):
        columns, _, _ = _im2col(x[chunk], kh, kw, stride, padding)
        product = (weight.reshape(o, -1) @ columns).reshape(o, -1, rows, cols)  # (O, n Ho Wo)
        # to (n, O, Ho, Wo) and the bias, in one pass
        if bias is None:
            out[chunk] = product.transpose(1, 0, 2, 3)
        else:
            np.add(product.transpose(1, 0, 2, 3), bias.reshape(o, 1, 1), out=out[chunk])
    return out


def conv2d_forward(x, weight, bias, stride, padding):
    if not _served(x, weight, bias):
        return NotImplemented
    if _same_size(weight, stride, padding):
        return _forward_flat(x, weight, bias, padding)
    return _correlate(x, weight, bias, stride, padding)


def conv2d_relu_forward(x, weight, bias, stride, padding):
    """The ReLU in the flat layout's crop (same-size convolutions; otherwise the reference
    runs: conv2d_forward's twin, then the ReLU)."""
    if not (_served(x, weight, bias) and _same_size(weight, stride, padding)):
        return NotImplemented
    return _forward_flat(x, weight, bias, padding, relu=True)


def _forward_flat(x, weight, bias, padding, relu=False):
    flat, lead, rows_each, pitch = _flat_images(x, *padding)
    # an inf in x makes NaN only at padding positions, which are dropped: not warned of
    with np.errstate(invalid="ignore"):
        return _correlate_flat(flat, lead, x.shape[0], rows_each, pitch, weight, padding,
                               x.shape[2:], bias, relu)


def conv2d_backward(dout, x, weight, stride, padding, input_grad=True):
    if not _served(dout, x, weight):
        return NotImplemented
    flat = _exact_backward_flat(dout, x, weight, stride, padding, input_grad)
    if flat is not None:
        return flat
    return _backward_im2col(dout, x, weight, stride, padding, input_grad)


def conv2d_backward_upsampled(dout, x, weight, stride, padding, scale):
    """The flat layout's dx cropped straight into its block sums (images whose sides are
    multiples of ``scale``, where the flat layout serves; otherwise the reference runs:
    conv2d_backward's twin, then upsample_backward's)."""
    if not (_served(dout, x, weight) and x.ndim == 4
            and x.shape[2] % scale == 0 and x.shape[3] % scale == 0):
        return NotImplemented
    flat = _exact_backward_flat(dout, x, weight, stride, padding, True, block=scale)
    return NotImplemented if flat is None else flat


def _exact_backward_flat(dout, x, weight, stride, padding, input_grad, block=1):
    """_backward_flat's (dx, dW, db) where they are the reference's, else None.

    The flat layout multiplies values at the padding positions that im2col never reads:
    by dout's zeros there (dW) and by W (dx). 0 * inf is NaN, so with an inf in x (then
    dW is not finite) or in W the flat results are not the reference's: None, also for a
    convolution that is not same-size."""
    if not (_same_size(weight, stride, padding) and np.isfinite(weight).all()):
        return None
    with np.errstate(all="ignore"):
        flat = _backward_flat(dout, x, weight, padding, input_grad, block)
    return flat if np.isfinite(flat[1]).all() else None


def _backward_im2col(dout, x, weight, stride, padding, input_grad):
    o, c, kh, kw = weight.shape
    _, _, rows, cols = dout.shape
    ph, pw = padding
    dbias = np.sum(dout, axis=(0, 2, 3))                            # the reference's call
    # dW^T = columns @ dout^T: the long side (C kh kw) as the product's rows, 0.83-0.93
    # the time of dout @ columns^T (benchmarks/README.md, "Same-size convolutions").
    dweight_t = np.zeros((c * kh * kw, o), dtype=x.dtype)
    dx = np.empty(x.shape, dtype=x.dtype) if input_grad else None
    # With stride 1, dx is dout correlated with the flipped kernel, channels swapped, padded
    # by k - 1 - p: the same O kh kw terms per pixel, from columns of O kh kw rows instead
    # of a C kh kw-row product and a col2im. Taken when it has no more rows (O <= C: the
    # decoder's 32 -> 1 layer builds 9 rows instead of 288). It multiplies W by dout's
    # padding, which the reference never forms (0 * inf is NaN): only for a finite W.
    transposed = input_grad and stride == (1, 1) and o <= c and ph < kh and pw < kw \
        and np.isfinite(weight).all()
    if transposed:
        dx = _correlate(dout, _flipped(weight), None, (1, 1), (kh - 1 - ph, kw - 1 - pw))
    for chunk in _chunks(x, kh, kw, rows, cols):
        columns, _, _ = _im2col(x[chunk], kh, kw, stride, padding)
        grad_rows = np.ascontiguousarray(dout[chunk].transpose(1, 0, 2, 3)).reshape(o, -1)
        dweight_t += columns @ grad_rows.T
        if not input_grad or transposed:
            continue
        n = columns.shape[1] // (rows * cols)
        dcolumns = (weight.reshape(o, -1).T @ grad_rows).reshape(c, kh, kw, n, rows, cols)
        _col2im(dcolumns, dx[chunk], *stride, *padding)
    return dx, dweight_t.T.reshape(weight.shape), dbias


def _flipped(weight):
    """W (O, C, kh, kw) -> (C, O, kh, kw) rotated by 180 degrees: the kernel that
    correlates dout into dx (stride 1)."""
    return np.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))


# Same-size convolutions (stride 1, odd kernel, padding (k - 1) / 2: every 3x3 layer of
# the conv networks) run on a flat layout instead of im2col's windows. The images lie one
# after another in one row per channel, each image row followed by p_w zero columns and
# each image by p_h zero rows, so that one image's padding is also the next one's:
#
#     flat[c, lead + (n R + r) P + s] = x[n, c, r, s]    (R = H + p_h rows, pitch P = W + p_w)
#
# Kernel offset (i, j) then reads every pixel's neighbour at one constant distance,
# d = (i - p_h) P + (j - p_w), so its columns for a run of m positions are ONE slice,
# flat[:, lead + start + d : ... + m], with rows as long as the run: the columns are kh kw
# plain 2-d copies (im2col's strided copies of W-long rows took most of the 64-channel
# layers' time), one matrix product follows as with im2col, and the outputs at the padding
# positions (the columns' (R P) / (H W) - 1 extra, 15 % at 14x14) are computed and dropped.
# dx is the same correlation of dout (laid out alike) with the flipped kernel, and dW reads
# the same columns against dout's zeros at the padding positions.


def _same_size(weight, stride, padding) -> bool:
    kh, kw = weight.shape[2:]
    return stride == (1, 1) and padding == ((kh - 1) // 2, (kw - 1) // 2) \
        and kh % 2 == 1 and kw % 2 == 1


def _flat_images(x, ph, pw):
    """(flat (C, 2 lead + N R P), lead, R, P) of x (N, C, H, W), laid out as above; lead =
    p_h P + p_w zeros before and after (the reach of the kernel's farthest offset)."""
    n, c, h, w = x.shape
    rows_each, pitch = h + ph, w + pw
    lead, length = ph * pitch + pw, n * rows_each * pitch
    flat = np.empty((c, 2 * lead + length), dtype=x.dtype)
    flat[:, :lead] = 0
    flat[:, lead + length:] = 0
    images = flat[:, lead:lead + length].reshape(c, n, rows_each, pitch)
    images[:, :, :h, :w] = x.transpose(1, 0, 2, 3)
    images[:, :, h:, :] = 0
    images[:, :, :h, w:] = 0
    return flat, lead, rows_each, pitch


def _flat_offsets(kh, kw, ph, pw, pitch):
    """The flat distance d = (i - p_h) P + (j - p_w) of each kernel offset (i, j), in the
    reference's row-major order."""
    return [(i - ph) * pitch + (j - pw) for i in range(kh) for j in range(kw)]


def _flat_columns(flat, lead, start, kh, kw, ph, pw, pitch, columns):
    """columns (C kh kw, m), rows (c, i, j) as im2col's: the kernel's offsets at flat
    positions start .. start + m - 1."""
    c, m = flat.shape[0], columns.shape[1]
    by_offset = columns.reshape(c, kh * kw, m)
    for t, d in enumerate(_flat_offsets(kh, kw, ph, pw, pitch)):
        by_offset[:, t] = flat[:, lead + start + d:lead + start + d + m]
    return columns


def _flat_add_columns(dcolumns, dx_flat, lead, start, kh, kw, ph, pw, pitch):
    """_flat_columns' transpose: each offset's column gradients (C kh kw, m) added onto the
    flat positions they were read from, offsets in the reference's row-major order. The
    columns at padding positions are 0 (dout is 0 there), so what lands on another image's
    pixels adds 0."""
    c, m = dx_flat.shape[0], dcolumns.shape[1]
    by_offset = dcolumns.reshape(c, kh * kw, m)
    for t, d in enumerate(_flat_offsets(kh, kw, ph, pw, pitch)):
        dx_flat[:, lead + start + d:lead + start + d + m] += by_offset[:, t]


@_jit
def _crop_loop(product, bias, out, add_bias, relu):  # pragma: no cover - compiled
    """out[n, o, r, s] = product[o, n, r, s] (+ bias[o] with ``add_bias``; then
    numpy.maximum(., 0.0)'s rule with ``relu``, as bias_relu), for r < H, s < W."""
    zero = out.dtype.type(0)
    n, o, h, w = out.shape
    for im in range(n):
        for ch in range(o):
            b = bias[ch]
            for r in range(h):
                for s in range(w):
                    v = product[ch, im, r, s]
                    if add_bias:
                        v = v + b
                    if relu:
                        v = v if (v > zero or v != v) else zero
                    out[im, ch, r, s] = v


def _crop_into(out, product, bias=None, relu=False, block=1):
    """out (n, O, H, W) = the image positions of a flat result (O, n, R, P), plus ``bias``
    (O,) when given, through the ReLU with ``relu``; returns out. One compiled pass: NumPy's
    strided transposing add took 2.4-5.6x its time (64 channels at 14x14, batch 128).
    ``block`` f > 1 (no bias, no ReLU): out (n, O, H / f, W / f) holds the sums of the
    image's f x f blocks instead, upsample_backward of the crop."""
    if block > 1:                # upsample_backward's loop, on the flat result's images
        _upsample_block_sums(product.transpose(1, 0, 2, 3), out, block)
        return out
    unused = bias is None
    _crop_loop(product, np.zeros(out.shape[1], out.dtype) if unused else bias, out,
               not unused, relu)
    return out


# The flat layout's chunks hold FLAT_CHUNK_ENTRIES column entries, whatever the dtype: 1 MiB
# of float32 as im2col's, 2 MiB of float64. With 1 MiB of float64 the conv VAE's float64
# step took 1.03-1.05 times the im2col twin's; with 2 MiB 0.99-1.02 (benchmarks/README.md).
FLAT_CHUNK_ENTRIES = 1 << 18


def _flat_chunks(flat, n, kh, kw, rows_each, pitch):
    """([(images, start, m)], a columns buffer for the largest): chunks of whole images
    (a slice of the batch, one image at least) whose columns hold FLAT_CHUNK_ENTRIES
    entries, each with its run of flat positions start .. start + m - 1."""
    per_image = rows_each * pitch
    step = max(1, FLAT_CHUNK_ENTRIES // (flat.shape[0] * kh * kw * per_image))
    chunks = [(slice(a, min(n, a + step)), a * per_image, (min(n, a + step) - a) * per_image)
              for a in range(0, n, step)]
    return chunks, np.empty((flat.shape[0] * kh * kw, min(step, n) * per_image),
                            dtype=flat.dtype)


# With NumPy's BLAS at hand (load_numpy_blas), the flat layout needs no columns at all:
# y = sum over the offsets of W[:, :, i, j] @ flat[:, shifted by d_ij], kh kw products of
# K = C that add into one output, each reading its slice of flat in place. From C = 16
# input channels on (K = C at least OFFSET_MIN_CHANNELS); with fewer, K = C products are
# too thin: the first layer's (C = 1) forward took 1.5x the columns' time, while the 32
# and 64-channel ones took 0.54-0.83 of it (batch 128, benchmarks/README.md).
OFFSET_MIN_CHANNELS = 16
_NUMPY_GEMM = load_numpy_blas()


def _offset_gemm(dtype, channels):
    """NumPy's BLAS gemm for ``dtype`` when the per-offset products serve ``channels``
    (their K), else None."""
    if _NUMPY_GEMM is None or channels < OFFSET_MIN_CHANNELS:
        return None
    return _NUMPY_GEMM.get(dtype)


def _correlate_offsets(gemm, flat, lead, length, pitch, weight, padding):
    """(O, length) = sum_{i, j} W[:, :, i, j] @ flat[:, lead + d_ij : lead + d_ij + length]:
    the correlation at every flat position, one product per offset adding into the last."""
    o, c, kh, kw = weight.shape
    taps = np.ascontiguousarray(weight.transpose(2, 3, 0, 1)).reshape(kh * kw, o, c)
    product = np.empty((o, length), dtype=flat.dtype)
    item = flat.itemsize
    for t, d in enumerate(_flat_offsets(kh, kw, *padding, pitch)):
        gemm(_ROW_MAJOR, _NO_TRANS, _NO_TRANS, o, length, c, 1.0, taps[t].ctypes.data, c,
             flat.ctypes.data + (lead + d) * item, flat.shape[1], 1.0 if t else 0.0,
             product.ctypes.data, length)
    return product


def _correlate_flat(flat, lead, n, rows_each, pitch, weight, padding, size, bias=None,
                    relu=False, block=1):
    """conv2d_forward of the images in ``flat`` (a same-size convolution): y (N, O, H, W),
    through the ReLU with ``relu``; with ``block`` f > 1, the sums of y's f x f blocks
    (N, O, H / f, W / f) (_crop_into)."""
    o, c, kh, kw = weight.shape
    out = np.empty((n, o, size[0] // block, size[1] // block), dtype=flat.dtype)
    gemm = _offset_gemm(flat.dtype, c)
    if gemm is not None and n > 0:
        product = _correlate_offsets(gemm, flat, lead, n * rows_each * pitch, pitch, weight,
                                     padding)
        return _crop_into(out, product.reshape(o, n, rows_each, pitch), bias, relu, block)
    chunks, buffer = _flat_chunks(flat, n, kh, kw, rows_each, pitch)
    for images, start, m in chunks:
        columns = _flat_columns(flat, lead, start, kh, kw, *padding, pitch, buffer[:, :m])
        product = weight.reshape(o, -1) @ columns
        _crop_into(out[images], product.reshape(o, -1, rows_each, pitch), bias, relu, block)
    return out


def _backward_flat(dout, x, weight, padding, input_grad, block=1):
    """conv2d_backward of a same-size convolution: (dx or None, dW, db); with ``block``
    f > 1, dx's f x f block sums (N, C, H / f, W / f) in its place."""
    o, c, kh, kw = weight.shape
    n = x.shape[0]
    dbias = np.sum(dout, axis=(0, 2, 3))                            # the reference's call
    x_flat, lead, rows_each, pitch = _flat_images(x, *padding)
    dout_flat, _, _, _ = _flat_images(dout, *padding)
    # dx as the correlation of dout with the flipped kernel (columns of O kh kw rows), or
    # as im2col's transpose, W^T dout (C kh kw rows) added back per offset: the fewer rows,
    # so correlated when O <= C. With NumPy's BLAS the correlation needs no columns, so it
    # also serves O > C when both counts reach OFFSET_MIN_CHANNELS; with few input channels
    # (C = 1: a first layer asked for dx) the transpose's 9 rows stay cheaper.
    correlated = input_grad and (o <= c or _offset_gemm(x.dtype, min(o, c)) is not None)
    dx = dx_flat = None
    if correlated:
        dx = _correlate_flat(dout_flat, lead, n, rows_each, pitch, _flipped(weight), padding,
                             x.shape[2:], block=block)
    elif input_grad:
        dx_flat = np.zeros(x_flat.shape, dtype=x.dtype)
    if o < c:
        # dW from dout's columns, the fewer rows: dW[o, c, i, j] = sum_q x[c, q] dout[o, q -
        # d_ij], and -d_ij is the offset (kh-1-i, kw-1-j), so dout's columns at the flipped
        # offsets against x (0.77 of x's columns' time for 64 -> 32 channels, 0.40 for
        # 32 -> 1, batch 128). Positions q of the leading zeros are not visited; their
        # products are 0 unless dout is not finite, and then dW is not finite either
        # (the centre offset pairs each dout with x) and conv2d_backward reruns im2col.
        # (O < C makes dx correlated: no dx_flat to fill.)
        return dx, _weight_grad_from_dout(x_flat, dout_flat, lead, n, rows_each, pitch,
                                          weight.shape, padding), dbias
    dweight_t = np.zeros((c * kh * kw, o), dtype=x.dtype)
    chunks, buffer = _flat_chunks(x_flat, n, kh, kw, rows_each, pitch)
    for _, start, m in chunks:
        grad = dout_flat[:, lead + start:lead + start + m]             # (O, m)
        columns = _flat_columns(x_flat, lead, start, kh, kw, *padding, pitch, buffer[:, :m])
        dweight_t += columns @ grad.T
        if dx_flat is not None:
            _flat_add_columns(weight.reshape(o, -1).T @ grad, dx_flat, lead, start, kh, kw,
                              *padding, pitch)
    if dx_flat is not None:
        images = dx_flat[:, lead:lead + n * rows_each * pitch].reshape(c, n, rows_each, pitch)
        dx = _crop_into(np.empty((n, c, x.shape[2] // block, x.shape[3] // block),
                                 dtype=x.dtype), images, block=block)
    return dx, dweight_t.T.reshape(weight.shape), dbias


def _weight_grad_from_dout(x_flat, dout_flat, lead, n, rows_each, pitch, shape, padding):
    """dW (O, C, kh, kw) = sum over the flat positions q of x[c, q] dout[o, q - d_ij], from
    dout's columns (O kh kw rows; row (o, i', j') is offset (i', j') = (kh-1-i, kw-1-j))."""
    o, c, kh, kw = shape
    by_flipped = np.zeros((c, o * kh * kw), dtype=x_flat.dtype)        # (c, (o, i', j'))
    chunks, buffer = _flat_chunks(dout_flat, n, kh, kw, rows_each, pitch)
    for _, start, m in chunks:
        columns = _flat_columns(dout_flat, lead, start, kh, kw, *padding, pitch, buffer[:, :m])
        by_flipped += x_flat[:, lead + start:lead + start + m] @ columns.T
    flipped = by_flipped.reshape(c, o, kh, kw)[:, :, ::-1, ::-1]
    return np.ascontiguousarray(flipped.transpose(1, 0, 2, 3))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _col2im(dcolumns, dx, sh, sw, ph, pw):  # pragma: no cover - compiled
    """dx (n, C, H, W) = the column gradients (C, kh, kw, n, Ho, Wo) added onto the pixels
    they were read from: each pixel starts at 0 and gets its offsets (i, j) in the
    reference's row-major order (the padding's entries are dropped). One pass over the
    columns, along their rows (1.5x NumPy's kh kw strided adds into a padded copy)."""
    c_, kh, kw, n_, rows, cols = dcolumns.shape
    h, w = dx.shape[2], dx.shape[3]
    dx[:] = 0
    for c in range(c_):
        for i in range(kh):
            for j in range(kw):
                qlo, qhi = 0, cols                  # the q whose pixel lies in the image
                while qlo < cols and sw * qlo + j - pw < 0:
                    qlo += 1
                while qhi > qlo and sw * (qhi - 1) + j - pw >= w:
                    qhi -= 1
                for n in range(n_):
                    for p in range(rows):
                        y = sh * p + i - ph
                        if 0 <= y < h:
                            for q in range(qlo, qhi):
                                dx[n, c, y, sw * q + j - pw] += dcolumns[c, i, j, n, p, q]


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _takes(v, best):  # pragma: no cover - compiled
    """Whether entry v replaces the maximum so far: larger, or the first NaN (a NaN is the
    maximum from where it stands; numpy.max and argmax agree on that). Bitwise | and &
    rather than or / and: no branch, so the callers' loops compile to selects."""
    return (v > best) | ((v != v) & (best == best))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _first_max(x, n, c, p, q, k):  # pragma: no cover - compiled
    """(value, i, j) of the first maximum of window (p, q) in row-major order."""
    best, bi, bj = x[n, c, k * p, k * q], 0, 0
    for i in range(k):
        for j in range(k):
            v = x[n, c, k * p + i, k * q + j]
            take = _takes(v, best)
            best, bi, bj = (v, i, j) if take else (best, bi, bj)
    return best, bi, bj


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _maxpool_forward(x, out, first, k):  # pragma: no cover - compiled
    """out = each window's maximum, first = its offset i k + j. Window row i of a whole
    row of windows at a time (the inner loops read x along its rows), each window's
    entries still met in row-major order, so the first maximum wins as in _first_max.
    Selects instead of branches: 2.3-2.7x faster (benchmarks/README.md)."""
    for n in range(out.shape[0]):
        for c in range(out.shape[1]):
            for p in range(out.shape[2]):
                maxima, offsets, row = out[n, c, p], first[n, c, p], x[n, c, k * p]
                for q in range(maxima.shape[0]):
                    maxima[q], offsets[q] = row[k * q], 0
                for i in range(k):
                    row = x[n, c, k * p + i]
                    for q in range(maxima.shape[0]):
                        best, at = maxima[q], offsets[q]
                        for j in range(k):
                            v = row[k * q + j]
                            take = _takes(v, best)
                            best = v if take else best
                            at = i * k + j if take else at
                        maxima[q], offsets[q] = best, at


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _maxpool_backward(dout, x, dx, k):  # pragma: no cover - compiled
    """dx starts at 0; each dout lands on its window's first maximum."""
    for n in range(dout.shape[0]):
        for c in range(dout.shape[1]):
            for p in range(dout.shape[2]):
                for q in range(dout.shape[3]):
                    _, i, j = _first_max(x, n, c, p, q, k)
                    dx[n, c, k * p + i, k * q + j] = dout[n, c, p, q]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _maxpool_route(dout, first, dx, k):  # pragma: no cover - compiled
    """Every entry of dx written once, along its rows: dout at the window's offset
    ``first``, 0 elsewhere (the reference's where())."""
    zero = dx.dtype.type(0)
    for n in range(dout.shape[0]):
        for c in range(dout.shape[1]):
            for p in range(dout.shape[2]):
                for i in range(k):
                    for q in range(dout.shape[3]):
                        at, d = first[n, c, p, q], dout[n, c, p, q]
                        for j in range(k):
                            dx[n, c, k * p + i, k * q + j] = d if at == i * k + j else zero


def _pooled_shape(x, kernel):
    n, c, h, w = x.shape
    return (n, c, h // kernel, w // kernel)


def maxpool2d_forward(x, kernel, with_index=False):
    if not (_served(x) and x.ndim == 4 and x.shape[2] % kernel == 0
            and x.shape[3] % kernel == 0):
        return NotImplemented
    out = np.empty(_pooled_shape(x, kernel), dtype=x.dtype)
    first = np.empty(out.shape, dtype=np.intp)                  # argmax's dtype
    _maxpool_forward(x, out, first, kernel)
    return (out, first) if with_index else out


def maxpool2d_backward(dout, x, kernel, first=None):
    if not (_served(dout, x) and x.ndim == 4 and dout.shape == _pooled_shape(x, kernel)):
        return NotImplemented
    if first is None:
        dx = np.zeros(x.shape, dtype=x.dtype)
        _maxpool_backward(dout, x, dx, kernel)
        return dx
    if not (type(first) is np.ndarray and first.dtype == np.intp and first.shape == dout.shape):
        return NotImplemented
    dx = np.empty(x.shape, dtype=x.dtype)
    _maxpool_route(dout, first, dx, kernel)
    return dx


# Upsample: one compiled pass each way (NumPy's forward is two repeats, its backward f^2
# whole-array adds). Batch 128: the backward 2.0 / 4.1 ms where NumPy took 5.0 / 8.0 (64
# channels at 7x7, 32 at 14x14), the forward 3.75 where NumPy took 5.41 (32 at 14x14).


@_jit
def _upsample_copy(x, y, f):  # pragma: no cover - compiled
    """y (N, C, f H, f W) = each entry of x (N, C, H, W) copied into its f x f block."""
    n, c, h, w = x.shape
    for i in range(n):
        for j in range(c):
            for r in range(h):
                for a in range(f):
                    for s in range(w):
                        v = x[i, j, r, s]
                        for b in range(f):
                            y[i, j, r * f + a, s * f + b] = v


@_jit
def _upsample_block_sums(dout, dx, f):  # pragma: no cover - compiled
    """dx (N, C, H, W) = the sums of dout's f x f blocks, offsets (a, b) in row-major order
    from (0, 0) on, as the reference's f^2 adds."""
    n, c, h, w = dx.shape
    for i in range(n):
        for j in range(c):
            for r in range(h):
                for s in range(w):
                    total = dout[i, j, r * f, s * f]
                    for a in range(f):
                        for b in range(f):
                            if a or b:
                                total = total + dout[i, j, r * f + a, s * f + b]
                    dx[i, j, r, s] = total


def upsample_forward(x, scale):
    if not (_served(x) and x.ndim == 4):
        return NotImplemented
    n, c, h, w = x.shape
    y = np.empty((n, c, scale * h, scale * w), dtype=x.dtype)
    _upsample_copy(x, y, scale)
    return y


def upsample_backward(dout, scale):
    if not (_served(dout) and dout.ndim == 4 and dout.shape[2] % scale == 0
            and dout.shape[3] % scale == 0):
        return NotImplemented
    n, c, h, w = dout.shape
    dx = np.empty((n, c, h // scale, w // scale), dtype=dout.dtype)
    _upsample_block_sums(dout, dx, scale)
    return dx


TWINS.update({
    "conv.upsample_forward": upsample_forward,
    "conv.upsample_backward": upsample_backward,
    "conv.conv2d_forward": conv2d_forward,
    "conv.conv2d_relu_forward": conv2d_relu_forward,
    "conv.conv2d_backward": conv2d_backward,
    "conv.conv2d_backward_upsampled": conv2d_backward_upsampled,
    "conv.maxpool2d_forward": maxpool2d_forward,
    "conv.maxpool2d_backward": maxpool2d_backward,
})
