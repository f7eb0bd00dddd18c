"""vae_np.optim: Adam against Kingma & Ba's Algorithm 1 written out by hand, SGD with
momentum against its recurrence, gradient-norm clipping, optimizer state round trips, bad
hyperparameters, and an end-to-end check that training lowers the loss."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from vae_np import SGD, VAE, Adam, clip_grad_norm
from vae_np.parameters import Parameters


class Holder:
    """A parameter-owning stand-in for a layer: ``params`` by key, ``grads`` filled in."""

    def __init__(self, arrays):
        self.params = dict(arrays)
        self.grads = {}


def make_parameters(backend, **arrays):
    holder = Holder({k: backend.asarray(np.asarray(v, dtype=np.float64)) for k, v in arrays.items()})
    return Parameters(backend, [(k, holder, k) for k in arrays]), holder


THETA0 = [0.5, -1.2, 3.0, 0.0, 1e-3, -7.5]
# Five steps of gradients: sign changes, a zero, tiny and large entries.
GRADS = [
    [0.1, -0.2, 3.0, 0.0, 1e-6, 1e3],
    [-0.3, -0.1, 2.5, 0.0, 2e-6, 8e2],
    [0.2, 0.4, -1.0, 0.5, -1e-6, 1.2e3],
    [0.05, -0.6, 0.7, 0.0, 5e-6, -9e2],
    [-0.4, 0.3, 1.1, -0.25, 0.0, 1e3],
]


def adam_by_hand(theta, grads, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
    """Kingma & Ba (2015), Algorithm 1, in plain Python floats."""
    theta = [float(v) for v in theta]
    m = [0.0] * len(theta)
    v = [0.0] * len(theta)
    for t, g in enumerate(grads, start=1):
        for i, gi in enumerate(g):
            m[i] = beta1 * m[i] + (1 - beta1) * gi          # biased first moment
            v[i] = beta2 * v[i] + (1 - beta2) * gi * gi     # biased second raw moment
            m_hat = m[i] / (1 - beta1 ** t)                 # bias corrections
            v_hat = v[i] / (1 - beta2 ** t)
            theta[i] = theta[i] - lr * m_hat / (math.sqrt(v_hat) + eps)
    return theta, m, v


@pytest.mark.parametrize("hyper", [
    {},  # the defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8
    {"lr": 0.05, "betas": (0.5, 0.9), "eps": 1e-3},
    {"lr": 1.0, "betas": (0.0, 0.0), "eps": 1e-8},  # beta = 0: no memory, sign-like steps
    # long memories: 1 - beta2^t is 5e-5 at t = 5, the corrections' scalars far from 1, and
    # an eps small enough that a slip to the paper's eps-hat form would show
    {"lr": 1e-2, "betas": (0.99, 0.99999), "eps": 1e-4},
])
def test_adam_matches_algorithm_1(hyper, backend, code_path):
    params, _ = make_parameters(backend, theta=THETA0)
    opt = Adam(params, **hyper)
    beta1, beta2 = hyper.get("betas", (0.9, 0.999))
    for g in GRADS:
        params.grad[...] = backend.asarray(np.array(g))
        opt.step()
    theta, m, v = adam_by_hand(THETA0, GRADS, hyper.get("lr", 1e-3), beta1, beta2,
                               hyper.get("eps", 1e-8))
    got = backend.to_numpy(params.data)
    # Same operations in a possibly different order: float64 agreement to ~1e-15 relative;
    # 1e-12 on the values, 1e-10 on the (much smaller) displacements.
    np.testing.assert_allclose(got, theta, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got - THETA0, np.subtract(theta, THETA0), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(backend.to_numpy(opt.m), m, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(backend.to_numpy(opt.v), v, rtol=1e-12, atol=1e-300)
    assert opt.t == len(GRADS)


def test_adam_updates_every_named_array_of_the_flat_buffer(np64):
    params, holder = make_parameters(np64, W=[[1.0, 2.0], [3.0, 4.0]], b=[0.5, -0.5])
    opt = Adam(params, lr=0.1)
    params.grads["W"][...] = [[1.0, -1.0], [0.0, 2.0]]
    params.grads["b"][...] = [-3.0, 0.0]
    opt.step()
    # First step: each entry moves by lr * g / (|g| + eps) ~ lr * sign(g) (see below).
    np.testing.assert_allclose(holder.params["W"], [[0.9, 2.1], [3.0, 3.9]], rtol=0, atol=1e-8)
    np.testing.assert_allclose(holder.params["b"], [0.6, -0.5], rtol=0, atol=1e-8)
    assert holder.params["W"] is params.values["W"]  # the layer sees the update


def test_adam_bias_correction_makes_the_first_step_lr_times_sign(np64, code_path):
    """With m_hat = g and v_hat = g^2 at t = 1, the first step is lr * g / (|g| + eps):
    lr * sign(g) to 1e-5 relative for |g| >= 1e-3. Without bias correction it would be
    lr * (1 - beta1) / sqrt(1 - beta2) ~ 3.16 lr."""
    g = np.array([1e-3, -0.02, 0.5, -3.0, 40.0, -1e4])
    params, _ = make_parameters(np64, theta=np.zeros(6))
    opt = Adam(params, lr=1e-3)
    params.grad[...] = g
    opt.step()
    np.testing.assert_allclose(params.data, -1e-3 * np.sign(g), rtol=1e-5)
    uncorrected = 1e-3 * (1 - 0.9) / math.sqrt(1 - 0.999)
    assert uncorrected > 3 * 1e-3  # the bug this guards against is not a rounding matter


def test_adam_zero_gradient_does_not_move(np64):
    params, _ = make_parameters(np64, theta=[1.0, 2.0])
    opt = Adam(params)
    for _ in range(3):
        params.grad[...] = 0.0
        opt.step()
    np.testing.assert_array_equal(params.data, [1.0, 2.0])


def sgd_by_hand(theta, grads, lr, momentum):
    """b_t = momentum b_{t-1} + g_t; theta_t = theta_{t-1} - lr b_t (b_0 = 0)."""
    theta = [float(v) for v in theta]
    b = [0.0] * len(theta)
    for g in grads:
        for i, gi in enumerate(g):
            b[i] = momentum * b[i] + gi
            theta[i] -= lr * b[i]
    return theta, b


@pytest.mark.parametrize("lr, momentum", [(0.01, 0.0), (0.01, 0.9), (0.3, 0.5)])
def test_sgd_matches_the_momentum_recurrence(lr, momentum, backend):
    params, _ = make_parameters(backend, theta=THETA0)
    opt = SGD(params, lr=lr, momentum=momentum)
    for g in GRADS:
        params.grad[...] = backend.asarray(np.array(g))
        opt.step()
    theta, b = sgd_by_hand(THETA0, GRADS, lr, momentum)
    np.testing.assert_allclose(backend.to_numpy(params.data), theta, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(backend.to_numpy(opt.velocity), b, rtol=1e-12, atol=1e-300)


# ------------------------------------------------------------------------------------------
# Gradient-norm clipping


def test_clip_grad_norm_scales_down_large_gradients(backend):
    params, _ = make_parameters(backend, W=np.zeros((2, 2)), b=np.zeros(2))
    params.grads["W"][...] = backend.asarray(np.array([[3.0, 0.0], [0.0, 0.0]]))
    params.grads["b"][...] = backend.asarray(np.array([4.0, 0.0]))  # global norm 5
    norm = clip_grad_norm(params, 2.0)
    assert backend.to_float(norm) == pytest.approx(5.0, rel=1e-15)  # the norm before clipping
    after = backend.to_numpy(params.grad)
    assert np.linalg.norm(after) == pytest.approx(2.0, rel=1e-10)
    np.testing.assert_allclose(after, np.array([3.0, 0, 0, 0, 4.0, 0]) * 0.4, rtol=1e-10)


def test_clip_grad_norm_leaves_small_gradients_alone(backend):
    params, _ = make_parameters(backend, theta=np.zeros(3))
    g = np.array([0.3, -0.4, 0.0])  # norm 0.5
    params.grad[...] = backend.asarray(g)
    norm = clip_grad_norm(params, 1.0)
    assert backend.to_float(norm) == pytest.approx(0.5, rel=1e-15)
    np.testing.assert_array_equal(backend.to_numpy(params.grad), g)  # bit for bit


def test_clip_grad_norm_of_zero_gradients_is_zero_not_nan(np64):
    params, _ = make_parameters(np64, theta=np.zeros(4))
    with np.errstate(all="raise"):
        norm = clip_grad_norm(params, 1.0)
    assert float(norm) == 0.0 and np.all(params.grad == 0.0)


def test_optimizer_clip_norm_clips_before_the_update(np64):
    params, _ = make_parameters(np64, theta=np.zeros(3))
    opt = SGD(params, lr=1.0, clip_norm=1.5)
    params.grad[...] = [6.0, 0.0, -8.0]  # norm 10
    opt.step()
    np.testing.assert_allclose(params.data, [-0.9, 0.0, 1.2], rtol=1e-10)
    assert np.linalg.norm(params.data) == pytest.approx(1.5, rel=1e-10)


@pytest.mark.parametrize("max_norm", [-1.0, float("nan")])
def test_clip_grad_norm_rejects_bad_max_norm(np64, max_norm):
    params, _ = make_parameters(np64, theta=np.zeros(2))
    params.grad[...] = [3.0, 4.0]
    with pytest.raises(ValueError, match=r"^max_norm: "):
        clip_grad_norm(params, max_norm)


# ------------------------------------------------------------------------------------------
# Optimizer state: save mid-run, restore into fresh objects, continue bit-identically


def _tiny_vae(seed):
    return VAE(input_dim=6, hidden=(5,), latent_dim=2, decoder="gaussian", dtype="float64",
               seed=seed)


def _train(model, opt, x, steps):
    for k in steps:
        model.loss(x, eps=np.random.default_rng(100 + k).standard_normal((1, len(x), 2)))
        model.backward()
        opt.step()


@pytest.mark.parametrize("make_opt", [
    lambda p: Adam(p, lr=1e-2),
    lambda p: Adam(p, lr=1e-2, clip_norm=0.5),
    lambda p: SGD(p, lr=1e-2, momentum=0.9),
], ids=["adam", "adam-clipped", "sgd-momentum"])
def test_state_round_trip_continues_identically(make_opt, code_path):
    x = np.random.default_rng(0).uniform(size=(8, 6))
    straight = _tiny_vae(0)
    straight_opt = make_opt(straight.parameters)
    _train(straight, straight_opt, x, range(6))

    first = _tiny_vae(0)
    first_opt = make_opt(first.parameters)
    _train(first, first_opt, x, range(3))
    saved = copy.deepcopy((first.state_dict(), first_opt.state_dict()))
    assert int(saved[1]["t"]) == 3
    assert all(type(v) is np.ndarray for v in saved[1].values())

    resumed = _tiny_vae(seed=99)  # other weights, fresh moments: everything comes from `saved`
    resumed_opt = make_opt(resumed.parameters)
    resumed.load_state_dict(saved[0])
    resumed_opt.load_state_dict(saved[1])
    assert resumed_opt.t == 3
    _train(resumed, resumed_opt, x, range(3, 6))
    np.testing.assert_array_equal(resumed.parameters.data, straight.parameters.data)


def test_optimizer_state_dict_is_a_copy(np64):
    params, _ = make_parameters(np64, theta=[1.0, 2.0])
    opt = Adam(params)
    params.grad[...] = [1.0, 1.0]
    opt.step()
    state = opt.state_dict()
    state["m"][...] = 123.0
    assert np.all(opt.m != 123.0)


@pytest.mark.parametrize("mutate, pattern", [
    (lambda s: s.pop("t"), r"^state: missing 't'"),
    (lambda s: s.pop("v"), r"^state: missing 'v'"),
    (lambda s: s.update(m=np.zeros(3)), r"^state\['m'\]: expected shape \(2,\)"),
])
def test_optimizer_load_state_dict_rejects_mismatches(np64, mutate, pattern):
    params, _ = make_parameters(np64, theta=[1.0, 2.0])
    opt = Adam(params)
    state = opt.state_dict()
    mutate(state)
    with pytest.raises(ValueError, match=pattern):
        Adam(params).load_state_dict(state)


# ------------------------------------------------------------------------------------------
# Bad hyperparameters


@pytest.mark.parametrize("kwargs, pattern", [
    ({"lr": 0.0}, r"^lr: expected a finite number > 0"),
    ({"lr": -1e-3}, r"^lr: "),
    ({"lr": float("nan")}, r"^lr: expected a finite number"),
    ({"lr": float("inf")}, r"^lr: "),
    ({"lr": "1e-3"}, r"^lr: "),
    ({"lr": True}, r"^lr: "),
    ({"betas": (1.0, 0.999)}, r"^betas\[0\]: expected a finite number >= 0 and < 1"),
    ({"betas": (-0.1, 0.999)}, r"^betas\[0\]: "),
    ({"betas": (0.9, 1.0)}, r"^betas\[1\]: "),
    ({"betas": (0.9,)}, r"^betas: expected a pair"),
    ({"betas": 0.9}, r"^betas: "),
    ({"eps": 0.0}, r"^eps: "),
    ({"eps": -1e-8}, r"^eps: "),
    ({"clip_norm": 0.0}, r"^clip_norm: "),
    ({"clip_norm": -1.0}, r"^clip_norm: "),
    ({"clip_norm": float("nan")}, r"^clip_norm: "),
])
def test_bad_adam_hyperparameters(np64, kwargs, pattern):
    params, _ = make_parameters(np64, theta=[0.0])
    with pytest.raises(ValueError, match=pattern):
        Adam(params, **kwargs)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"momentum": 1.0}, r"^momentum: "),
    ({"momentum": -0.5}, r"^momentum: "),
    ({"lr": 0}, r"^lr: "),
])
def test_bad_sgd_hyperparameters(np64, kwargs, pattern):
    params, _ = make_parameters(np64, theta=[0.0])
    with pytest.raises(ValueError, match=pattern):
        SGD(params, **kwargs)


@pytest.mark.parametrize("cls", [Adam, SGD])
def test_optimizers_need_a_parameters_object(cls):
    with pytest.raises(TypeError, match=r"^parameters: expected vae_np.parameters.Parameters"):
        cls([np.zeros(3)])


# ------------------------------------------------------------------------------------------
# End to end: optimisation works


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("make_opt", [lambda p: Adam(p, lr=1e-2),
                                      lambda p: SGD(p, lr=0.1, momentum=0.9)],
                         ids=["adam", "sgd"])
def test_training_a_tiny_vae_lowers_the_loss(dtype, make_opt, code_path):
    data_rng = np.random.default_rng(0)
    prototypes = (data_rng.uniform(size=(2, 12)) < 0.5).astype(np.float64)
    x = prototypes[data_rng.integers(0, 2, size=32)]  # two binary patterns
    model = VAE(input_dim=12, hidden=(16,), latent_dim=2, decoder="bernoulli", dtype=dtype,
                seed=0)
    eval_eps = np.random.default_rng(1).standard_normal((1, 32, 2))

    def evaluate():
        return float(model.loss(x, eps=eval_eps).loss)

    opt = make_opt(model.parameters)
    before = evaluate()
    rng = model.backend.rng(2)
    for _ in range(150):
        model.loss(x, rng=rng)
        model.backward()
        opt.step()
    after = evaluate()
    assert np.isfinite(after)
    # ~9.7 nats at the start; two patterns are easy to learn (Adam reaches ~1.5, SGD ~4).
    assert after < 0.6 * before, (before, after)
