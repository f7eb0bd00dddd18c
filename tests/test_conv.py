"""vae_np.conv: forwards against independent oracles, every backward against central
differences (element-wise and directional, float64), the im2col twins against the
references, shapes by hypothesis, and bad input.

Gradient tolerance: gradcheck.DEFAULT_TOLERANCE = 1e-6 (norm-wise relative error). The
layers are piecewise linear in each input (max-pool) or linear (the rest), so the central
difference with h = 1e-6 has no truncation error away from a max-pool tie and only
round-off (~1e-16 |f| / h ~ 1e-10 relative); a wrong derivative is off by O(1).

Max-pool ties: at an exact tie max is not differentiable, and a central difference sees
the average of the two one-sided slopes (1/2), not the gradient any rule routes. So the
finite-difference checks run on inputs whose windows have a unique maximum at least 1e-2
(>> h) above the runner-up (``separated``: distinct grid values in random order), and
ties are checked exactly: on a tied input the routed gradient is the one of the input
with the first maximum lifted by 1e-3 (the side where the first one wins), entry for entry.

Fast twins against references (NumPy): both compute the same sums of products in other
orders (the references one ``tensordot`` per kernel offset, the twins one matrix product
over all of them). Each is within (n - 1) u sum|terms| of the exact sum, u = eps / 2, n
terms (recursive summation; the products' own rounding adds u per term), so the two
differ by at most n eps sum|terms|, the bound asserted with the sums of |terms| computed
by the reference on |x| and |W|. Max-pool compares and copies: equal to the bit.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vae_np import conv, gradcheck
from vae_np.backend import get_backend, twin_of, use_fast_paths
from vae_np.conv import Conv2d, Flatten, MaxPool2d, Unflatten, Upsample

TOL = gradcheck.DEFAULT_TOLERANCE

# (N, C_in, H, W, C_out, kernel, stride, padding): odd sizes, stride > 1, padding 0 and
# > 0, rectangular kernels, one and three channels, a kernel as large as the padded input.
CONV_CASES = [
    (2, 1, 5, 7, 2, 3, 1, 0),
    (2, 3, 7, 6, 4, 3, 2, 1),
    (1, 3, 6, 9, 2, (2, 3), (2, 1), (0, 2)),
    (2, 1, 5, 5, 3, 5, 1, 2),
    (3, 3, 4, 5, 1, 1, 1, 0),
    (1, 1, 3, 3, 2, 5, 3, 1),
    (2, 3, 6, 5, 2, 3, 1, 1),
]
CONV_IDS = [f"N{c[0]}C{c[1]}H{c[2]}W{c[3]}O{c[4]}k{c[5]}s{c[6]}p{c[7]}" for c in CONV_CASES]


def make_conv(case, backend, seed=0):
    n, c, h, w, o, k, s, p = case
    rng = np.random.default_rng(seed)
    layer = Conv2d(c, o, k, backend, rng, stride=s, padding=p)
    layer.params["b"][...] = backend.asarray(rng.standard_normal(o))
    x = rng.standard_normal((n, c, h, w))
    return layer, x


def naive_conv2d(x, weight, bias, stride, padding):
    """The definition, seven loops deep: y[n,o,p,q] = b[o] + sum W[o,c,i,j] xpad[...]."""
    (sh, sw), (ph, pw) = stride, padding
    n_, c_, h, w = x.shape
    o_, _, kh, kw = weight.shape
    xpad = np.zeros((n_, c_, h + 2 * ph, w + 2 * pw))
    xpad[:, :, ph:ph + h, pw:pw + w] = x
    rows, cols = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    y = np.zeros((n_, o_, rows, cols))
    for n in range(n_):
        for o in range(o_):
            for p in range(rows):
                for q in range(cols):
                    total = bias[o]
                    for c in range(c_):
                        for i in range(kh):
                            for j in range(kw):
                                total += weight[o, c, i, j] * xpad[n, c, sh * p + i, sw * q + j]
                    y[n, o, p, q] = total
    return y


def separated(shape, seed=0, gap=1e-2):
    """Distinct values k * gap (shuffled, centred): every max-pool window has one maximum,
    at least ``gap`` above the runner-up, so a step of h = 1e-6 never changes the winner."""
    values = (np.arange(np.prod(shape)) - np.prod(shape) / 2) * gap
    return np.random.default_rng(seed).permutation(values).reshape(shape)


# ------------------------------------------------------------------------------------------
# Forward values against oracles


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_forward_matches_the_seven_loop_definition(case, backend, code_path):
    layer, x = make_conv(case, backend)
    y = backend.to_numpy(layer.forward(backend.asarray(x)))
    expected = naive_conv2d(x, backend.to_numpy(layer.params["W"]),
                            backend.to_numpy(layer.params["b"]), layer.stride, layer.padding)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_forward_matches_torch(case, np64, code_path):
    torch = pytest.importorskip("torch")
    layer, x = make_conv(case, np64)
    y = layer.forward(x)
    expected = torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(layer.params["W"].copy()),
        torch.from_numpy(layer.params["b"].copy()), stride=layer.stride,
        padding=layer.padding).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_conv_forward_with_stride_one_matches_scipy_correlate(np64):
    signal = pytest.importorskip("scipy.signal")
    layer, x = make_conv((1, 3, 6, 7, 2, 3, 1, 0), np64)
    y = layer.forward(x)
    for o in range(2):
        expected = sum(signal.correlate(x[0, c], layer.params["W"][o, c], mode="valid")
                       for c in range(3)) + layer.params["b"][o]
        np.testing.assert_allclose(y[0, o], expected, rtol=1e-12, atol=1e-12)


def test_maxpool_forward_is_the_window_maximum(backend, code_path):
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 9))
    y = backend.to_numpy(MaxPool2d(3, backend).forward(backend.asarray(x)))
    for p in range(2):
        for q in range(3):
            np.testing.assert_array_equal(
                y[:, :, p, q], x[:, :, 3 * p:3 * p + 3, 3 * q:3 * q + 3].max(axis=(2, 3)))


def test_upsample_forward_copies_each_pixel_into_a_block(backend):
    x = np.random.default_rng(2).standard_normal((2, 3, 3, 5))
    y = backend.to_numpy(Upsample(2, backend).forward(backend.asarray(x)))
    np.testing.assert_array_equal(y, np.kron(x, np.ones((2, 2))))


@pytest.mark.parametrize("channels_last", [False, True])
def test_flatten_orders_pixels_as_the_data_does(backend, channels_last):
    """(N, G C, H, W) flattened: channel-major, or each group in (H, W, C) order."""
    x = np.random.default_rng(3).standard_normal((2, 6, 4, 5))        # 2 groups of 3
    flat = backend.to_numpy(Flatten(backend, channels_last=channels_last, groups=2)
                            .forward(backend.asarray(x)))
    if channels_last:
        expected = np.concatenate([x[:, :3].transpose(0, 2, 3, 1).reshape(2, -1),
                                   x[:, 3:].transpose(0, 2, 3, 1).reshape(2, -1)], axis=1)
    else:
        expected = x.reshape(2, -1)
    np.testing.assert_array_equal(flat, expected)
    back = Unflatten((6, 4, 5), backend, channels_last=channels_last, groups=2)
    np.testing.assert_array_equal(backend.to_numpy(back.forward(backend.asarray(flat))), x)


# ------------------------------------------------------------------------------------------
# Backward against central differences


def _check(layer, x, record_check, family, backend, max_entries=None):
    report = gradcheck.check_layer(layer, backend.asarray(x), max_entries=max_entries)
    record_check(family, report.max_rel_error)
    assert report.passed, report.table()
    xb = backend.asarray(x)
    out = layer.forward(xb)
    dout = backend.asarray(np.random.default_rng(7).standard_normal(tuple(out.shape)))
    arrays = {"input": xb, **layer.params}
    dx = layer.backward(dout)
    analytic = {"input": backend.to_numpy(dx).copy(),
                **{k: backend.to_numpy(g).copy() for k, g in layer.grads.items()}}

    def f():
        return float(backend.xp.sum(layer.forward(xb) * dout))

    result = gradcheck.check_directional(f, arrays, analytic)
    record_check(family + " (directional)", result.rel_error)
    assert result.passed, result


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_backward(case, backend, code_path, record_check):
    layer, x = make_conv(case, backend)
    _check(layer, x, record_check, "conv.Conv2d", backend)


@pytest.mark.parametrize("k, shape", [(2, (2, 1, 6, 4)), (3, (1, 3, 9, 6)), (1, (2, 3, 3, 5))])
def test_maxpool_backward(k, shape, backend, code_path, record_check):
    _check(MaxPool2d(k, backend), separated(shape), record_check, "conv.MaxPool2d", backend)


@pytest.mark.parametrize("f, shape", [(2, (2, 1, 3, 5)), (3, (1, 3, 2, 2))])
def test_upsample_backward(f, shape, backend, record_check):
    x = np.random.default_rng(4).standard_normal(shape)
    _check(Upsample(f, backend), x, record_check, "conv.Upsample", backend)


@pytest.mark.parametrize("channels_last, groups", [(False, 1), (True, 1), (True, 3)])
def test_flatten_and_unflatten_backward(channels_last, groups, backend, record_check):
    x = np.random.default_rng(5).standard_normal((2, 6, 3, 5))
    _check(Flatten(backend, channels_last, groups), x, record_check, "conv.Flatten", backend)
    _check(Unflatten((6, 3, 5), backend, channels_last, groups), x.reshape(2, -1),
           record_check, "conv.Unflatten", backend)


def test_maxpool_ties_route_to_the_first_maximum(backend, code_path):
    """Every window tied (all four equal, or two equal maxima): the gradient goes to the
    first maximum in row-major order, as on the input where that one is lifted by 1e-3."""
    rng = np.random.default_rng(6)
    x = np.repeat(np.repeat(rng.standard_normal((2, 3, 2, 3)), 2, axis=2), 2, axis=3)
    x[0, 0, 1, 1] = x[0, 0, 0, 1] = x[0, 0, 0, 0] + 1.0        # maxima at (0, 1) and (1, 1)
    dout = rng.standard_normal((2, 3, 1 * 2, 3))
    layer = MaxPool2d(2, backend)
    layer.forward(backend.asarray(x))
    dx = backend.to_numpy(layer.backward(backend.asarray(dout)))
    lifted = x.copy()
    for n, c, p, q in np.ndindex(2, 3, 2, 3):
        window = x[n, c, 2 * p:2 * p + 2, 2 * q:2 * q + 2]
        i, j = divmod(int(np.argmax(window)), 2)
        lifted[n, c, 2 * p + i, 2 * q + j] += 1e-3
    assert dx[0, 0, 0, 1] == dout[0, 0, 0, 0] and dx[0, 0, 1, 1] == 0.0
    layer.forward(backend.asarray(lifted))
    np.testing.assert_array_equal(dx, backend.to_numpy(layer.backward(backend.asarray(dout))))
    assert np.count_nonzero(dx) == dout.size                   # one entry per window


def test_input_grad_false_skips_dx_and_keeps_the_parameter_gradients(np64, code_path):
    layer, x = make_conv(CONV_CASES[1], np64)
    dout = np.random.default_rng(8).standard_normal(layer.forward(x).shape)
    layer.backward(dout)
    expected = {k: g.copy() for k, g in layer.grads.items()}
    layer.forward(x)
    assert layer.backward(dout, input_grad=False) is None
    for key in expected:
        np.testing.assert_array_equal(layer.grads[key], expected[key])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_relu_then_maxpool_backward_masks_on_the_pooled_side(dtype, code_path):
    """The fused backward of a ReLU and the MaxPool2d after it masks dout where y > 0:
    the bits of the two backwards, on ties at 0 (whole windows of zeros) and NaN; and when
    the pool's input is not the ReLU's output, the layers' own backwards run."""
    from vae_np.layers import FUSED_BACKWARDS, ReLU
    backend = get_backend("numpy", dtype=dtype)
    relu, pool = ReLU(backend), MaxPool2d(2, backend)
    fused = FUSED_BACKWARDS[(ReLU, MaxPool2d)]
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 4, 6)).astype(dtype)
    a[0, 0, :2, :2] = -1.0                                  # a window of ReLU zeros: a tie
    a[0, 1, 2, 3], a[1, 2, 0, 0] = np.nan, 0.0
    dout = rng.standard_normal((2, 3, 2, 3)).astype(dtype)
    pool.forward(relu.forward(a))
    got = fused(relu, pool, dout, True)
    want = relu.backward(pool.backward(dout))
    np.testing.assert_array_equal(got.view(f"u{a.itemsize}"), want.view(f"u{a.itemsize}"))
    b = rng.standard_normal(a.shape).astype(dtype)          # the pool saw other images
    relu.forward(a)
    pool.forward(b)
    got = fused(relu, pool, dout, True)
    np.testing.assert_array_equal(got, relu.backward(pool.backward(dout)))


def test_inference_call_keeps_the_training_cache(np64):
    layer, x = make_conv(CONV_CASES[1], np64)
    dout = np.random.default_rng(9).standard_normal(layer.forward(x).shape)
    dx = layer.backward(dout)
    layer.forward(x)
    layer(x + 1.0)
    np.testing.assert_array_equal(layer.backward(dout), dx)


def test_he_initialisation_variance():
    layer = Conv2d(16, 64, 3, get_backend("numpy", "float64"), np.random.default_rng(0))
    w = layer.params["W"]
    assert w.shape == (64, 16, 3, 3) and np.all(layer.params["b"] == 0)
    assert abs(w.var() / (2.0 / (16 * 9)) - 1.0) < 0.05        # 9216 draws: ~1.5% sd


# ------------------------------------------------------------------------------------------
# Fast twins against the references


def _bounds(x, weight, dout, stride, padding):
    """n eps sum|terms| for y, dW and dx (per entry), from the reference on |.|."""
    with use_fast_paths(False):
        abs_y = conv.conv2d_forward(np.abs(x), np.abs(weight), np.zeros(weight.shape[0]),
                                    stride, padding)
        abs_dx, abs_dw, _ = conv.conv2d_backward(np.abs(dout), np.abs(x), np.abs(weight),
                                                 stride, padding)
    o, c, kh, kw = weight.shape
    n_pos = dout.shape[0] * dout.shape[2] * dout.shape[3]
    return abs_y, c * kh * kw + 1, abs_dw, n_pos, abs_dx, o * kh * kw


def assert_twin_within_bound(xd, wd, bd, stride, padding):
    """The CPU twin's forward and backward against the reference's, within the
    reordered-sum bound (module docstring); db is the same call, equal to the bit."""
    eps = np.finfo(xd.dtype).eps
    y = conv.conv2d_forward(xd, wd, bd, stride, padding)
    dout = np.random.default_rng(10).standard_normal(y.shape).astype(xd.dtype)
    dx, dw, db = conv.conv2d_backward(dout, xd, wd, stride, padding)
    with use_fast_paths(False):
        y0 = conv.conv2d_forward(xd, wd, bd, stride, padding)
        dx0, dw0, db0 = conv.conv2d_backward(dout, xd, wd, stride, padding)
    abs_y, n_y, abs_dw, n_dw, abs_dx, n_dx = _bounds(xd, wd, dout, stride, padding)
    assert y.dtype == dx.dtype == dw.dtype == xd.dtype
    assert y.shape == y0.shape and dx.shape == xd.shape and dw.shape == wd.shape
    assert np.all(np.abs(y - y0) <= n_y * eps * (abs_y + np.abs(bd).reshape(-1, 1, 1)))
    assert np.all(np.abs(dw - dw0) <= n_dw * eps * abs_dw)
    assert np.all(np.abs(dx - dx0) <= n_dx * eps * abs_dx)
    np.testing.assert_array_equal(db, db0)                     # the same call


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_twin_within_the_reordered_sum_bound(case, dtype):
    backend = get_backend("numpy", dtype)
    if twin_of("conv.conv2d_forward", np.zeros(1)) is None:
        pytest.skip("no CPU twin here (numba missing or fast paths off)")
    layer, x = make_conv(case, get_backend("numpy", "float64"))
    xd, wd, bd = (a.astype(backend.numpy_dtype)
                  for a in (x, layer.params["W"], layer.params["b"]))
    assert_twin_within_bound(xd, wd, bd, layer.stride, layer.padding)


def test_conv_twin_in_chunks_of_one_image(monkeypatch):
    """The CPU twin runs large batches in chunks of images (CONV_CHUNK_BYTES); with one
    image per chunk every path through the chunks is taken, within the same bound."""
    twins = pytest.importorskip("vae_np._twins_cpu")
    monkeypatch.setattr(twins, "CONV_CHUNK_BYTES", 1)
    test_conv_twin_within_the_reordered_sum_bound(CONV_CASES[1], "float32")
    test_conv_twin_within_the_reordered_sum_bound(CONV_CASES[2], "float64")
    layer, x = make_conv(CONV_CASES[1], get_backend("numpy", "float64"))
    dout = np.ones(layer.forward(x).shape)
    _, dw, db = conv.conv2d_backward(dout, x, layer.params["W"], layer.stride, layer.padding,
                                     input_grad=False)
    dx1, dw1, _ = conv.conv2d_backward(dout, x, layer.params["W"], layer.stride, layer.padding)
    np.testing.assert_array_equal(dw, dw1)


@contextlib.contextmanager
def flat_products(kind):
    """Same-size convolutions with ``kind`` products: "offsets" (one product per kernel
    offset through NumPy's BLAS, taken here from one channel on) or "columns" (the
    columns' one product, as where NumPy's BLAS has no C interface)."""
    twins = pytest.importorskip("vae_np._twins_cpu")
    saved = twins._NUMPY_GEMM, twins.OFFSET_MIN_CHANNELS
    if kind == "offsets":
        if twins._NUMPY_GEMM is None:
            pytest.skip("NumPy's BLAS has no C interface here")
        twins.OFFSET_MIN_CHANNELS = 1
    else:
        twins._NUMPY_GEMM = None
    try:
        yield
    finally:
        twins._NUMPY_GEMM, twins.OFFSET_MIN_CHANNELS = saved


PRODUCTS = ["offsets", "columns"]


def _same_size_case(n, c, h, w, o, kh, kw, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x, weight, bias = (rng.standard_normal(shape).astype(dtype)
                       for shape in ((n, c, h, w), (o, c, kh, kw), (o,)))
    return x, weight, bias, (1, 1), ((kh - 1) // 2, (kw - 1) // 2)


def _count_flat_calls(monkeypatch, twins):
    """Counts of the same-size (flat layout) twin's forward and backward calls."""
    calls = {"forward": 0, "backward": 0}
    forward, backward = twins._correlate_flat, twins._backward_flat

    def counted_forward(*args, **kwargs):
        calls["forward"] += 1
        return forward(*args, **kwargs)

    def counted_backward(*args, **kwargs):
        calls["backward"] += 1
        return backward(*args, **kwargs)

    monkeypatch.setattr(twins, "_correlate_flat", counted_forward)
    monkeypatch.setattr(twins, "_backward_flat", counted_backward)
    return calls


@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("c, o", [(3, 2), (2, 3)])   # dx correlated (O <= C) or added back
def test_same_size_twin_with_a_short_last_chunk(monkeypatch, c, o, dtype, products):
    """Same-size convolutions (stride 1, padding (k - 1) / 2) take the flat layout; with
    chunks of two images, five images end in a one-image chunk, and the rectangular
    kernel has different row and column padding."""
    twins = pytest.importorskip("vae_np._twins_cpu")
    if twin_of("conv.conv2d_forward", np.zeros(1)) is None:
        pytest.skip("no CPU twin here (fast paths off)")
    x, weight, bias, stride, padding = _same_size_case(5, c, 4, 6, o, 3, 5, dtype)
    per_image = c * 3 * 5 * (4 + 1) * (6 + 2)                    # C kh kw R P entries
    monkeypatch.setattr(twins, "FLAT_CHUNK_ENTRIES", 2 * per_image)
    calls = _count_flat_calls(monkeypatch, twins)
    with flat_products(products):
        assert_twin_within_bound(x, weight, bias, stride, padding)
    assert calls["backward"] >= 1 and calls["forward"] >= 1


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 4), c=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7),
       o=st.integers(1, 3), kh=st.sampled_from([1, 3, 5]), kw=st.sampled_from([1, 3, 5]),
       dtype=st.sampled_from(["float32", "float64"]))
def test_same_size_twin_within_the_bound_for_any_shape(n, c, h, w, o, kh, kw, dtype):
    """Kernels wider than the image (a 5-wide kernel on 1 column) included: the padding
    then covers everything the kernel reaches."""
    if twin_of("conv.conv2d_forward", np.zeros(1)) is None:
        pytest.skip("no CPU twin here (numba missing or fast paths off)")
    for products in PRODUCTS:
        with flat_products(products):
            assert_twin_within_bound(*_same_size_case(n, c, h, w, o, kh, kw, dtype))


@pytest.mark.parametrize("where, value", [
    ("x", np.inf), ("x", -np.inf), ("x", np.nan), ("weight", np.inf), ("weight", np.nan),
    ("dout", np.inf), ("dout", np.nan)])
@pytest.mark.parametrize("c, o", [(2, 3), (3, 2)])
@pytest.mark.parametrize("same_size, products", [(True, "offsets"), (True, "columns"),
                                                 (False, "columns")])
def test_conv_twin_keeps_the_references_non_finite_entries(where, value, c, o, same_size,
                                                           products):
    """The flat layout (same-size convolutions) and the transposed dx (stride 1, O <= C)
    compute products at padding positions that the reference never forms; 0 * inf there
    would be NaN. An inf or NaN at the image's edge (column 0, the last row) must give the
    reference's NaN and inf entries, and its finite ones."""
    if twin_of("conv.conv2d_forward", np.zeros(1)) is None:
        pytest.skip("no CPU twin here (numba missing or fast paths off)")
    x, weight, bias, stride, padding = _same_size_case(2, c, 5, 6, o, 3, 3, "float64")
    if not same_size:
        padding = (0, 0)
    rows, cols = (5, 6) if same_size else (3, 4)
    dout = np.random.default_rng(3).standard_normal((2, o, rows, cols))
    arrays = {"x": x, "weight": weight, "dout": dout}
    arrays[where][0, 0, -1, 0] = value
    arrays[where][-1, -1, 0, -1] = value
    with np.errstate(all="ignore"), flat_products(products):
        got = (conv.conv2d_forward(x, weight, bias, stride, padding),
               *conv.conv2d_backward(dout, x, weight, stride, padding))
        with use_fast_paths(False):
            want = (conv.conv2d_forward(x, weight, bias, stride, padding),
                    *conv.conv2d_backward(dout, x, weight, stride, padding))
    for name, a, b in zip(("y", "dx", "dW", "db"), got, want):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
        np.testing.assert_array_equal(np.isposinf(a), np.isposinf(b), err_msg=name)
        np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b), err_msg=name)
        finite = np.isfinite(b)
        # float64 sums of under 60 terms of size ~1: reordering moves them by ~1e-14
        np.testing.assert_allclose(a[finite], b[finite], rtol=0, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_relu_twin_is_the_conv_twin_then_the_relu(case, dtype, products):
    """conv2d_relu_forward's CPU twin clips in the flat layout's crop (same-size
    convolutions; the others run the reference): its bits are the conv twin's output
    through numpy.maximum(., 0.0), with an inf and a NaN in x and a -inf and an inf in b,
    and the reference is that composition of the references."""
    twins = pytest.importorskip("vae_np._twins_cpu")
    if twin_of("conv.conv2d_relu_forward", np.zeros(1)) is None:
        pytest.skip("no CPU twin here (numba missing or fast paths off)")
    layer, x = make_conv(case, get_backend("numpy", "float64"))
    x, weight, bias = (a.astype(dtype) for a in (x, layer.params["W"], layer.params["b"]))
    args = (x, weight, bias, layer.stride, layer.padding)
    with np.errstate(all="ignore"), flat_products(products):
        for x[0, 0, 0, 0], bias[0] in ((x[0, 0, 0, 0], bias[0]), (np.inf, -np.inf),
                                       (np.nan, np.inf)):
            fused = conv.conv2d_relu_forward(*args)
            np.testing.assert_array_equal(
                fused.view(f"u{x.itemsize}"),
                np.maximum(conv.conv2d_forward(*args), 0.0).view(f"u{x.itemsize}"))
            served = twins.conv2d_relu_forward(*args) is not NotImplemented
            assert served == twins._same_size(weight, layer.stride, layer.padding)
            with use_fast_paths(False):
                np.testing.assert_array_equal(conv.conv2d_relu_forward(*args),
                                              np.maximum(conv.conv2d_forward(*args), 0.0))


@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("c, o", [(3, 2), (2, 3)])   # dx correlated (O <= C) or added back
@pytest.mark.parametrize("special", [None, ("x", np.inf), ("weight", np.nan),
                                     ("dout", -np.inf)])
def test_upsampled_conv_backward_twin_is_the_two_twins(monkeypatch, c, o, dtype, products,
                                                       special):
    """conv2d_backward_upsampled's CPU twin sums dx's blocks in the crop out of the flat
    layout (chunks of two images: five end in a one-image chunk): the bits of the conv
    twin's backward with its dx through upsample_backward's twin, non-finite entries
    included (then the twin declines and the references' composition runs)."""
    twins = pytest.importorskip("vae_np._twins_cpu")
    if twin_of("conv.conv2d_backward_upsampled", np.zeros(1)) is None:
        pytest.skip("no CPU twin here (numba missing or fast paths off)")
    x, weight, _, stride, padding = _same_size_case(5, c, 4, 6, o, 3, 3, dtype)
    dout = np.random.default_rng(4).standard_normal((5, o, 4, 6)).astype(dtype)
    arrays = {"x": x, "weight": weight, "dout": dout}
    if special is not None:
        arrays[special[0]][0, 0, -1, 0] = special[1]
    monkeypatch.setattr(twins, "FLAT_CHUNK_ENTRIES", 2 * c * 9 * 5 * 7)
    with np.errstate(all="ignore"), flat_products(products):
        got = conv.conv2d_backward_upsampled(dout, x, weight, stride, padding, 2)
        dx, dw, db = conv.conv2d_backward(dout, x, weight, stride, padding)
        want = (conv.upsample_backward(dx, 2), dw, db)
        served = twins.conv2d_backward_upsampled(dout, x, weight, stride, padding, 2)
    assert (served is not NotImplemented) == (special is None)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}"))
    assert got[0].shape == (5, c, 2, 3)


@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize("c, o, stride", [(3, 2, 1), (2, 3, 1), (2, 3, 2)])
def test_conv_twin_takes_an_empty_batch(products, c, o, stride):
    """No images: the reference's shapes and zero gradients (the flat layout's chunks of
    no image once failed here)."""
    if twin_of("conv.conv2d_forward", np.zeros(1)) is None:
        pytest.skip("no CPU twin here (numba missing or fast paths off)")
    x, weight, bias = np.zeros((0, c, 5, 5)), np.ones((o, c, 3, 3)), np.ones(o)
    with flat_products(products):
        y = conv.conv2d_forward(x, weight, bias, (stride, stride), (1, 1))
        dx, dw, db = conv.conv2d_backward(np.zeros(y.shape), x, weight, (stride, stride),
                                          (1, 1))
    with use_fast_paths(False):
        y0 = conv.conv2d_forward(x, weight, bias, (stride, stride), (1, 1))
    assert y.shape == y0.shape and dx.shape == x.shape
    np.testing.assert_array_equal(dw, np.zeros(weight.shape))
    np.testing.assert_array_equal(db, np.zeros(o))


def test_the_networks_channels_take_the_per_offset_products(monkeypatch):
    """16 channels and more (the conv networks' 32 and 64) run one product per offset
    where NumPy's BLAS is at hand; the result is within the bound either way."""
    twins = pytest.importorskip("vae_np._twins_cpu")
    if twins._NUMPY_GEMM is None:
        pytest.skip("NumPy's BLAS has no C interface here")
    calls = []
    offsets = twins._correlate_offsets
    monkeypatch.setattr(twins, "_correlate_offsets",
                        lambda *args: calls.append(args[5].shape) or offsets(*args))
    x, weight, bias, stride, padding = _same_size_case(3, 16, 5, 4, 17, 3, 3, "float32")
    assert_twin_within_bound(x, weight, bias, stride, padding)
    # the forward (W 17 x 16) and dx (the flipped W, 16 x 17), twice: the bound's |x| run
    # is the reference's, so the calls are the twin's own forward and backward
    assert (17, 16, 3, 3) in calls and (16, 17, 3, 3) in calls


def test_numpy_blas_is_used_only_where_found_and_checked(monkeypatch):
    twins = pytest.importorskip("vae_np._twins_cpu")
    monkeypatch.setattr(twins.glob, "glob", lambda pattern: [])
    assert twins.load_numpy_blas() is None
    assert twins._ilp64_gemms("/nonexistent/libscipy_openblas64_.so", "scipy_") is None

    def ignores_its_arguments(*args):
        return None

    # a function that leaves the output as it was fails the 2x2 check
    assert not twins._gemm_adds_into_its_output(ignores_its_arguments, np.float64)


def test_only_same_size_convolutions_take_the_flat_layout(monkeypatch):
    twins = pytest.importorskip("vae_np._twins_cpu")
    calls = _count_flat_calls(monkeypatch, twins)
    for stride, padding, kernel in (((2, 2), (1, 1), 3), ((1, 1), (0, 0), 3),
                                    ((1, 1), (1, 1), 2)):
        x, weight, bias = np.ones((2, 2, 6, 6)), np.ones((3, 2, kernel, kernel)), np.ones(3)
        y = twins.conv2d_forward(x, weight, bias, stride, padding)
        twins.conv2d_backward(np.ones(y.shape), x, weight, stride, padding)
    assert calls == {"forward": 0, "backward": 0}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_maxpool_twin_is_bit_identical(dtype):
    x = np.round(np.random.default_rng(11).standard_normal((3, 2, 6, 8)), 1).astype(dtype)
    dout = np.random.default_rng(12).standard_normal((3, 2, 3, 4)).astype(dtype)
    x[0, 0, 0, 1] = np.nan                                   # NaN wins where it stands
    x[0, 1, 0:2, 0:2] = [[1.0, np.nan], [np.inf, np.nan]]    # the first of two NaNs
    x[1, 0, 2:4, 4:6] = -np.inf                              # a window of -inf only
    x[2, 1, 4:6, 0:2] = [[np.inf, -np.inf], [np.inf, 0.0]]   # a tie at +inf
    y, dx = conv.maxpool2d_forward(x, 2), conv.maxpool2d_backward(dout, x, 2)
    y1, first = conv.maxpool2d_forward(x, 2, with_index=True)
    dx1 = conv.maxpool2d_backward(dout, x, 2, first)
    with use_fast_paths(False):
        y0, first0 = conv.maxpool2d_forward(x, 2, with_index=True)
        np.testing.assert_array_equal(y, conv.maxpool2d_forward(x, 2))
        dx0 = conv.maxpool2d_backward(dout, x, 2)
        np.testing.assert_array_equal(dx, dx0)
        np.testing.assert_array_equal(dx0, conv.maxpool2d_backward(dout, x, 2, first0))
    assert first.dtype == first0.dtype and np.array_equal(first, first0)
    np.testing.assert_array_equal(y1, y0)
    np.testing.assert_array_equal(dx1, dx0)


# ------------------------------------------------------------------------------------------
# Shapes


@settings(max_examples=40)
@given(n=st.integers(1, 3), c=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9),
       o=st.integers(1, 3), kh=st.integers(1, 4), kw=st.integers(1, 4), s=st.integers(1, 3),
       p=st.integers(0, 2))
def test_conv_shapes(n, c, h, w, o, kh, kw, s, p):
    backend = get_backend("numpy", "float64")
    layer = Conv2d(c, o, (kh, kw), backend, np.random.default_rng(0), stride=s, padding=p)
    x = np.ones((n, c, h, w))
    if h + 2 * p < kh or w + 2 * p < kw:
        with pytest.raises(ValueError, match="larger than the padded input"):
            layer.forward(x)
        return
    y = layer.forward(x)
    assert y.shape == (n, o, (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1)
    assert y.shape[1:] == layer.output_shape(h, w)
    dx = layer.backward(np.ones(y.shape))
    assert dx.shape == x.shape and layer.grads["W"].shape == layer.params["W"].shape


@settings(max_examples=30)
@given(n=st.integers(1, 3), c=st.integers(1, 3), hk=st.integers(1, 4), wk=st.integers(1, 4),
       k=st.integers(1, 3))
def test_pool_and_upsample_shapes_invert(n, c, hk, wk, k):
    backend = get_backend("numpy", "float64")
    x = np.random.default_rng(0).standard_normal((n, c, hk * k, wk * k))
    pool, up = MaxPool2d(k, backend), Upsample(k, backend)
    y = pool.forward(x)
    assert y.shape == (n, c, hk, wk)
    assert pool.backward(y).shape == x.shape
    assert up.forward(y).shape == x.shape and up.backward(x).shape == y.shape
    flat = Flatten(backend)
    assert Unflatten(x.shape[1:], backend).forward(flat.forward(x)).shape == x.shape


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 3), c=st.integers(1, 3), h=st.integers(1, 4), w=st.integers(1, 4),
       f=st.integers(1, 3), dtype=st.sampled_from(["float32", "float64"]),
       seed=st.integers(0, 2 ** 16), transposed=st.booleans())
def test_upsample_twins_give_the_references_bits(n, c, h, w, f, dtype, seed, transposed):
    """Any shape (an empty batch too), factor and dtype, inputs with signed zeros, NaN,
    infinities and huge values (their block sums overflow), and non-contiguous views: the
    same bits, NaN's sign and payload aside (IEEE 754 leaves which NaN an add of a NaN and
    an inf - inf returns to the hardware and the compiler's operand order)."""
    if twin_of("conv.upsample_forward", np.zeros(1)) is None:
        pytest.skip("no CPU twin here (numba missing or fast paths off)")
    rng = np.random.default_rng(seed)
    specials = np.array([-0.0, 0.0, np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-45])

    def images(shape):
        a = rng.standard_normal(shape)
        a.reshape(-1)[:] = np.where(rng.random(a.size) < 0.3,
                                    rng.choice(specials, a.size), a.reshape(-1))
        a = a.astype(dtype)
        return np.ascontiguousarray(a.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2) \
            if transposed else a

    x, dout = images((n, c, h, w)), images((n, c, f * h, f * w))
    with np.errstate(all="ignore"):
        got = conv.upsample_forward(x, f), conv.upsample_backward(dout, f)
        with use_fast_paths(False):
            want = conv.upsample_forward(x, f), conv.upsample_backward(dout, f)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_array_equal(a[~np.isnan(a)].view(f"u{a.itemsize}"),
                                      b[~np.isnan(b)].view(f"u{b.itemsize}"))


def test_upsample_backward_sums_each_block(np64):
    dout = np.random.default_rng(13).standard_normal((2, 3, 6, 9))
    layer = Upsample(3, np64)
    layer.forward(np.zeros((2, 3, 2, 3)))
    blocks = dout.reshape(2, 3, 2, 3, 3, 3)
    expected, magnitude = blocks.sum(axis=(3, 5)), np.abs(blocks).sum(axis=(3, 5))
    # the same 9 terms in another order: within 9 eps sum|terms|
    assert np.all(np.abs(layer.backward(dout) - expected) <= 9 * np.finfo(float).eps * magnitude)


# ------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_named(np64):
    rng = np.random.default_rng(0)
    layer = Conv2d(3, 2, 3, np64, rng)
    with pytest.raises(ValueError, match=r"x: expected images of shape \(N, C, H, W\)"):
        layer.forward(np.zeros((3, 5, 5)))
    with pytest.raises(ValueError, match="x: expected 3 channels"):
        layer.forward(np.zeros((1, 1, 5, 5)))
    with pytest.raises(ValueError, match=r"kernel of 3 is larger than the padded input"):
        layer.forward(np.zeros((1, 3, 2, 5)))
    with pytest.raises(ValueError, match="multiples of 2"):
        MaxPool2d(2, np64).forward(np.zeros((1, 1, 5, 4)))
    with pytest.raises(ValueError, match="x: expected images"):
        MaxPool2d(2, np64).forward(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="x: expected images"):
        Upsample(2, np64).forward(np.zeros((2, 4, 4)))
    upsample = Upsample(2, np64)
    upsample.forward(np.zeros((1, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"dout: expected rows and columns that are "
                                         r"multiples of the scale factor 2, "
                                         r"got shape \(1, 1, 4, 3\)"):
        upsample.backward(np.zeros((1, 1, 4, 3)))
    with pytest.raises(ValueError, match="dout: expected images"):
        upsample.backward(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="dout: expected rows and columns that are multiples"):
        conv.conv2d_backward_upsampled(np.zeros((1, 1, 5, 4)), np.zeros((1, 1, 5, 4)),
                                       np.zeros((1, 1, 3, 3)), (1, 1), (1, 1), 2)
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 12\)"):
        Unflatten((3, 2, 2), np64).forward(np.zeros((2, 13)))
    with pytest.raises(ValueError, match="3 channels do not split into 2 groups"):
        Flatten(np64, groups=2).forward(np.zeros((1, 3, 2, 2)))
    with pytest.raises(RuntimeError, match="backward called before forward"):
        Conv2d(1, 1, 1, np64, rng).backward(np.zeros((1, 1, 1, 1)))


@pytest.mark.parametrize("make, message", [
    (lambda b, r: Upsample(1.5, b), "scale_factor: expected a positive integer"),
    (lambda b, r: Upsample(0, b), "scale_factor"),
    (lambda b, r: MaxPool2d(2.0, b), "kernel_size: expected a positive integer"),
    (lambda b, r: Conv2d(0, 2, 3, b, r), "in_channels"),
    (lambda b, r: Conv2d(1, 2, (3, 0), b, r), "kernel_size: expected an integer >= 1"),
    (lambda b, r: Conv2d(1, 2, 3, b, r, stride=0), "stride: expected an integer >= 1"),
    (lambda b, r: Conv2d(1, 2, 3, b, r, padding=-1), "padding: expected an integer >= 0"),
    (lambda b, r: Conv2d(1, 2, 3, b, r, padding=(1, 1, 1)), "padding"),
    (lambda b, r: Conv2d(1, 2, 3, b, r, init="kaiming"), "init: expected one of"),
    (lambda b, r: Unflatten((3, 4), b), r"shape: expected \(C, H, W\)"),
    (lambda b, r: Flatten(b, groups=0), "groups: expected a positive integer"),
])
def test_bad_constructor_arguments(np64, make, message):
    with pytest.raises(ValueError, match=message):
        make(np64, np.random.default_rng(0))


def test_channels_last_must_be_a_bool(np64):
    with pytest.raises(TypeError, match="channels_last: expected True or False"):
        Flatten(np64, channels_last="yes")


# ------------------------------------------------------------------------------------------
# The CuPy twins (run where there is a GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_cupy_conv_twin_matches_the_numpy_reference(case):
    import cupy

    layer, x = make_conv(case, get_backend("numpy", "float64"))
    w, b = layer.params["W"], layer.params["b"]
    dout = np.random.default_rng(14).standard_normal(
        conv.conv2d_forward(x, w, b, layer.stride, layer.padding).shape)
    with use_fast_paths(False):
        y0 = conv.conv2d_forward(x, w, b, layer.stride, layer.padding)
        dx0, dw0, db0 = conv.conv2d_backward(dout, x, w, layer.stride, layer.padding)
    y = conv.conv2d_forward(cupy.asarray(x), cupy.asarray(w), cupy.asarray(b), layer.stride,
                            layer.padding)
    dx, dw, db = conv.conv2d_backward(cupy.asarray(dout), cupy.asarray(x), cupy.asarray(w),
                                      layer.stride, layer.padding)
    abs_y, n_y, abs_dw, n_dw, abs_dx, n_dx = _bounds(x, w, dout, layer.stride, layer.padding)
    eps = np.finfo(np.float64).eps
    assert np.all(np.abs(y.get() - y0) <= n_y * eps * (abs_y + np.abs(b).reshape(-1, 1, 1)))
    assert np.all(np.abs(dw.get() - dw0) <= n_dw * eps * abs_dw)
    assert np.all(np.abs(dx.get() - dx0) <= n_dx * eps * abs_dx)
    assert np.all(np.abs(db.get() - db0) <= dout.size * eps * np.abs(dout).sum())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cupy_maxpool_twin_is_bit_identical(dtype):
    import cupy

    x = np.round(np.random.default_rng(15).standard_normal((3, 2, 6, 8)), 1).astype(dtype)
    dout = np.random.default_rng(16).standard_normal((3, 2, 3, 4)).astype(dtype)
    with use_fast_paths(False):
        y0, dx0 = conv.maxpool2d_forward(x, 2), conv.maxpool2d_backward(dout, x, 2)
    np.testing.assert_array_equal(conv.maxpool2d_forward(cupy.asarray(x), 2).get(), y0)
    np.testing.assert_array_equal(
        conv.maxpool2d_backward(cupy.asarray(dout), cupy.asarray(x), 2).get(), dx0)
