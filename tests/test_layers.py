"""vae_np.layers: forward values against independent formulas, every backward against
central differences (float64, numpy and array-api-strict), initialisation statistics, and
bad arguments.

Tolerance: vae_np.gradcheck.DEFAULT_TOLERANCE = 1e-6, the norm-wise relative error
||analytic - numerical|| / (||analytic|| + ||numerical||). With h = 1e-6 in float64 the
central difference is accurate to ~1e-10 relative on these smooth functions (truncation
O(h^2), round-off ~1e-16 / h), so a correct backward shows ~1e-10, and a gradient that is
wrong by 1% shows ~5e-3: 1e-6 separates them by three orders of magnitude each way.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import expit

from vae_np import gradcheck
from vae_np.backend import get_backend
from vae_np.layers import (
    ACTIVATIONS,
    MLP,
    LeakyReLU,
    Linear,
    ReLU,
    SHORT_BATCH,
    Sigmoid,
    Softplus,
    Tanh,
    linear_input_grad,
    make_activation,
)

TOL = gradcheck.DEFAULT_TOLERANCE


def away_from_zero(shape, seed=0, margin=0.1):
    """Standard normal entries pushed at least ``margin`` from 0, so a central difference
    with h = 1e-6 never straddles the kink of ReLU / LeakyReLU."""
    z = np.random.default_rng(seed).standard_normal(shape)
    return np.sign(z) * (margin + np.abs(z))


def make_layer(kind, backend, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "linear":
        return Linear(5, 4, backend, rng)
    if kind == "linear-glorot":
        return Linear(5, 4, backend, rng, init="glorot")
    return {"relu": ReLU, "leaky_relu": LeakyReLU, "tanh": Tanh, "sigmoid": Sigmoid,
            "softplus": Softplus}[kind](backend)


LAYER_KINDS = ["linear", "linear-glorot", "relu", "leaky_relu", "tanh", "sigmoid", "softplus"]


# ------------------------------------------------------------------------------------------
# Forward values against independent formulas (a gradient check cannot see a wrong forward)


FORWARD_ORACLES = {
    "relu": lambda x: np.where(x > 0, x, 0.0),
    "leaky_relu": lambda x: np.where(x > 0, x, 0.01 * x),
    "tanh": np.tanh,
    "sigmoid": expit,
    "softplus": lambda x: np.logaddexp(0.0, x),
}


@pytest.mark.parametrize("kind", sorted(FORWARD_ORACLES))
def test_activation_forward_matches_formula(kind, backend):
    x = away_from_zero((6, 7), seed=1) * 3
    out = backend.to_numpy(make_layer(kind, backend).forward(backend.asarray(x)))
    np.testing.assert_allclose(out, FORWARD_ORACLES[kind](x), rtol=1e-13, atol=1e-15)


def test_linear_forward_is_affine(backend):
    layer = make_layer("linear", backend)
    x = np.random.default_rng(2).standard_normal((3, 5))
    layer.params["b"][...] = backend.asarray(np.arange(4.0))
    W = backend.to_numpy(layer.params["W"])
    expected = np.einsum("ni,io->no", x, W) + np.arange(4.0)
    np.testing.assert_allclose(backend.to_numpy(layer.forward(backend.asarray(x))), expected,
                               rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("rows", (1, SHORT_BATCH - 1, SHORT_BATCH, SHORT_BATCH + 3))
@pytest.mark.parametrize("dtype", ("float32", "float64"))
def test_linear_input_grad_is_dout_times_W_transposed_on_both_sides_of_short_batch(
        rows, dtype, backend_name):
    """Both orientations of the product (float32 under SHORT_BATCH rows; float64, and
    float32 from SHORT_BATCH on) give dout W^T: against a float64 einsum, to float32's or
    float64's rounding of 70-term sums, as a fresh C-ordered array of the input's dtype
    (the MLP's next ops and the reference's sums expect row order)."""
    backend = get_backend(backend_name, dtype)
    rng = np.random.default_rng(rows)
    W, dout = rng.standard_normal((37, 70)), rng.standard_normal((rows, 70))
    dx = linear_input_grad(backend.asarray(dout), backend.asarray(W))
    assert dx.shape == (rows, 37) and dx.dtype == backend.asarray(W).dtype
    host = backend.to_numpy(dx)
    if backend_name == "numpy":
        assert host.flags.c_contiguous and host.flags.owndata
    expected = np.einsum("no,io->ni", backend.to_numpy(backend.asarray(dout)).astype(np.float64),
                         backend.to_numpy(backend.asarray(W)).astype(np.float64))
    rtol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(host, expected, rtol=rtol, atol=rtol * np.sqrt(70))


def test_linear_input_grad_of_mixed_dtypes_promotes_as_the_product_does():
    """float32 dout with float64 W takes the usual orientation: a float64 dx, as
    dout @ W^T gives, never a float32 buffer that the float64 product is cast into."""
    dout, W = np.ones((2, 3), np.float32), np.ones((5, 3))
    assert linear_input_grad(dout, W).dtype == (dout @ W.T).dtype == np.float64
    assert linear_input_grad(np.ones((2, 3)), np.ones((5, 3), np.float32)).dtype == np.float64


@pytest.mark.parametrize("dout_shape", ((3,), (6, 3), (4, 2), (4, 3, 1)))
def test_linear_backward_names_a_dout_of_the_wrong_shape(dout_shape, np64):
    layer = Linear(5, 3, np64, np.random.default_rng(0))
    layer.forward(np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"dout: expected shape \(4, 3\)"):
        layer.backward(np.ones(dout_shape))


def test_mlp_forward_is_the_composition(np64):
    mlp = MLP((4, 6, 5, 3), np64, np.random.default_rng(0), activation="tanh")
    x = np.random.default_rng(1).standard_normal((2, 4))
    h = x
    for i, linear in enumerate(mlp.linears):
        h = h @ linear.params["W"] + linear.params["b"]
        if i < 2:
            h = np.tanh(h)
    np.testing.assert_allclose(mlp.forward(x), h, rtol=1e-13)
    assert len(mlp.layers) == 5  # Linear, Tanh, Linear, Tanh, Linear: none after the last


@pytest.mark.parametrize("kind", ["sigmoid", "softplus", "tanh", "relu", "leaky_relu"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_activations_finite_for_extreme_inputs(kind, dtype):
    """exp must never overflow: inputs up to +-1e30 give finite outputs and gradients, with
    overflow / invalid / divide-by-zero raised as errors (underflow to 0 is intended)."""
    backend = get_backend("numpy", dtype)
    x = np.array([[-1e30, -1e4, -100.0, -1.0, 0.0, 1.0, 100.0, 1e4, 1e30]], dtype=dtype)
    layer = make_layer(kind, backend)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        out = layer.forward(x)
        dx = layer.backward(np.ones_like(x))
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(dx))
    if kind == "sigmoid":
        assert out[0, 0] == 0.0 and out[0, -1] == 1.0
        assert np.all((out >= 0) & (out <= 1))
    if kind == "softplus":
        # atol covers float32 subnormals (softplus(-100) = 3.7e-44 has ~2 significant bits).
        np.testing.assert_allclose(out[0], np.logaddexp(0.0, x[0].astype(np.float64)),
                                   rtol=1e-6, atol=1e-40)


# ------------------------------------------------------------------------------------------
# Gradient checks


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_layer_gradients(kind, backend, record_check):
    layer = make_layer(kind, backend)
    x = backend.asarray(away_from_zero((4, 5), seed=3))
    report = gradcheck.check_layer(layer, x, seed=1)
    record_check(f"layers ({backend.name})", report.max_rel_error)
    assert report.passed, report.table()
    assert {row.name for row in report.rows} == {"input", *layer.params}
    # Every entry was checked (no sampling on small layers).
    assert all(row.entries == math.prod(row.shape) for row in report.rows)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_gradients(activation, backend, record_check):
    mlp = MLP((5, 7, 6, 3), backend, np.random.default_rng(4), activation=activation)
    x = backend.asarray(np.random.default_rng(5).standard_normal((4, 5)))
    report = gradcheck.check_layer(mlp, x, seed=2)
    record_check(f"layers ({backend.name})", report.max_rel_error)
    assert report.passed, report.table()
    names = {row.name for row in report.rows}
    assert names == {"input"} | {f"linear{i}.{k}" for i in range(3) for k in ("W", "b")}


def test_mlp_gradients_sampled_on_a_wider_net(np64, record_check):
    """``max_entries`` checks a random subset per array: the way to check big layers."""
    mlp = MLP((40, 64, 30), np64, np.random.default_rng(6))
    x = np.random.default_rng(7).standard_normal((8, 40))
    report = gradcheck.check_layer(mlp, x, max_entries=25, seed=3)
    record_check("layers (numpy)", report.max_rel_error)
    assert report.passed, report.table()
    assert all(row.entries == min(25, math.prod(row.shape)) for row in report.rows)


# Deliberately wrong layers: the same check must reject each of them.


class OffLinear(Linear):
    """dx 1% too large."""

    def backward(self, dout):
        return super().backward(dout) * 1.01


class OffWeightLinear(Linear):
    """dW 1% too large (dx right): the parameter rows of the report must catch it."""

    def backward(self, dout):
        dx = super().backward(dout)
        self.grads["W"][...] = self.grads["W"] * 1.01
        return dx


class LeakyGradReLU(ReLU):
    """Passes the gradient where x < 0 too (forgets the mask)."""

    def backward(self, dout):
        self._cached()
        return dout


class TanhMissingSquare(Tanh):
    """1 - y instead of 1 - y^2."""

    def backward(self, dout):
        return dout * (1.0 - self._cached())


class SigmoidFromInput(Sigmoid):
    """sigmoid(x)(1 - sigmoid(x)) evaluated at the output y instead of x."""

    def backward(self, dout):
        y = self._cached()
        s = 1.0 / (1.0 + np.exp(-y))
        return dout * s * (1.0 - s)


@pytest.mark.parametrize("wrong_layer, bad_row", [
    (lambda b: OffLinear(5, 4, b, np.random.default_rng(0)), "input"),
    (lambda b: OffWeightLinear(5, 4, b, np.random.default_rng(0)), "W"),
    (lambda b: LeakyGradReLU(b), "input"),
    (lambda b: TanhMissingSquare(b), "input"),
    (lambda b: SigmoidFromInput(b), "input"),
], ids=["linear-dx*1.01", "linear-dW*1.01", "relu-no-mask", "tanh-1-y", "sigmoid-at-output"])
def test_wrong_layer_gradients_fail_the_check(wrong_layer, bad_row, np64, record_check):
    layer = wrong_layer(np64)
    report = gradcheck.check_layer(layer, away_from_zero((4, 5), seed=3), seed=1)
    record_check("layers", report.max_rel_error, wrong=True)
    assert not report.passed
    assert report.worst().name == bad_row
    # Far outside the tolerance, not a borderline failure.
    assert report.worst().rel_error > 1e3 * TOL
    assert "NO" in report.table()


# ------------------------------------------------------------------------------------------
# Parameters, gradients and the forward/backward contract


def test_backward_writes_parameter_gradients_in_place(np64):
    """The model points grads at views of one flat buffer, so backward must write into
    the existing arrays, not rebind them."""
    layer = make_layer("linear", np64)
    grads_before = dict(layer.grads)
    x = np.random.default_rng(0).standard_normal((3, 5))
    dout = np.random.default_rng(1).standard_normal((3, 4))
    layer.forward(x)
    layer.backward(dout)
    for key in layer.params:
        assert layer.grads[key] is grads_before[key]
    np.testing.assert_allclose(layer.grads["W"], np.einsum("ni,no->io", x, dout), rtol=1e-13)
    np.testing.assert_allclose(layer.grads["b"], dout.sum(axis=0), rtol=1e-13)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_backward_before_forward_is_a_runtime_error(kind, backend):
    layer = make_layer(kind, backend)
    out_width = 4 if kind.startswith("linear") else 5
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(backend.asarray(np.ones((2, out_width))))


def test_mlp_backward_before_forward_is_a_runtime_error(np64):
    mlp = MLP((3, 4, 2), np64, np.random.default_rng(0))
    with pytest.raises(RuntimeError, match="before forward"):
        mlp.backward(np.ones((1, 2)))


def test_mlp_parameter_names_and_order(np64):
    mlp = MLP((3, 4, 2), np64, np.random.default_rng(0))
    names = [name for name, _, _ in mlp.named_parameters("enc.")]
    assert names == ["enc.linear0.W", "enc.linear0.b", "enc.linear1.W", "enc.linear1.b"]
    for name, owner, key in mlp.named_parameters():
        assert owner.params[key] is mlp.linears[int(name[6])].params[key]


@pytest.mark.parametrize("batch", [1, 3])
def test_shapes(batch, backend):
    mlp = MLP((5, 8, 2), backend, np.random.default_rng(0), activation="softplus")
    out = mlp.forward(backend.asarray(np.ones((batch, 5))))
    assert tuple(out.shape) == (batch, 2)
    dx = mlp.backward(backend.asarray(np.ones((batch, 2))))
    assert tuple(dx.shape) == (batch, 5)
    for linear in mlp.linears:
        for key in linear.params:
            assert linear.grads[key].shape == linear.params[key].shape


# ------------------------------------------------------------------------------------------
# Initialisation


def _std_within(sample, expected_std, n_se=5.0):
    """|sample std - expected| within n_se standard errors (SE of a normal sample's std is
    sigma / sqrt(2 n)); the mean within n_se * sigma / sqrt(n)."""
    n = sample.size
    assert abs(sample.std() - expected_std) < n_se * expected_std / math.sqrt(2 * n), \
        (sample.std(), expected_std)
    assert abs(sample.mean()) < n_se * expected_std / math.sqrt(n)


@pytest.mark.parametrize("fan_in, fan_out", [(400, 300), (784, 512), (64, 1000)])
def test_he_initialisation_statistics(fan_in, fan_out, np64):
    layer = Linear(fan_in, fan_out, np64, np.random.default_rng(0), init="he")
    _std_within(layer.params["W"], math.sqrt(2.0 / fan_in))
    np.testing.assert_array_equal(layer.params["b"], 0.0)


@pytest.mark.parametrize("fan_in, fan_out", [(400, 300), (784, 512), (64, 1000)])
def test_glorot_initialisation_statistics(fan_in, fan_out, np64):
    layer = Linear(fan_in, fan_out, np64, np.random.default_rng(0), init="glorot")
    _std_within(layer.params["W"], math.sqrt(2.0 / (fan_in + fan_out)))
    np.testing.assert_array_equal(layer.params["b"], 0.0)


@pytest.mark.parametrize("activation, hidden_std", [
    ("relu", lambda i, o: math.sqrt(2.0 / i)),
    ("leaky_relu", lambda i, o: math.sqrt(2.0 / i)),
    ("tanh", lambda i, o: math.sqrt(2.0 / (i + o))),
    ("softplus", lambda i, o: math.sqrt(2.0 / (i + o))),
])
def test_mlp_initialisation_per_layer(activation, hidden_std, np64):
    """He for ReLU-like hidden layers, Glorot otherwise; Glorot for the output layer."""
    mlp = MLP((300, 400, 200), np64, np.random.default_rng(1), activation=activation)
    _std_within(mlp.linears[0].params["W"], hidden_std(300, 400))
    _std_within(mlp.linears[1].params["W"], math.sqrt(2.0 / 600))


def test_init_is_seeded_and_identical_across_backends_and_dtypes():
    def weights(backend_name, dtype, seed):
        backend = get_backend(backend_name, dtype)
        mlp = MLP((6, 5, 3), backend, np.random.default_rng(seed))
        return [backend.to_numpy(linear.params["W"]) for linear in mlp.linears]

    reference = weights("numpy", "float64", 42)
    for a, b in zip(reference, weights("numpy", "float64", 42)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(reference, weights("array_api_strict", "float64", 42)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(reference, weights("numpy", "float32", 42)):
        np.testing.assert_array_equal(a.astype(np.float32), b)
    assert not np.array_equal(reference[0], weights("numpy", "float64", 43)[0])


# ------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize("args, name", [
    ((0, 3), "in_features"), ((3, 0), "out_features"), ((-2, 3), "in_features"),
    ((2.5, 3), "in_features"), ((True, 3), "in_features"), ((3, "4"), "out_features"),
])
def test_linear_bad_sizes(args, name, np64):
    with pytest.raises(ValueError, match=rf"^{name}: expected an integer >= 1"):
        Linear(*args, np64, np.random.default_rng(0))


@pytest.mark.parametrize("init", ["xavier", "He", "", None])
def test_linear_bad_init(init, np64):
    with pytest.raises(ValueError, match=r"^init: expected one of"):
        Linear(2, 3, np64, np.random.default_rng(0), init=init)


def test_linear_accepts_numpy_integers(np64):
    layer = Linear(np.int64(3), np.int32(2), np64, np.random.default_rng(0))
    assert layer.params["W"].shape == (3, 2)


@pytest.mark.parametrize("slope", [-0.1, 1.0, 2.0, float("nan")])
def test_leaky_relu_bad_slope(slope, np64):
    with pytest.raises(ValueError, match=r"^slope: "):
        LeakyReLU(np64, slope=slope)


@pytest.mark.parametrize("sizes", [(), (5,)])
def test_mlp_bad_sizes(sizes, np64):
    with pytest.raises(ValueError, match=r"^sizes: "):
        MLP(sizes, np64, np.random.default_rng(0))


def test_mlp_bad_hidden_size_names_the_width(np64):
    with pytest.raises(ValueError, match=r"expected an integer >= 1, got 0"):
        MLP((3, 0, 2), np64, np.random.default_rng(0))


@pytest.mark.parametrize("name", ["gelu", "ReLU", ""])
def test_unknown_activation(name, np64):
    with pytest.raises(ValueError, match=r"^activation: expected one of"):
        make_activation(name, np64)
    with pytest.raises(ValueError, match=r"^activation: expected one of"):
        MLP((3, 4, 2), np64, np.random.default_rng(0), activation=name)


def test_unknown_activation_without_hidden_layers(np64):
    with pytest.raises(ValueError, match=r"^activation: "):
        MLP((3, 2), np64, np.random.default_rng(0), activation="gelu")


@pytest.mark.parametrize("bias_grad", [0.0, np.zeros(()), np.zeros((1,)), np.zeros((2, 1))])
def test_linear_refuses_a_bias_grad_that_would_broadcast(bias_grad, np64):
    """The MLP hands Linear.backward the ReLU pass's column sum; anything but (D_out,)
    would be broadcast into the gradient buffer without a word."""
    layer = Linear(3, 2, np64, np.random.default_rng(0))
    layer.forward(np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"^bias_grad: expected an array of shape \(2,\)"):
        layer.backward(np.ones((4, 2)), bias_grad=bias_grad)
