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

import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, error_model="numpy")
def adam(p, g, m, v, b1, c1, b2, c2, d1, d2, lr, eps):  # pragma: no cover - compiled
    """One Adam step over flat buffers, in place (optim.Adam._update_reference).

    c1 = 1 - beta1, c2 = 1 - beta2, d1 = 1 - beta1^t, d2 = 1 - beta2^t.
    """
    _adam_plain(p, g, m, v, b1, c1, b2, c2, d1, d2, lr, eps, False)


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


# ------------------------------------------------------------------------------------------
# Adam in float32, guarded against subnormal moments
#
# A parameter whose gradient is exactly 0 step after step (a weight of a ReLU unit that no
# example of the batch activates) has its first moment multiplied by beta1 each step: from
# about 1e-4 it reaches float32's subnormal range (below 2^-126) after some 700 steps and
# stays there (0.9 times the smallest subnormal rounds back to it). x86 cores run every
# vector instruction that reads or writes a subnormal through a microcode assist of some
# hundred cycles: in the default MNIST run a third of the moments get there by the sixth
# epoch and the plain kernel above goes from 1 to 20-25 ms, the step from 4 to 15 ms
# (guarded: about 4 and 8 ms). The same bits, without subnormal arithmetic:
#
# - chunks of CHUNK elements run the plain loop until a check (one step in
#   Adam.WATCH_EVERY, while the data is in registers) sees a moment below 2^-100, some
#   170 steps before subnormals; from then on the chunk is classified each step, on the
#   integer bits, until it is ordinary again;
# - "dead" lanes (g = +-0, 0 < |m| < 2^-100, ordinary v, |p| above a floor): p provably
#   does not move (its update is below a quarter of its last place: ``Adam.dead_p_floor``
#   in optim.py), so it is kept; a subnormal m = k 2^-149 becomes k' 2^-149 with
#   k' = rint(b1 k) on the integers (b1 k is exact in float64), a small normal m takes the
#   plain arithmetic; everything else runs the plain arithmetic with m = 1 on those lanes,
#   so no subnormal reaches a vector unit;
# - any other small value in a chunk (a tiny gradient, v or p) sends the whole chunk through
#   a float64 emulation of each float32 operation: the product of two float32 is exact in
#   float64, and a quotient, square root or sum rounded to float64 and then to float32 is
#   rounded correctly (53 >= 2 * 24 + 2), subnormal results included, rounded on the
#   integer grid of 2^-149. (NaN payloads are not reproduced there, only NaN.)

CHUNK = 2048
_NORMAL_MIN = 2.0 ** -126
_TO_SUBNORMAL, _FROM_SUBNORMAL = 2.0 ** 149, 2.0 ** -149
_SMALL = 0x0D800000            # bits of 2^-100
_SMALL_G = 0x21800000          # 2^-60: a gradient whose square underflows
_INF = 0x7F800000
_ONE = 0x3F800000
# 2^(e - 150) for a float32 exponent field e (2^-149 for e = 0): a table, not ldexp,
# which numba calls out of line element by element
_SCALE = np.array([2.0 ** (max(e, 1) - 150) for e in range(256)])
_u32, _f32, _f64 = np.uint32, np.float32, np.float64


@numba.njit(inline="always", error_model="numpy")
def _value(bits):  # pragma: no cover - compiled
    """The float32 with these bits, as a float64, by integer arithmetic (no assist)."""
    e = (bits >> 23) & 0xFF
    x = _f64((bits & 0x7FFFFF) | (0x800000 if e else 0)) * _SCALE[e]
    return -x if bits >> 31 else x


@numba.njit(inline="always", error_model="numpy")
def _round(y):  # pragma: no cover - compiled
    """y rounded to float32 (nearest, ties to even), held in a float64; below 2^-126 on
    the integer grid of 2^-149, never through a subnormal float32."""
    big = not (abs(y) < _NORMAL_MIN)
    return _f64(_f32(y if big else 1.0)) if big else np.rint(y * _TO_SUBNORMAL) * _FROM_SUBNORMAL


@numba.njit(inline="always", error_model="numpy")
def _bits(y):  # pragma: no cover - compiled
    """The bits of the float32 value y (held in a float64)."""
    a = abs(y)
    sign = _u32(0x80000000) if math.copysign(1.0, y) < 0 else _u32(0)
    if y != y:
        return _u32(0x7FC00000)
    if a == math.inf:
        return sign | _u32(_INF)
    if a < _NORMAL_MIN:
        return sign | _u32(a * _TO_SUBNORMAL)
    frac, e = math.frexp(a)                    # a = frac 2^e, 0.5 <= frac < 1
    return sign | _u32((e + 126) << 23) | _u32(frac * 16777216.0 - 8388608.0)


@numba.njit(inline="always", error_model="numpy")
def _twice_minus_2(bits):  # pragma: no cover - compiled
    """2 |x| - 2 on a float32's bits (the shift drops the sign; 0 wraps to the top), so one
    unsigned comparison asks 0 < |x| < threshold. numba widens uint32 arithmetic to 64
    bits: every step is cast back."""
    return _u32(_u32(bits << _u32(1)) - _u32(2))


@numba.njit(nogil=True, error_model="numpy")
def _adam_plain(p, g, m, v, b1, c1, b2, c2, d1, d2, lr, eps, watch):  # pragma: no cover
    """``adam`` on one chunk; with ``watch``, also whether a new moment is nonzero and
    below 2^-100 (counted as an integer sum, which LLVM vectorises; a boolean or a float
    minimum would not be)."""
    if not watch:
        for i in range(p.shape[0]):
            gi = g[i]
            mi = b1 * m[i] + c1 * gi
            vi = b2 * v[i] + c2 * (gi * gi)
            m[i] = mi
            v[i] = vi
            p[i] = p[i] - lr * (mi / d1) / (np.sqrt(vi / d2) + eps)
        return False
    small = m.dtype.type(2.0 ** -100)
    zero = m.dtype.type(0)
    count = 0
    for i in range(p.shape[0]):
        gi = g[i]
        mi = b1 * m[i] + c1 * gi
        vi = b2 * v[i] + c2 * (gi * gi)
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - lr * (mi / d1) / (np.sqrt(vi / d2) + eps)
        count += (abs(mi) < small) & (mi != zero)
    return count > 0


@numba.njit(nogil=True, error_model="numpy")
def _classify(pu, gu, mu, vu, dead, m_safe, p_floor2):  # pragma: no cover - compiled
    """dead[i] = the bits of m on dead lanes, else 0; m_safe = m, or 1.0 on dead lanes.
    Returns (any dead lane, any other small value)."""
    any_dead = _u32(0)
    other = _u32(0)
    for i in range(mu.shape[0]):
        mb = mu[i]
        small_m = _u32(_twice_minus_2(mb) < _u32(2 * _SMALL - 2))
        g2 = _u32(gu[i] << _u32(1))
        v2 = _u32(vu[i] << _u32(1))
        p2 = _u32(pu[i] << _u32(1))
        d = small_m & _u32(g2 == _u32(0)) \
            & _u32(_u32(v2 - _u32(2 * _SMALL)) < _u32(2 * _INF - 2 * _SMALL)) \
            & _u32(_u32(p2 - p_floor2) < _u32(_u32(2 * _INF) - p_floor2))
        sub = d & _u32((mb & _u32(0x7F800000)) == _u32(0))     # dead with a subnormal m
        dead[i] = _u32(mb * d)
        m_safe[i] = _u32(sub * _u32(_ONE) + (_u32(1) - sub) * mb)
        any_dead |= d
        other |= (small_m & _u32(_u32(1) - d)) \
            | _u32(_u32(g2 - _u32(2)) < _u32(2 * _SMALL_G - 2)) \
            | _u32(_u32(v2 - _u32(2)) < _u32(2 * _SMALL - 2)) \
            | _u32(_u32(p2 - _u32(2)) < _u32(2 * _SMALL - 2))
    return any_dead, other


@numba.njit(nogil=True, error_model="numpy")
def _adam_dead_lanes(m, g, v, m_safe, dead, p_m, b1, c1, b2, c2):  # pragma: no cover
    """m and v by the plain arithmetic, with m = 1 where it is subnormal (those lanes' m is
    written by _adam_dead_moments); p_m = the m for p's update, 1 on dead lanes (which
    keep their p), stored so that no later arithmetic meets a small m."""
    one = m.dtype.type(1)
    for i in range(m.shape[0]):
        gi = g[i]
        mi = b1 * m_safe[i] + c1 * gi
        m[i] = mi
        v[i] = b2 * v[i] + c2 * (gi * gi)
        p_m[i] = mi if dead[i] == _u32(0) else one


@numba.njit(nogil=True, error_model="numpy")
def _adam_dead_params(p, v, p_m, dead, d1, d2, lr, eps):  # pragma: no cover - compiled
    """p's update from the stored m (same bits as the plain loop's), dead lanes kept."""
    for i in range(p.shape[0]):
        pn = p[i] - lr * (p_m[i] / d1) / (np.sqrt(v[i] / d2) + eps)
        p[i] = pn if dead[i] == _u32(0) else p[i]


@numba.njit(nogil=True, error_model="numpy")
def _adam_dead_moments(mu, gu, dead, b1):  # pragma: no cover - compiled
    """Dead lanes with a subnormal m = k 2^-149: b1 m + c1 g (g = +-0) is k' 2^-149 with
    k' = rint(b1 k) (b1 k is exact in float64; rint rounds ties to even, as float32 does),
    its sign m's, or for k' = 0 the sign IEEE gives (+-0) + (+-0). Integer bits only."""
    B1 = _f64(b1)
    for i in range(mu.shape[0]):
        bits = dead[i]
        k = _u32(np.rint(B1 * _f64(bits & _u32(0x7FFFFF))))
        sign = bits & _u32(0x80000000)
        sign = sign if k != _u32(0) else sign & gu[i] & _u32(0x80000000)
        subnormal = (bits != _u32(0)) & ((bits & _u32(0x7F800000)) == _u32(0))
        mu[i] = (sign | k) if subnormal else mu[i]


@numba.njit(nogil=True, error_model="numpy")
def _adam_emulated(pu, gu, mu, vu, b1, c1, b2, c2, d1, d2, lr, eps):  # pragma: no cover
    """``adam`` operation for operation in float64, each result rounded to float32."""
    B1, C1, B2, C2 = _f64(b1), _f64(c1), _f64(b2), _f64(c2)
    D1, D2, LR, EPS = _f64(d1), _f64(d2), _f64(lr), _f64(eps)
    for i in range(pu.shape[0]):
        gi = _value(gu[i])
        mi = _round(_round(B1 * _value(mu[i])) + _round(C1 * gi))
        vi = _round(_round(B2 * _value(vu[i])) + _round(C2 * _round(gi * gi)))
        num = _round(LR * _round(mi / D1))
        den = _round(_round(np.sqrt(_round(vi / D2))) + EPS)
        pi = _round(_value(pu[i]) - _round(num / den))
        mu[i] = _bits(mi)
        vu[i] = _bits(vi)
        pu[i] = _bits(pi)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def adam_guarded(p, g, m, v, b1, c1, b2, c2, d1, d2, lr, eps, p_floor_bits, guard, watch):  # pragma: no cover
    """``adam`` for float32 buffers, the same bits without subnormal arithmetic (see the
    comment above). ``guard`` (one flag per CHUNK, kept by the caller between steps) marks
    the chunks to classify; ``watch`` asks the plain chunks to look for small moments."""
    pu, gu, mu, vu = p.view(np.uint32), g.view(np.uint32), m.view(np.uint32), v.view(np.uint32)
    p_floor2 = _u32(_u32(p_floor_bits) << _u32(1))
    dead = np.empty(CHUNK, np.uint32)
    m_safe = np.empty(CHUNK, np.float32)
    m_safe_u = m_safe.view(np.uint32)
    p_m = np.empty(CHUNK, np.float32)
    n = p.shape[0]
    chunks = (n + CHUNK - 1) // CHUNK
    c = 0
    while c < chunks:
        if not watch and not guard[c]:         # a run of plain chunks in one call
            end = c + 1
            while end < chunks and not guard[end]:
                end += 1
            lo, hi = c * CHUNK, min(end * CHUNK, n)
            _adam_plain(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], b1, c1, b2, c2, d1, d2, lr, eps, False)
            c = end
            continue
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        c += 1
        # slices, so that every loop counts from 0: numba then drops its negative-index
        # wraparound, which keeps LLVM from vectorising
        ps, gs, ms, vs = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
        psu, gsu, msu, vsu = pu[lo:hi], gu[lo:hi], mu[lo:hi], vu[lo:hi]
        if not guard[c - 1]:                   # watching: chunk by chunk
            if _adam_plain(ps, gs, ms, vs, b1, c1, b2, c2, d1, d2, lr, eps, True):
                guard[c - 1] = True
            continue
        k = hi - lo
        any_dead, other = _classify(psu, gsu, msu, vsu, dead[:k], m_safe_u[:k], p_floor2)
        if other:
            _adam_emulated(psu, gsu, msu, vsu, b1, c1, b2, c2, d1, d2, lr, eps)
        elif any_dead:
            _adam_dead_lanes(ms, gs, vs, m_safe[:k], dead[:k], p_m[:k], b1, c1, b2, c2)
            _adam_dead_params(ps, vs, p_m[:k], dead[:k], d1, d2, lr, eps)
            _adam_dead_moments(msu, gsu, dead[:k], b1)
        else:                                  # ordinary again: plain, and looking
            guard[c - 1] = _adam_plain(ps, gs, ms, vs, b1, c1, b2, c2, d1, d2, lr, eps, True)
