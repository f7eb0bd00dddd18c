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
