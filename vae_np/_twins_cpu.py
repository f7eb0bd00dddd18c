"""The compiled CPU twins of the ops (numba), keyed by op name: see ``backend.fast_twin``.

A leaf: it imports nothing from the package. Loaded by ``backend`` on the first op called
on a NumPy array; importing it fails with ImportError(name="numba") when numba is missing,
and the references run.
"""

from __future__ import annotations

import numba  # noqa: F401  (the twins below are compiled with it)

#: op name ("module.qualname") -> twin taking the reference's arguments.
TWINS: dict = {}


# ---- convolution twins (vae_np/conv.py) ---------------------------------------------------
# im2col: the input's k x k windows as the rows of one matrix, so that each product of the
# convolution's math is ONE matrix product (BLAS); col2im, its transpose, adds the column
# gradients back onto the pixels they came from. Rows are output positions (n, p, q),
# columns the window entries (c, i, j), the order of W.reshape(O, C kh kw). The products
# sum the same terms as the references in conv.py in another order (tolerance in
# tests/test_conv.py); col2im adds the offsets (i, j) in the reference's order, and the
# max-pool loops compare exactly, so those are the references' bits.

import numpy as np  # noqa: E402
from numpy.lib.stride_tricks import sliding_window_view as _sliding_window_view  # noqa: E402

_CONV_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _conv_serves(*arrays) -> bool:
    """NumPy arrays of one float dtype (else the reference runs)."""
    return all(type(a) is np.ndarray for a in arrays) and arrays[0].dtype in _CONV_DTYPES \
        and all(a.dtype == arrays[0].dtype for a in arrays)


def _im2col(x, kh, kw, stride, padding):
    """(columns (N Ho Wo, C kh kw), Ho, Wo) of x (N, C, H, W), zero-padded."""
    (sh, sw), (ph, pw) = stride, padding
    n, c, h, w = x.shape
    if ph or pw:
        xpad = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
        xpad[:, :, ph:ph + h, pw:pw + w] = x
    else:
        xpad = x
    windows = _sliding_window_view(xpad, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    rows, cols = windows.shape[2], windows.shape[3]
    # (N, Ho, Wo, C, kh, kw): the copy that makes it a matrix
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * rows * cols, c * kh * kw), rows, cols


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _col2im(dcols, dx, sh, sw, ph, pw):  # pragma: no cover - compiled
    """dx[n, c, y, x] = sum over offsets (i, j), in row-major order from 0, of
    dcols[n, p, q, c, i, j] where y + ph = sh p + i and x + pw = sw q + j: every window
    entry that read pixel (y, x). dcols (N, Ho, Wo, C, kh, kw), dx (N, C, H, W)."""
    n_, rows, cols, c_, kh, kw = dcols.shape
    h_, w_ = dx.shape[2], dx.shape[3]
    zero = dx.dtype.type(0)
    for n in range(n_):
        for c in range(c_):
            for y in range(h_):
                for x in range(w_):
                    total = zero
                    for i in range(kh):
                        a = y + ph - i
                        if a < 0 or a % sh != 0 or a // sh >= rows:
                            continue
                        for j in range(kw):
                            b = x + pw - j
                            if b < 0 or b % sw != 0 or b // sw >= cols:
                                continue
                            total += dcols[n, a // sh, b // sw, c, i, j]
                    dx[n, c, y, x] = total


def conv2d_forward(x, weight, bias, stride, padding):
    if not _conv_serves(x, weight, bias):
        return NotImplemented
    o, _, kh, kw = weight.shape
    columns, rows, cols = _im2col(x, kh, kw, stride, padding)
    product = columns @ weight.reshape(o, -1).T                     # (N Ho Wo, O)
    out = np.empty((x.shape[0], o, rows, cols), dtype=x.dtype)
    # to (N, O, Ho, Wo) and the bias, in one pass
    np.add(product.reshape(x.shape[0], rows, cols, o).transpose(0, 3, 1, 2),
           bias.reshape(o, 1, 1), out=out)
    return out


def conv2d_backward(dout, x, weight, stride, padding, input_grad=True):
    if not _conv_serves(dout, x, weight):
        return NotImplemented
    o, c, kh, kw = weight.shape
    n, _, rows, cols = dout.shape
    columns, _, _ = _im2col(x, kh, kw, stride, padding)
    dbias = np.sum(dout, axis=(0, 2, 3))                            # the reference's call
    drows = np.ascontiguousarray(dout.transpose(0, 2, 3, 1)).reshape(n * rows * cols, o)
    dweight = (drows.T @ columns).reshape(weight.shape)
    if not input_grad:
        return None, dweight, dbias
    dcols = (drows @ weight.reshape(o, -1)).reshape(n, rows, cols, c, kh, kw)
    dx = np.empty(x.shape, dtype=x.dtype)
    _col2im(dcols, dx, stride[0], stride[1], padding[0], padding[1])
    return dx, dweight, dbias


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _first_max(x, n, c, p, q, k):  # pragma: no cover - compiled
    """(value, i, j) of the first maximum of window (p, q) in row-major order; a NaN is
    the maximum from where it stands (numpy.max and argmax agree on that)."""
    best, bi, bj = x[n, c, k * p, k * q], 0, 0
    for i in range(k):
        for j in range(k):
            v = x[n, c, k * p + i, k * q + j]
            if (v > best or (v != v and best == best)):
                best, bi, bj = v, i, j
    return best, bi, bj


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _maxpool_forward(x, out, k):  # pragma: no cover - compiled
    for n in range(out.shape[0]):
        for c in range(out.shape[1]):
            for p in range(out.shape[2]):
                for q in range(out.shape[3]):
                    out[n, c, p, q] = _first_max(x, n, c, p, q, k)[0]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _maxpool_backward(dout, x, dx, k):  # pragma: no cover - compiled
    """dx starts at 0; each dout lands on its window's first maximum."""
    for n in range(dout.shape[0]):
        for c in range(dout.shape[1]):
            for p in range(dout.shape[2]):
                for q in range(dout.shape[3]):
                    _, i, j = _first_max(x, n, c, p, q, k)
                    dx[n, c, k * p + i, k * q + j] = dout[n, c, p, q]


def maxpool2d_forward(x, kernel):
    if not _conv_serves(x):
        return NotImplemented
    n, c, h, w = x.shape
    out = np.empty((n, c, h // kernel, w // kernel), dtype=x.dtype)
    _maxpool_forward(x, out, kernel)
    return out


def maxpool2d_backward(dout, x, kernel):
    if not _conv_serves(dout, x):
        return NotImplemented
    dx = np.zeros(x.shape, dtype=x.dtype)
    _maxpool_backward(dout, x, dx, kernel)
    return dx


TWINS.update({
    "conv.conv2d_forward": conv2d_forward,
    "conv.conv2d_backward": conv2d_backward,
    "conv.maxpool2d_forward": maxpool2d_forward,
    "conv.maxpool2d_backward": maxpool2d_backward,
})
