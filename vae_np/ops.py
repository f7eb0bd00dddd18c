"""Numerically stable elementwise primitives shared by layers, losses and the model.

Each takes the array-API namespace ``xp`` explicitly, so it runs on any backend.
"""

from __future__ import annotations

import math

LOG_2PI = math.log(2.0 * math.pi)


def sigmoid(xp, x):
    """1 / (1 + exp(-x)), without overflow for any x.

    Uses sigmoid(x) = (1 + tanh(x / 2)) / 2: tanh saturates to +-1 instead of overflowing.
    The error is absolute (below 1e-16 in float64, 1e-7 in float32), which is what the
    Bernoulli gradient sigmoid(l) - x needs; far in the left tail (x below about -37 in
    float64, -17 in float32) the result is exactly 0 although the true value is not.
    """
    return 0.5 + 0.5 * xp.tanh(0.5 * x)


def softplus(xp, x):
    """ln(1 + exp(x)), without overflow for any x.

    softplus(x) = max(x, 0) + ln(1 + exp(-|x|)): the exponent is never positive, and
    log1p keeps full precision when exp(-|x|) is tiny.
    """
    return xp.maximum(x, 0.0) + xp.log1p(xp.exp(-xp.abs(x)))


def logsumexp(xp, a, axis: int):
    """ln sum_i exp(a_i) along ``axis`` (removed), shifted by the max so exp cannot overflow."""
    peak = xp.max(a, axis=axis, keepdims=True)
    # A row of -inf would give inf - inf = nan; shifting such rows by 0 keeps them -inf.
    peak = xp.where(xp.isfinite(peak), peak, 0.0)
    total = xp.sum(xp.exp(a - peak), axis=axis, keepdims=True)
    return xp.squeeze(xp.log(total) + peak, axis=axis)


def logsumexp_and_softmax(xp, a, axis: int):
    """(logsumexp along ``axis`` (removed), softmax weights along ``axis`` (a's shape)), from
    one shifted exp: the importance-weighted bound and its normalised weights.

        m = max_i a_i,   e_i = exp(a_i - m),   lse = ln sum_i e_i + m,   w_i = e_i / sum_j e_j

    The largest e_i is exactly 1, so nothing overflows and the sum is at least 1: values
    like -1e4 (an importance weight e^-10000) are fine in float32. A slice of all -inf (every
    weight zero) gives lse = -inf and weights 0, not NaN: the shift is 0 there (as in
    :func:`logsumexp`) and the division by a zero sum is replaced by one by 1 (the e_i are
    all 0). NaN in a slice stays NaN.
    """
    peak = xp.max(a, axis=axis, keepdims=True)
    peak = xp.where(xp.isfinite(peak), peak, 0.0)
    shifted = xp.exp(a - peak)
    total = xp.sum(shifted, axis=axis, keepdims=True)
    lse = xp.squeeze(xp.log(total) + peak, axis=axis)
    weights = shifted / xp.where(total > 0, total, 1.0)
    return lse, weights
