"""vae_np.gradcheck, the tool itself: its error measures, that it passes right gradients of
functions whose derivatives we know in closed form, fails wrong ones and points at the wrong
entry, restores what it perturbs, samples entries reproducibly, refuses float32, and prints a
table naming every array."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vae_np import gradcheck
from vae_np.backend import get_backend
from vae_np.gradcheck import (
    DEFAULT_TOLERANCE,
    check_directional,
    check_gradients,
    check_loss,
    numerical_partial,
    rel_error,
)
from vae_np.losses import kl_standard_normal

# ------------------------------------------------------------------------------------------
# rel_error: max_i |a_i - b_i| / max(1e-8, |a_i| + |b_i|)


def test_rel_error_values():
    assert rel_error(np.ones(3), np.ones(3)) == 0.0
    assert rel_error(1.0, 1.01) == pytest.approx(0.01 / 2.01, rel=1e-12)
    assert rel_error([1.0, -2.0], [1.0, 2.0]) == pytest.approx(1.0)  # sign flip: the maximum
    assert rel_error(np.zeros(2), np.zeros(2)) == 0.0  # no 0 / 0
    # The 1e-8 floor: tiny absolute differences between near-zero numbers are not blown up.
    assert rel_error(1e-12, 2e-12) == pytest.approx(1e-12 / 1e-8)
    # It is the worst entry, not an average.
    assert rel_error([1.0, 1.0, 1.0], [1.0, 1.0, 2.0]) == pytest.approx(1 / 3)
    assert rel_error(np.float32(1.0), np.float64(1.0)) == 0.0


def test_rel_error_is_symmetric_and_scale_invariant():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(10), rng.standard_normal(10)
    assert rel_error(a, b) == rel_error(b, a)
    assert rel_error(1e3 * a, 1e3 * b) == pytest.approx(rel_error(a, b), rel=1e-12)


# ------------------------------------------------------------------------------------------
# Central differences


def test_numerical_partial_is_second_order_accurate_and_restores_the_entry():
    x = np.array([0.3, 1.1])

    def f():
        return float(np.sin(x[0]) * np.exp(x[1]))

    d0 = numerical_partial(f, x, (0,), h=1e-4)
    assert x[0] == 0.3  # restored exactly
    exact = math.cos(0.3) * math.exp(1.1)
    # Truncation error of a central difference: f''' h^2 / 6 ~ 5e-9 at h = 1e-4.
    assert abs(d0 - exact) < 1e-8
    # Halving h divides the truncation error by ~4 (second order), well above round-off here.
    e1 = abs(numerical_partial(f, x, (0,), h=1e-2) - exact)
    e2 = abs(numerical_partial(f, x, (0,), h=5e-3) - exact)
    assert 3.5 < e1 / e2 < 4.5


def _quadratic(seed=0, shape=(4, 3)):
    """f(X, y) = sum(A * X * X) / 2 + sum(sin(y)) with known gradients A * X and cos(y)."""
    rng = np.random.default_rng(seed)
    A = rng.uniform(0.5, 2.0, shape)
    X, y = rng.standard_normal(shape), rng.standard_normal(5)

    def f():
        return float(np.sum(A * X * X) / 2 + np.sum(np.sin(y)))

    return f, {"X": X, "y": y}, {"X": A * X, "y": np.cos(y)}


def test_check_gradients_passes_a_right_gradient(record_check):
    f, arrays, grads = _quadratic()
    originals = {k: v.copy() for k, v in arrays.items()}
    report = check_gradients(f, arrays, grads)
    record_check("gradcheck on closed-form functions", report.max_rel_error)
    assert report.passed and report.tolerance == DEFAULT_TOLERANCE
    assert report.max_rel_error < 1e-8  # the expected float64 accuracy, far below 1e-6
    assert [row.name for row in report.rows] == ["X", "y"]
    assert [row.entries for row in report.rows] == [12, 5]
    for name in arrays:  # every perturbed entry was put back
        np.testing.assert_array_equal(arrays[name], originals[name])


def test_check_gradients_catches_one_wrong_entry_and_reports_where(record_check):
    f, arrays, grads = _quadratic()
    grads["X"] = grads["X"].copy()
    grads["X"][2, 1] *= 1.01
    report = check_gradients(f, arrays, grads)
    record_check("gradcheck on closed-form functions", report.max_rel_error, wrong=True)
    assert not report.passed
    worst = report.worst()
    assert worst.name == "X" and worst.worst_index == (2, 1)
    assert worst.analytic_at_worst == pytest.approx(grads["X"][2, 1])
    assert worst.numerical_at_worst == pytest.approx(grads["X"][2, 1] / 1.01, rel=1e-8)
    assert worst.max_abs_error == pytest.approx(abs(grads["X"][2, 1]) * 0.01 / 1.01, rel=1e-6)
    y_row = next(row for row in report.rows if row.name == "y")
    assert y_row.rel_error <= DEFAULT_TOLERANCE  # the right array still passes


def test_check_gradients_catches_a_transposed_gradient():
    f, arrays, grads = _quadratic(shape=(3, 3))
    grads["X"] = grads["X"].T.copy()
    assert not check_gradients(f, arrays, grads).passed


def test_tolerance_is_respected():
    f, arrays, grads = _quadratic()
    grads["y"] = grads["y"] * (1 + 1e-4)  # rel. error ~5e-5
    assert not check_gradients(f, arrays, grads).passed
    assert check_gradients(f, arrays, grads, tolerance=1e-3).passed


def test_max_entries_samples_reproducibly():
    f, arrays, grads = _quadratic(shape=(10, 10))
    a = check_gradients(f, arrays, grads, max_entries=7, seed=3)
    b = check_gradients(f, arrays, grads, max_entries=7, seed=3)
    assert [row.entries for row in a.rows] == [7, 5]  # y has only 5 entries: all checked
    assert a.rows[0].worst_index == b.rows[0].worst_index
    assert a.rows[0].rel_error == b.rows[0].rel_error
    # Sampling finds a wrong entry only if it samples it; checking all entries always does.
    grads["X"] = grads["X"].copy()
    grads["X"][9, 9] = -grads["X"][9, 9]
    assert not check_gradients(f, arrays, grads).passed


def test_check_gradients_works_on_array_api_strict_arrays():
    strict = get_backend("array_api_strict", "float64")
    x = strict.asarray(np.array([[0.5, -1.0], [2.0, 0.25]]))

    def f():
        return float(strict.xp.sum(x * x * x))

    report = check_gradients(f, {"x": x}, {"x": 3 * strict.to_numpy(x) ** 2})
    assert report.passed, report.table()


def test_float32_arrays_are_refused():
    x = np.ones(3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"^weights: gradient checks need float64 arrays"):
        check_gradients(lambda: float(x.sum()), {"weights": x}, {"weights": np.ones(3)})
    with pytest.raises(ValueError, match=r"float64"):
        check_directional(lambda: float(x.sum()), {"weights": x}, {"weights": np.ones(3)})


def test_missing_or_misshapen_analytic_gradients():
    f, arrays, grads = _quadratic()
    with pytest.raises(ValueError, match=r"^analytic: missing gradient for 'y'"):
        check_gradients(f, arrays, {"X": grads["X"]})
    with pytest.raises(ValueError, match=r"^analytic\['X'\]: expected shape \(4, 3\)"):
        check_gradients(f, arrays, {"X": grads["X"].T, "y": grads["y"]})


def test_report_table_names_every_array_and_marks_failures():
    f, arrays, grads = _quadratic()
    grads["y"] = -grads["y"]
    report = check_gradients(f, arrays, grads, title="my check")
    table = report.table()
    assert str(report) == table
    lines = table.splitlines()
    assert lines[0].startswith("my check (tolerance 1e-06)")
    x_line = next(line for line in lines if line.startswith("X "))
    y_line = next(line for line in lines if line.startswith("y "))
    assert x_line.endswith("yes") and y_line.endswith("NO")
    assert "(4, 3)" in x_line and "(5,)" in y_line


def _vae_at_a_kink():
    """A freshly initialised VAE (biases exactly 0) whose second example switches off every
    unit of the decoder's first hidden layer: the next layer's pre-activation is then its
    bias, exactly 0, the kink of the ReLU after it."""
    from vae_np import VAE

    model = VAE(input_dim=5, hidden=(4, 3), latent_dim=2, dtype="float64")
    x = np.random.default_rng(0).uniform(size=(2, 5))
    eps = np.random.default_rng(1).standard_normal((1, 2, 2))
    return model, x, eps


def test_vae_report_table_names_every_parameter():
    model, x, eps = _vae_at_a_kink()
    state = model.state_dict()
    state["decoder.linear1.b"] = np.full(4, 0.05)  # off the kink
    model.load_state_dict(state)
    report = gradcheck.check_vae(model, x, eps, max_entries=3)
    table = report.table()
    for name in model.parameters.names:
        assert name in table
    assert "VAE (bernoulli, S=1, fast path)" in table and report.path == "fast"
    assert report.passed, table


def test_a_pre_activation_exactly_at_the_relu_kink_fails_the_check():
    """Not a wrong gradient but a point where there is none: ReLU'(0) is taken as 0, while
    the central difference sees (h - 0) / 2h, half the slope, for any h. The check reports
    it (in the bias of the layer before the kink), which is why the tests give biases
    random values before checking."""
    model, x, eps = _vae_at_a_kink()
    report = gradcheck.check_vae(model, x, eps, max_entries=None)
    assert [row.name for row in report.rows if row.rel_error > DEFAULT_TOLERANCE] \
        == ["decoder.linear1.b"]
    assert report.worst().analytic_at_worst == 0.0 and report.worst().numerical_at_worst != 0.0


# ------------------------------------------------------------------------------------------
# Directional check


def test_directional_check_passes_right_and_fails_wrong_gradients(record_check):
    f, arrays, grads = _quadratic()
    originals = {k: v.copy() for k, v in arrays.items()}
    right = check_directional(f, arrays, grads, seed=1)
    record_check("gradcheck on closed-form functions", right.rel_error)
    assert right.passed and right.rel_error < 1e-8
    # The directional derivative is <grad, r> for a unit r: check that number by hand.
    rng = np.random.default_rng(1)
    r = {k: rng.standard_normal(v.shape) for k, v in arrays.items()}
    norm = math.sqrt(sum(float(np.sum(v * v)) for v in r.values()))
    expected = sum(float(np.sum(grads[k] * r[k])) for k in arrays) / norm
    assert right.analytic == pytest.approx(expected, rel=1e-12)
    assert right.numerical == pytest.approx(expected, rel=1e-8)
    for name in arrays:
        np.testing.assert_array_equal(arrays[name], originals[name])

    wrong = dict(grads, y=grads["y"] * 1.05)
    result = check_directional(f, arrays, wrong, seed=1)
    record_check("gradcheck on closed-form functions", result.rel_error, wrong=True)
    assert not result.passed


def test_directional_check_on_strict_arrays_restores_them():
    strict = get_backend("array_api_strict", "float64")
    x = strict.asarray(np.array([0.5, -1.0, 2.0]))
    before = strict.to_numpy(x).copy()

    def f():
        return float(strict.xp.sum(strict.xp.exp(x)))

    result = check_directional(f, {"x": x}, {"x": np.exp(before)})
    assert result.passed
    np.testing.assert_array_equal(strict.to_numpy(x), before)


# ------------------------------------------------------------------------------------------
# check_loss wiring


def test_check_loss_needs_one_name_per_gradient():
    mu, logvar = np.zeros((2, 3)), np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"^wrt: kl_standard_normal returns 2 gradients"):
        check_loss(kl_standard_normal, {"mu": mu, "logvar": logvar}, wrt=("mu",))
