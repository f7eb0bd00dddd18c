"""Convolutional layers with hand-written backward passes: Conv2d, MaxPool2d, Upsample,
Flatten and Unflatten, on the contract of ``vae_np.layers.Layer`` (params/grads dicts, a
cache read only by the backward it was made for, ``layer(x)`` for inference).

Images are (N, C, H, W): batch, channels, rows, columns. Each layer's math is a function
on arrays (``conv2d_forward``, ``conv2d_backward``, ``maxpool2d_forward``,
``maxpool2d_backward``) written as the formula: a loop over the kernel offsets (i, j),
each a strided slice of the input and one ``tensordot`` over channels. The convolution
and max-pool ops are ``@fast_twin``: on NumPy and CuPy they run an im2col twin (one
matrix product per product of the math, per cache-sized chunk of images on NumPy;
``vae_np._twins_cpu`` / ``_twins_cuda``, section "convolution twins"), equal to these references within the reordered-sum bound of
tests/test_conv.py (max-pool: to the bit). The derivations are in
docs/10-convolution.md; tests/test_conv.py checks every backward by central differences.
Three pairs of layers run as one op in a network (``layers.FUSED_FORWARDS`` /
``FUSED_BACKWARDS``, registered at the end of each layer's section): Conv2d + ReLU forward,
ReLU + MaxPool2d backward and Upsample + Conv2d backward, each with the two layers' bits.
"""

from __future__ import annotations

import math

import numpy as np

from .backend import Backend, fast_twin, namespace_of
from .layers import FUSED_BACKWARDS, FUSED_FORWARDS, INITIALISATIONS, Layer, ReLU, relu_backward


def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= ``minimum``, as a pair (rows, columns)."""
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, (int, np.integer)) or isinstance(v, bool)
                             or v < minimum for v in pair):
        raise ValueError(f"{name}: expected an integer >= {minimum} or a pair of them, "
                         f"got {value!r}")
    return int(pair[0]), int(pair[1])


def _check_images(x, name: str = "x", channels: int | None = None) -> None:
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"{name}: expected images of shape (N, C, H, W), got shape "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels (shape (N, {channels}, H, W)), "
                         f"got shape {tuple(x.shape)}")


def conv2d_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """floor((size + 2 padding - kernel) / stride) + 1 output positions along one axis;
    a ValueError when the kernel is larger than the padded input."""
    if size + 2 * padding < kernel:
        raise ValueError(f"x: a kernel of {kernel} is larger than the padded input "
                         f"({size} + 2 * {padding} = {size + 2 * padding})")
    return (size + 2 * padding - kernel) // stride + 1


# ------------------------------------------------------------------------------------------
# Conv2d: the math


def _padded(xp, x, padding):
    """x (N, C, H, W) with ``padding = (ph, pw)`` zeros around each image."""
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    n, c, h, w = x.shape
    out = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
    out[:, :, ph:ph + h, pw:pw + w] = x
    return out


def _window(a, i: int, j: int, rows: int, cols: int, stride):
    """a[:, :, i + s_h p, j + s_w q] for p < rows, q < cols: kernel offset (i, j) at every
    output position (N, C, rows, cols), a strided slice."""
    sh, sw = stride
    return a[:, :, i:i + sh * (rows - 1) + 1:sh, j:j + sw * (cols - 1) + 1:sw]


@fast_twin
def conv2d_forward(x, weight, bias, stride, padding):
    """y = conv2d(x; W, b): a cross-correlation, as in PyTorch (no kernel flip).

        y[n, o, p, q] = b[o] + sum_{c, i, j} W[o, c, i, j] xpad[n, c, s_h p + i, s_w q + j]

    x (N, C, H, W), W (O, C, kh, kw), b (O,), stride (s_h, s_w), padding (p_h, p_w);
    xpad is x with p_h zero rows above and below and p_w zero columns left and right;
    y (N, O, Ho, Wo), Ho = floor((H + 2 p_h - kh) / s_h) + 1 (Wo alike). One term of the
    sum over (i, j) is the slice of xpad at offset (i, j) contracted over c with W[:, :, i, j].
    """
    xp = namespace_of(x)
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    rows = conv2d_output_size(h, kh, stride[0], padding[0])
    cols = conv2d_output_size(w, kw, stride[1], padding[1])
    xpad = _padded(xp, x, padding)
    acc = xp.zeros((n, rows, cols, o), dtype=x.dtype)          # (N, Ho, Wo, O)
    for i in range(kh):
        for j in range(kw):
            acc = acc + xp.tensordot(_window(xpad, i, j, rows, cols, stride),
                                     weight[:, :, i, j], axes=([1], [1]))
    return xp.permute_dims(acc, (0, 3, 1, 2)) + xp.reshape(bias, (o, 1, 1))


@fast_twin
def conv2d_backward(dout, x, weight, stride, padding, input_grad=True):
    """(dx, dW, db) of conv2d_forward, given dout = dL/dy (N, O, Ho, Wo).

    y is linear in b, W and xpad, each entry of xpad (and of W) reaching y through every
    output position whose window covers it:

        db[o]          = sum_{n, p, q} dout[n, o, p, q]
        dW[o, c, i, j] = sum_{n, p, q} dout[n, o, p, q] xpad[n, c, s_h p + i, s_w q + j]
        dxpad[n, c, s_h p + i, s_w q + j] += sum_o W[o, c, i, j] dout[n, o, p, q]
                                              (for every offset (i, j) and position (p, q))

    and dx is the interior of dxpad (the padding is a constant: its gradient is dropped).
    Entries of x that no window reaches (when (H + 2 p_h - kh) is not a multiple of s_h)
    get 0. ``input_grad=False`` returns dx = None (a network's input needs none).
    """
    xp = namespace_of(dout)
    n, c, h, w = x.shape
    _, _, kh, kw = weight.shape
    rows, cols = dout.shape[2], dout.shape[3]
    xpad = _padded(xp, x, padding)
    dbias = xp.sum(dout, axis=(0, 2, 3))
    dweight = xp.zeros(weight.shape, dtype=weight.dtype)
    dxpad = xp.zeros(xpad.shape, dtype=x.dtype) if input_grad else None
    sh, sw = stride
    for i in range(kh):
        for j in range(kw):
            window = _window(xpad, i, j, rows, cols, stride)
            dweight[:, :, i, j] = xp.tensordot(dout, window, axes=([0, 2, 3], [0, 2, 3]))
            if input_grad:
                term = xp.permute_dims(xp.tensordot(dout, weight[:, :, i, j], axes=([1], [0])),
                                       (0, 3, 1, 2))                     # (N, C, Ho, Wo)
                region = (slice(None), slice(None), slice(i, i + sh * (rows - 1) + 1, sh),
                          slice(j, j + sw * (cols - 1) + 1, sw))
                dxpad[region] = dxpad[region] + term
    if not input_grad:
        return None, dweight, dbias
    ph, pw = padding
    return dxpad[:, :, ph:ph + h, pw:pw + w], dweight, dbias


class Conv2d(Layer):
    """A 2-d convolution (cross-correlation) with zero padding and a bias.

    Shapes: x (N, C_in, H, W), W (C_out, C_in, kh, kw), b (C_out,), y (N, C_out, Ho, Wo)
    with Ho = floor((H + 2 p_h - kh) / s_h) + 1 and Wo alike (``conv2d_forward``).
    ``kernel_size``, ``stride`` and ``padding`` are an int or a (rows, columns) pair.

    Initialisation: ``"he"`` (the default) draws W ~ N(0, 2 / fan_in), fan_in = C_in kh kw,
    the convolution's inputs per output, as ``layers.Linear`` does for its hidden layers: it
    keeps the activation variance through the ReLUs between layers (He et al. 2015).
    PyTorch's default, U(+-1/sqrt(fan_in)), has a sixth of that variance, so the signal of
    an 8-layer ReLU net shrinks by about 6^4; ``"glorot"`` (variance
    2 / (fan_in + fan_out), fan_out = C_out kh kw) is for a last layer, as in the MLP.
    The bias starts at 0. Weights are drawn on the host from ``rng``, as Linear's are.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, backend: Backend,
                 rng: np.random.Generator, stride=1, padding=0, init: str = "he"):
        super().__init__(backend)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if init not in INITIALISATIONS:
            raise ValueError(f"init: expected one of {INITIALISATIONS}, got {init!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        kh, kw = self.kernel_size
        fan_in, fan_out = in_channels * kh * kw, out_channels * kh * kw
        std = math.sqrt(2.0 / fan_in) if init == "he" else math.sqrt(2.0 / (fan_in + fan_out))
        weight = rng.standard_normal((out_channels, in_channels, kh, kw)) * std
        self.params = {"W": backend.asarray(weight), "b": backend.zeros((out_channels,))}
        self.grads = {k: backend.zeros(v.shape) for k, v in self.params.items()}

    def output_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C_out, Ho, Wo) for inputs of (height, width) pixels."""
        return (self.out_channels,
                conv2d_output_size(height, self.kernel_size[0], self.stride[0], self.padding[0]),
                conv2d_output_size(width, self.kernel_size[1], self.stride[1], self.padding[1]))

    def forward(self, x):
        self.check_input(x)
        self.cache = x
        return conv2d_forward(x, self.params["W"], self.params["b"], self.stride, self.padding)

    def check_input(self, x):
        """A ValueError naming x unless it is images of in_channels the kernel fits."""
        _check_images(x, channels=self.in_channels)
        self.output_shape(x.shape[2], x.shape[3])          # the kernel fits the padded input

    def backward(self, dout, input_grad: bool = True):
        """dL/dx (None with ``input_grad=False``); writes dW and db into ``grads``."""
        x = self._cached()
        dx, dweight, dbias = conv2d_backward(dout, x, self.params["W"], self.stride,
                                             self.padding, input_grad)
        self.grads["W"][...] = dweight
        self.grads["b"][...] = dbias
        return dx


@fast_twin
def conv2d_relu_forward(x, weight, bias, stride, padding):
    """max(conv2d_forward(x; W, b), 0): a Conv2d and the ReLU after it, (N, O, Ho, Wo).
    (Its CPU twin adds the bias and clips in the pass that lays the product out.)"""
    return namespace_of(x).maximum(conv2d_forward(x, weight, bias, stride, padding), 0.0)


def _conv2d_relu(conv, relu, x, keep):
    """The forward of Conv2d ``conv`` and the ReLU ``relu`` after it, leaving their caches
    (with ``keep``) as their own forwards would: the images, and the ReLU's output."""
    conv.check_input(x)
    out = conv2d_relu_forward(x, conv.params["W"], conv.params["b"], conv.stride,
                              conv.padding)
    if keep:
        conv.cache, relu.cache = x, out
    return out


FUSED_FORWARDS[(Conv2d, ReLU)] = _conv2d_relu


# ------------------------------------------------------------------------------------------
# MaxPool2d: routing


def _blocks(xp, x, k: int):
    """x (N, C, H, W) as its k x k windows (N, C, H/k, W/k, k*k), the window's entries in
    row-major order: entry r = i k + j is row offset i, column offset j."""
    n, c, h, w = x.shape
    six = xp.reshape(x, (n, c, h // k, k, w // k, k))
    return xp.reshape(xp.permute_dims(six, (0, 1, 2, 4, 3, 5)), (n, c, h // k, w // k, k * k))


@fast_twin
def maxpool2d_forward(x, kernel: int, with_index: bool = False):
    """y[n, c, p, q] = max_{i, j < k} x[n, c, k p + i, k q + j]; x (N, C, H, W) with H and
    W multiples of k, y (N, C, H / k, W / k).

    ``with_index=True`` returns (y, first): also the window offset r = i k + j of each
    window's first maximum (argmax's), integers (N, C, H / k, W / k), which
    ``maxpool2d_backward`` takes so as not to scan the windows again."""
    xp = namespace_of(x)
    n, c, h, w = x.shape
    y = xp.max(xp.reshape(x, (n, c, h // kernel, kernel, w // kernel, kernel)), axis=(3, 5))
    if not with_index:
        return y
    return y, xp.argmax(_blocks(xp, x, kernel), axis=4)


@fast_twin
def maxpool2d_backward(dout, x, kernel: int, first=None):
    """dx of maxpool2d_forward, given dout (N, C, H / k, W / k): max routes.

    Away from ties y[n, c, p, q] equals one entry x[n, c, k p + i*, k q + j*] of its
    window, so dy/dx is 1 there and 0 elsewhere: dx[n, c, k p + i*, k q + j*] = dout[n, c,
    p, q], every other entry of the window gets 0. Windows do not overlap (kernel = stride),
    so nothing is summed. On a tie the gradient goes to ONE entry, the first maximum in
    row-major window order (smallest i, then smallest j), as ``argmax`` returns it: one of
    the subgradients, and the one PyTorch's CPU kernel picks. ``first``: those offsets
    as ``maxpool2d_forward(x, k, with_index=True)`` returned them for this x; None finds
    them in x (whose shape dx takes either way).
    """
    xp = namespace_of(dout)
    n, c, h, w = x.shape
    k = kernel
    if first is None:
        first = xp.argmax(_blocks(xp, x, k), axis=4)             # (N, C, Ho, Wo)
    offsets = xp.reshape(xp.arange(k * k, dtype=first.dtype), (1, 1, 1, 1, k * k))
    routed = xp.where(offsets == first[..., None], dout[..., None], xp.zeros((), dtype=dout.dtype))
    six = xp.reshape(routed, (n, c, h // k, w // k, k, k))
    return xp.reshape(xp.permute_dims(six, (0, 1, 2, 4, 3, 5)), (n, c, h, w))


class MaxPool2d(Layer):
    """Max over non-overlapping k x k windows (kernel = stride = k, no padding).

    Shapes: x (N, C, H, W) with H and W multiples of k (anything else is a ValueError, not
    a silently dropped border), y (N, C, H / k, W / k). Backward routes each dout to the
    window's maximum, on a tie to the first in row-major window order
    (``maxpool2d_backward``). The cache is x, the offsets of those maxima, found once in
    forward, and y (read by the backward of a ReLU before the pool, ``_relu_maxpool_backward``).
    """

    def __init__(self, kernel_size: int, backend: Backend):
        super().__init__(backend)
        if not isinstance(kernel_size, (int, np.integer)) or isinstance(kernel_size, bool) \
                or kernel_size < 1:
            raise ValueError(f"kernel_size: expected a positive integer, got {kernel_size!r}")
        self.kernel_size = int(kernel_size)

    def forward(self, x):
        _check_images(x)
        k = self.kernel_size
        if x.shape[2] % k or x.shape[3] % k:
            raise ValueError(f"x: MaxPool2d({k}) needs height and width that are multiples "
                             f"of {k}, got shape {tuple(x.shape)}")
        y, first = maxpool2d_forward(x, k, with_index=True)
        self.cache = (x, first, y)
        return y

    def backward(self, dout):
        x, first, _ = self._cached()
        return maxpool2d_backward(dout, x, self.kernel_size, first)


def _relu_maxpool_backward(relu, pool, dout, input_grad):
    """dL/d(the ReLU's input) for a ReLU and the MaxPool2d after it, with the mask on the
    pooled side: each dout reaches only its window's first maximum, the entry x = y, so
    where(x > 0, route(dout), 0) = route(where(y > 0, dout, 0)), the same bits, from a
    mask of a quarter of the values (k = 2). Each layer's own backward when the pool's
    input is not that ReLU's output."""
    x, first, y = pool.cache                  # the network checked that its forward ran
    if relu.cache is not x:
        return relu.backward(pool.backward(dout))
    return maxpool2d_backward(relu_backward(y, dout), x, pool.kernel_size, first)


FUSED_BACKWARDS[(ReLU, MaxPool2d)] = _relu_maxpool_backward


# ------------------------------------------------------------------------------------------
# Upsample: a copy, whose backward is a sum


@fast_twin
def upsample_forward(x, scale: int):
    """y[n, c, p, q] = x[n, c, floor(p / f), floor(q / f)]: x (N, C, H, W) -> y (N, C, f H,
    f W), f = ``scale``, each entry copied into an f x f block. (Its CPU twin writes y in
    one pass.)"""
    xp = namespace_of(x)
    # each column f times, then each row: 0.38-0.50 the time of one copy of the 6-d
    # broadcast (n, c, h, f, w, f), whose innermost runs are f entries long
    return xp.repeat(xp.repeat(x, scale, axis=3), scale, axis=2)


@fast_twin
def upsample_backward(dout, scale: int):
    """dx[n, c, h, w] = sum_{a, b < f} dout[n, c, f h + a, f w + b]: dout (N, C, f H, f W)
    -> dx (N, C, H, W), each block summed, offsets (a, b) in row-major order. Written as
    f^2 whole-array adds of the strided slices dout[:, :, a::f, b::f] (a reduction over
    two strided axes of a 6-d view was 70x slower in NumPy); its CPU twin sums each block
    in the same order, in one pass."""
    f = scale
    _check_images(dout, "dout")
    if dout.shape[2] % f or dout.shape[3] % f:
        raise ValueError(f"dout: expected rows and columns that are multiples of the "
                         f"scale factor {f}, got shape {tuple(dout.shape)}")
    total = dout[:, :, 0::f, 0::f]
    for a in range(f):
        for b in range(f):
            if a or b:
                total = total + dout[:, :, a::f, b::f]
    return total


class Upsample(Layer):
    """Nearest-neighbour upsampling by an integer factor f.

    y[n, c, p, q] = x[n, c, floor(p / f), floor(q / f)]: x (N, C, H, W), y (N, C, f H, f W).
    Each x entry is copied into an f x f block of y, so dL/dx is the sum of dout over
    its block: dx[n, c, h, w] = sum_{a, b < f} dout[n, c, f h + a, f w + b]
    (``upsample_forward``, ``upsample_backward``). No parameters; backward needs only
    dout's shape.
    """

    def __init__(self, scale_factor: int, backend: Backend):
        super().__init__(backend)
        if not isinstance(scale_factor, (int, np.integer)) or isinstance(scale_factor, bool) \
                or scale_factor < 1:
            raise ValueError(f"scale_factor: expected a positive integer (nearest-neighbour "
                             f"upsampling copies whole pixels), got {scale_factor!r}")
        self.scale_factor = int(scale_factor)

    def forward(self, x):
        _check_images(x)
        self.cache = True                                    # backward needs only dout
        return upsample_forward(x, self.scale_factor)

    def backward(self, dout):
        self._cached()
        return upsample_backward(dout, self.scale_factor)


@fast_twin
def conv2d_backward_upsampled(dout, x, weight, stride, padding, scale: int):
    """(dx', dW, db) of an Upsample(f = ``scale``) and the convolution after it, x being
    the upsampled images (N, C, f H, f W): conv2d_backward's dW and db, and its dx through
    upsample_backward, dx' (N, C, H, W). (Its CPU twin sums the blocks in the pass that
    crops dx out of the flat layout.)"""
    dx, dweight, dbias = conv2d_backward(dout, x, weight, stride, padding)
    return upsample_backward(dx, scale), dweight, dbias


def _upsample_conv2d_backward(upsample, conv, dout, input_grad):
    """The backward of an Upsample and the Conv2d after it: dL/d(the Upsample's input)."""
    if not input_grad:
        return conv.backward(dout, input_grad=False)
    x = conv.cache                            # the network checked that its forward ran
    dx, dweight, dbias = conv2d_backward_upsampled(dout, x, conv.params["W"], conv.stride,
                                                   conv.padding, upsample.scale_factor)
    conv.grads["W"][...] = dweight
    conv.grads["b"][...] = dbias
    return dx


FUSED_BACKWARDS[(Upsample, Conv2d)] = _upsample_conv2d_backward


# ------------------------------------------------------------------------------------------
# Flatten / Unflatten: the same numbers, another shape


def _to_flat(xp, x, channels_last: bool, groups: int):
    """(N, G C, H, W) -> (N, G C H W): channel-major (C, H, W) order, or with
    ``channels_last`` each of the G groups of C channels in pixel-major (H, W, C) order,
    the groups side by side."""
    n, gc, h, w = x.shape
    if not channels_last or gc == groups:                  # one channel per group: the same
        return xp.reshape(x, (n, gc * h * w))
    grouped = xp.reshape(x, (n, groups, gc // groups, h, w))
    return xp.reshape(xp.permute_dims(grouped, (0, 1, 3, 4, 2)), (n, gc * h * w))


def _from_flat(xp, v, shape, channels_last: bool, groups: int):
    """The inverse of :func:`_to_flat`: (N, G C H W) -> (N, G C, H, W), shape = (G C, H, W)."""
    gc, h, w = shape
    n = v.shape[0]
    if not channels_last or gc == groups:
        return xp.reshape(v, (n, gc, h, w))
    grouped = xp.reshape(v, (n, groups, h, w, gc // groups))
    return xp.reshape(xp.permute_dims(grouped, (0, 1, 4, 2, 3)), (n, gc, h, w))


def _check_layout(channels_last, groups) -> int:
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last: expected True or False, got {channels_last!r}")
    if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups: expected a positive integer, got {groups!r}")
    return int(groups)


class Flatten(Layer):
    """(N, C, H, W) -> (N, C H W); backward reshapes dout back.

    ``channels_last=True`` writes each pixel's channels together, (H, W, C) order, as
    ``vae_np.data`` stores colour images; ``groups = G`` splits the C channels into G
    groups of C / G, flattened one after the other: a decoder's (N, 2 C, H, W) output of
    [means, log-variances] becomes the likelihood's [mu (c), logvar (c)] layout
    (``likelihoods.Gaussian``), c = C H W in the data's pixel order.
    """

    def __init__(self, backend: Backend, channels_last: bool = False, groups: int = 1):
        super().__init__(backend)
        self.groups = _check_layout(channels_last, groups)
        self.channels_last = channels_last

    def forward(self, x):
        _check_images(x)
        if x.shape[1] % self.groups:
            raise ValueError(f"x: {x.shape[1]} channels do not split into {self.groups} groups")
        self.cache = tuple(x.shape[1:])
        return _to_flat(self.backend.xp, x, self.channels_last, self.groups)

    def backward(self, dout):
        return _from_flat(self.backend.xp, dout, self._cached(), self.channels_last, self.groups)


class Unflatten(Layer):
    """(N, C H W) -> (N, C, H, W), the inverse of :class:`Flatten` with the same
    ``channels_last`` and ``groups``; backward flattens dout."""

    def __init__(self, shape, backend: Backend, channels_last: bool = False, groups: int = 1):
        super().__init__(backend)
        shape = tuple(shape) if isinstance(shape, (tuple, list)) else shape
        if not isinstance(shape, tuple) or len(shape) != 3 or any(
                not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 1
                for s in shape):
            raise ValueError(f"shape: expected (C, H, W), three positive integers, got {shape!r}")
        self.groups = _check_layout(channels_last, groups)
        if shape[0] % self.groups:
            raise ValueError(f"groups: {shape[0]} channels do not split into {groups} groups")
        self.shape, self.channels_last = tuple(int(s) for s in shape), channels_last

    def forward(self, x):
        size = math.prod(self.shape)
        if getattr(x, "ndim", None) != 2 or x.shape[1] != size:
            raise ValueError(f"x: expected shape (N, {size}) to unflatten to "
                             f"(N, {', '.join(map(str, self.shape))}), got shape "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        self.cache = True
        return _from_flat(self.backend.xp, x, self.shape, self.channels_last, self.groups)

    def backward(self, dout):
        self._cached()
        return _to_flat(self.backend.xp, dout, self.channels_last, self.groups)
