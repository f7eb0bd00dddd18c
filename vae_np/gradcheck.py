"""Gradient checking: hand-written backward passes against central differences.

The same tool serves the test suite and learners (``examples/gradcheck_tour.py``):

- :func:`check_gradients` perturbs entries one at a time (element-wise check): precise,
  and it points at the wrong entry;
- :func:`check_directional` perturbs everything along one random unit direction r and
  compares (f(x + h r) - f(x - h r)) / 2h with <grad, r>: two evaluations for any size;
- :func:`check_layer`, :func:`check_loss` and :func:`check_vae` wire layers, loss functions
  and the whole model into those checks.

ReLU has no derivative at 0: a pre-activation within h of 0 makes the central difference
see half the slope and the check fails with nothing wrong. Freshly initialised biases are
exactly 0, so a hidden layer that is entirely off for one example puts the next
pre-activation exactly on the kink; randomise the biases (or the input) before checking.

All checks need float64 arrays: a central difference has truncation error O(h^2) and
round-off error about 1e-16 |f| / h; with h = 1e-6 both are near 1e-10 relative in
float64, while float32 round-off alone (1e-7 |f| / h) would swamp the signal.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from .backend import fast_paths_enabled, use_fast_paths
from .validation import check_int, check_number

#: The code paths :func:`check_vae` can exercise: the readable reference of every op, or
#: the fast twins that NumPy (with numba) and CuPy run by default
#: (``vae_np.backend.fast_paths_enabled``).
PATHS = ("reference", "fast")

DEFAULT_STEP = 1e-6
# Central differences in float64 reach ~1e-9 relative error on these functions (see the
# module docstring); a wrong derivative is off by O(1). 1e-6 sits far from both.
DEFAULT_TOLERANCE = 1e-6


def rel_error(a, b) -> float:
    """max_i |a_i - b_i| / max(1e-8, |a_i| + |b_i|) (the CS231n element-wise measure)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


def _norm_rel_error(analytic: np.ndarray, numerical: np.ndarray) -> float:
    """||a - n|| / (||a|| + ||n||): relative to the gradient's size, so entries whose true
    gradient is ~0 contribute their (absolute) finite-difference noise, not a ratio of noise."""
    denom = np.linalg.norm(analytic) + np.linalg.norm(numerical)
    return float(np.linalg.norm(analytic - numerical) / denom) if denom > 0 else 0.0


@dataclass
class GradCheckRow:
    """One checked array: how many entries, and how far analytic and numerical differ."""

    name: str
    shape: tuple
    entries: int
    rel_error: float
    max_abs_error: float
    worst_index: tuple
    analytic_at_worst: float
    numerical_at_worst: float


@dataclass
class GradCheckReport:
    """Per-array results of a gradient check; ``passed`` compares with ``tolerance``."""

    rows: list[GradCheckRow] = field(default_factory=list)
    tolerance: float = DEFAULT_TOLERANCE
    title: str = "gradient check"
    #: which code path was checked (``"reference"`` or ``"fast"``), where that applies
    path: str | None = None

    @property
    def max_rel_error(self) -> float:
        return max((row.rel_error for row in self.rows), default=0.0)

    @property
    def passed(self) -> bool:
        return self.max_rel_error <= self.tolerance

    def worst(self) -> GradCheckRow:
        return max(self.rows, key=lambda row: row.rel_error)

    def table(self) -> str:
        """A fixed-width table, one row per checked array."""
        header = (f"{'array':<22} {'shape':>12} {'checked':>8} {'rel. error':>11} "
                  f"{'analytic':>13} {'numerical':>13}  ok")
        lines = [f"{self.title} (tolerance {self.tolerance:.0e})", header, "-" * len(header)]
        for row in self.rows:
            ok = "yes" if row.rel_error <= self.tolerance else "NO"
            lines.append(f"{row.name:<22} {str(row.shape):>12} {row.entries:>8} "
                         f"{row.rel_error:>11.2e} {row.analytic_at_worst:>13.6e} "
                         f"{row.numerical_at_worst:>13.6e}  {ok}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _host(array) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "get") and type(array).__module__.startswith("cupy"):
        return array.get()
    return np.asarray(array)


def _require_float64(arrays: Mapping[str, object]) -> None:
    for name, array in arrays.items():
        if "float64" not in str(array.dtype):
            raise ValueError(f"{name}: gradient checks need float64 arrays, got {array.dtype}; "
                             "build the model or inputs with dtype='float64'")


def _check_step_and_tolerance(h, tolerance) -> None:
    check_number("h", h, low=0.0, low_open=True)
    check_number("tolerance", tolerance, low=0.0, low_open=True)


def numerical_partial(f: Callable[[], float], array, index: tuple, h: float = DEFAULT_STEP) -> float:
    """(f(x + h e_i) - f(x - h e_i)) / 2h for one entry ``index`` of ``array`` (restored after)."""
    old = float(array[index])
    array[index] = old + h
    f_plus = f()
    array[index] = old - h
    f_minus = f()
    array[index] = old
    return (f_plus - f_minus) / (2.0 * h)


def check_gradients(f: Callable[[], float], arrays: Mapping[str, object],
                    analytic: Mapping[str, object], *, h: float = DEFAULT_STEP,
                    max_entries: int | None = None, seed: int = 0,
                    tolerance: float = DEFAULT_TOLERANCE,
                    title: str = "gradient check") -> GradCheckReport:
    """Element-wise central-difference check of ``analytic`` against ``f``.

    Args:
        f: evaluates the scalar function (a Python float) from the current contents of
            ``arrays``; it must be deterministic (fix any noise).
        arrays: name -> array (any backend, float64) that ``f`` reads; entries are
            perturbed in place and restored.
        analytic: name -> the hand-written gradient df/d(array), same shape.
        max_entries: check at most this many randomly chosen entries per array
            (all when None).
    Returns:
        a :class:`GradCheckReport`, one row per array.
    """
    _require_float64(arrays)
    _check_step_and_tolerance(h, tolerance)
    check_int("max_entries", max_entries, 1, allow_none=True)   # None: every entry
    if not arrays:
        raise ValueError("arrays: expected at least one array to check, got none")
    rng = np.random.default_rng(seed)
    report = GradCheckReport(tolerance=tolerance, title=title)
    for name, array in arrays.items():
        if name not in analytic:
            raise ValueError(f"analytic: missing gradient for {name!r}")
        grad = _host(analytic[name]).astype(np.float64)
        shape = tuple(array.shape)
        if grad.shape != shape:
            raise ValueError(f"analytic[{name!r}]: expected shape {shape}, got {grad.shape}")
        size = math.prod(shape)
        flat = np.arange(size) if max_entries is None or size <= max_entries \
            else np.sort(rng.choice(size, size=max_entries, replace=False))
        indices = [tuple(int(i) for i in np.unravel_index(j, shape)) for j in flat]
        numerical = np.array([numerical_partial(f, array, idx, h) for idx in indices])
        chosen = np.array([grad[idx] for idx in indices])
        errors = np.abs(chosen - numerical)
        worst = int(np.argmax(errors)) if len(errors) else 0
        report.rows.append(GradCheckRow(
            name=name, shape=shape, entries=len(indices),
            rel_error=_norm_rel_error(chosen, numerical),
            max_abs_error=float(errors.max()) if len(errors) else 0.0,
            worst_index=indices[worst] if indices else (),
            analytic_at_worst=float(chosen[worst]) if len(chosen) else 0.0,
            numerical_at_worst=float(numerical[worst]) if len(numerical) else 0.0))
    return report


@dataclass
class DirectionalResult:
    """(f(x + h r) - f(x - h r)) / 2h against <analytic gradient, r>."""

    numerical: float
    analytic: float
    rel_error: float
    tolerance: float = DEFAULT_TOLERANCE
    #: which code path was checked (``"reference"`` or ``"fast"``), where that applies
    path: str | None = None

    @property
    def passed(self) -> bool:
        return self.rel_error <= self.tolerance


def check_directional(f: Callable[[], float], arrays: Mapping[str, object],
                      analytic: Mapping[str, object], *, h: float = DEFAULT_STEP,
                      seed: int = 0, tolerance: float = DEFAULT_TOLERANCE) -> DirectionalResult:
    """Directional-derivative check along one random unit direction over all ``arrays``.

    Two evaluations of ``f`` check every entry at once (Chainer's ``check_backward``):
    a wrong gradient anywhere changes <grad, r> for almost every r.
    """
    _require_float64(arrays)
    _check_step_and_tolerance(h, tolerance)
    if not arrays:
        raise ValueError("arrays: expected at least one array to check, got none")
    rng = np.random.default_rng(seed)
    directions = {name: rng.standard_normal(tuple(a.shape)) for name, a in arrays.items()}
    norm = math.sqrt(sum(float(np.sum(r * r)) for r in directions.values()))
    directions = {name: r / norm for name, r in directions.items()}
    expected = sum(float(np.sum(_host(analytic[name]) * r)) for name, r in directions.items())
    originals = {name: _host(a).copy() for name, a in arrays.items()}

    def shifted(step: float) -> float:
        for name, array in arrays.items():
            array[...] = _to_like(array, originals[name] + step * directions[name])
        return f()

    f_plus, f_minus = shifted(h), shifted(-h)
    for name, array in arrays.items():
        array[...] = _to_like(array, originals[name])
    numerical = (f_plus - f_minus) / (2.0 * h)
    denom = abs(numerical) + abs(expected)
    rel = abs(numerical - expected) / denom if denom > 0 else 0.0
    return DirectionalResult(numerical=numerical, analytic=expected, rel_error=rel,
                             tolerance=tolerance)


def _to_like(array, host_values: np.ndarray):
    """``host_values`` as an array of the same library as ``array``."""
    from array_api_compat import array_namespace

    return array_namespace(array).asarray(np.ascontiguousarray(host_values), dtype=array.dtype)


# --------------------------------------------------------------------------------------
# Wiring for layers, losses and the model


def check_layer(layer, x, *, seed: int = 0, h: float = DEFAULT_STEP,
                tolerance: float = DEFAULT_TOLERANCE, max_entries: int | None = None) -> GradCheckReport:
    """Check a layer's backward (input gradient and every parameter gradient).

    The scalar is f = sum(forward(x) * dout) for a fixed random ``dout``, so df/dx is
    exactly ``backward(dout)`` and df/dW is what backward stores in ``grads``.
    """
    from array_api_compat import array_namespace

    xp = array_namespace(x)
    out = layer.forward(x)
    dout = xp.asarray(np.random.default_rng(seed).standard_normal(tuple(out.shape)), dtype=x.dtype)
    if hasattr(layer, "named_parameters"):
        entries = [(name, owner, key) for name, owner, key in layer.named_parameters()]
    else:
        entries = [(key, layer, key) for key in layer.params]
    dx = layer.backward(dout)
    analytic = {"input": _host(dx).copy()}
    analytic.update({name: _host(owner.grads[key]).copy() for name, owner, key in entries})
    arrays = {"input": x}
    arrays.update({name: owner.params[key] for name, owner, key in entries})

    def f() -> float:
        return float(xp.sum(layer.forward(x) * dout))

    return check_gradients(f, arrays, analytic, h=h, max_entries=max_entries, seed=seed,
                           tolerance=tolerance, title=f"{type(layer).__name__} gradient check")


def check_loss(loss_fn: Callable, inputs: Mapping[str, object], *, wrt: tuple[str, ...],
               h: float = DEFAULT_STEP, tolerance: float = DEFAULT_TOLERANCE,
               seed: int = 0, **kwargs) -> GradCheckReport:
    """Check a loss function of ``vae_np.losses``: ``loss_fn(**inputs, reduction="sum",
    **kwargs)`` returns ``(value, *grads)`` with the grads in the order of ``wrt``."""
    value, *grads = loss_fn(**inputs, reduction="sum", **kwargs)
    if len(grads) != len(wrt):
        raise ValueError(f"wrt: {loss_fn.__name__} returns {len(grads)} gradients, got names {wrt}")
    analytic = {name: _host(g).copy() for name, g in zip(wrt, grads)}
    arrays = {name: inputs[name] for name in wrt}

    def f() -> float:
        return float(loss_fn(**inputs, reduction="sum", **kwargs)[0])

    return check_gradients(f, arrays, analytic, h=h, seed=seed, tolerance=tolerance,
                           title=f"{loss_fn.__name__} gradient check")


def model_path(model, path: str | None = None) -> str:
    """The code path a check of ``model`` runs: ``path`` if given (``"fast"`` needs a
    backend with fast twins, NumPy with numba or CuPy), else the one the model runs by
    default."""
    backend = model.backend
    default = "fast" if fast_paths_enabled(backend) else "reference"
    if path is None:
        return default
    if path not in PATHS:
        raise ValueError(f"path: expected one of {', '.join(PATHS)} or None, got {path!r}")
    if path == "fast" and default != "fast":
        raise ValueError(f"path: the {backend.name!r} backend has no fast path here (fast "
                         f"paths run on numpy with numba and on cupy, unless switched off)")
    return path


def _objective(model) -> str:
    """'S=3' for the ELBO with S samples, 'IWAE k=5' for the importance-weighted bound."""
    if getattr(model, "objective", "vae") == "iwae":
        return f"IWAE k={model.samples}"
    return f"S={model.samples}"


def _on_path(path: str):
    return contextlib.nullcontext() if path == "fast" else use_fast_paths(False)


def vae_loss_and_grads(model, x, eps, path: str | None = None):
    """f and analytic gradients for the whole model at fixed noise ``eps`` (S, N, d), both
    computed on ``path`` (see :func:`model_path`)."""
    path = model_path(model, path)

    def f() -> float:
        with _on_path(path):
            return float(model.loss(x, eps=eps).loss)

    with _on_path(path):
        model.loss(x, eps=eps)
        model.backward()
    analytic = {name: _host(g).copy() for name, g in model.parameters.grads.items()}
    return f, analytic


def check_vae(model, x, eps, *, max_entries: int | None = 20, h: float = DEFAULT_STEP,
              tolerance: float = DEFAULT_TOLERANCE, seed: int = 0,
              path: str | None = None) -> GradCheckReport:
    """Check every parameter gradient of a :class:`vae_np.model.VAE` (float64) at fixed
    noise ``eps``, on ``max_entries`` random entries per parameter array.

    ``path``: ``"reference"`` (the readable code of every op), ``"fast"`` (the fused
    variants; NumPy and CuPy) or None (what the model runs by default: fast on NumPy and
    CuPy). The report's ``path`` and title say which one was checked.
    """
    path = model_path(model, path)
    f, analytic = vae_loss_and_grads(model, x, eps, path)
    report = check_gradients(f, model.parameters.values, analytic, h=h,
                             max_entries=max_entries, seed=seed, tolerance=tolerance,
                             title=f"VAE ({model.likelihood.name}, {_objective(model)}, "
                                   f"{path} path) gradient check")
    report.path = path
    return report


def check_vae_directional(model, x, eps, *, h: float = DEFAULT_STEP, seed: int = 0,
                          tolerance: float = DEFAULT_TOLERANCE,
                          path: str | None = None) -> DirectionalResult:
    """Directional check over all of a VAE's parameters at once (two forward passes), on
    ``path`` (as in :func:`check_vae`)."""
    path = model_path(model, path)
    f, analytic = vae_loss_and_grads(model, x, eps, path)
    result = check_directional(f, model.parameters.values, analytic, h=h, seed=seed,
                               tolerance=tolerance)
    result.path = path
    return result
