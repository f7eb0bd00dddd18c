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
# im2col: the input's k x k windows as the columns of one matrix, so that each product of
# the convolution's math is ONE matrix product (BLAS); col2im, its transpose, adds the
# column gradients back onto the pixels they came from. Rows are the window entries
# (c, i, j), the order of W.reshape(O, C kh kw); columns the output positions (n, p, q).
# This layout (not its transpose) is built by kh kw strided copies that write contiguous
# blocks (measured 13x faster than one 6-d transposing copy at 32 channels), and col2im is
# kh kw strided adds: plain NumPy. See CONV_CHUNK_BYTES for the batch's chunks. The products sum the references' terms in another order
# (tolerance in tests/test_conv.py); col2im adds the offsets (i, j) in the reference's
# order; the max-pool loops compare and copy, so they are the references' bits.

import numpy as np  # noqa: E402

_CONV_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _conv_serves(*arrays) -> bool:
    """NumPy arrays of one float dtype (else the reference runs)."""
    return all(type(a) is np.ndarray for a in arrays) and arrays[0].dtype in _CONV_DTYPES \
        and all(a.dtype == arrays[0].dtype for a in arrays)


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
# 1.5-4x faster at batch 128 here (benchmarks/README.md). dW sums its chunks' products.
CONV_CHUNK_BYTES = 2 << 20


def _chunks(x, kh, kw, rows, cols):
    """Slices of images whose columns take at most CONV_CHUNK_BYTES (one image at least)."""
    per_image = x.shape[1] * kh * kw * rows * cols * x.itemsize
    step = max(1, CONV_CHUNK_BYTES // per_image)
    return [slice(n, n + step) for n in range(0, x.shape[0], step)]


def conv2d_forward(x, weight, bias, stride, padding):
    if not _conv_serves(x, weight, bias):
        return NotImplemented
    o, _, kh, kw = weight.shape
    rows = (x.shape[2] + 2 * padding[0] - kh) // stride[0] + 1
    cols = (x.shape[3] + 2 * padding[1] - kw) // stride[1] + 1
    out = np.empty((x.shape[0], o, rows, cols), dtype=x.dtype)
    for chunk in _chunks(x, kh, kw, rows, cols):
        columns, _, _ = _im2col(x[chunk], kh, kw, stride, padding)
        product = weight.reshape(o, -1) @ columns                   # (O, n Ho Wo)
        # to (n, O, Ho, Wo) and the bias, in one pass
        np.add(product.reshape(o, -1, rows, cols).transpose(1, 0, 2, 3),
               bias.reshape(o, 1, 1), out=out[chunk])
    return out


def conv2d_backward(dout, x, weight, stride, padding, input_grad=True):
    if not _conv_serves(dout, x, weight):
        return NotImplemented
    o, c, kh, kw = weight.shape
    _, _, rows, cols = dout.shape
    (ph, pw), (_, _, h, w) = padding, x.shape
    dbias = np.sum(dout, axis=(0, 2, 3))                            # the reference's call
    dweight = np.zeros((o, c * kh * kw), dtype=x.dtype)
    dx = np.empty(x.shape, dtype=x.dtype) if input_grad else None
    for chunk in _chunks(x, kh, kw, rows, cols):
        columns, _, _ = _im2col(x[chunk], kh, kw, stride, padding)
        grad_rows = np.ascontiguousarray(dout[chunk].transpose(1, 0, 2, 3)).reshape(o, -1)
        dweight += grad_rows @ columns.T
        if not input_grad:
            continue
        n = columns.shape[1] // (rows * cols)
        dcolumns = (weight.reshape(o, -1).T @ grad_rows).reshape(c, kh, kw, n, rows, cols)
        dxpad = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
        for i in range(kh):                   # col2im: the offsets in the reference's order
            for j in range(kw):
                region = _offset_region(i, j, rows, cols, stride)
                dxpad[region] += dcolumns[:, i, j].transpose(1, 0, 2, 3)
        dx[chunk] = dxpad[:, :, ph:ph + h, pw:pw + w]
    return dx, dweight.reshape(weight.shape), dbias


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
