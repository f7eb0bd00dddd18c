"""vae_np.validation: the input checks, one helper per kind, and their use by the model.

Each check is tried with what it must accept (Python and NumPy scalars, returned as the
Python value) and with what it must refuse, the message naming the argument."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vae_np import VAE, get_backend
from vae_np.validation import (check_array, check_bool, check_choice, check_int, check_labels,
                               check_number, check_range, check_rng)


# ------------------------------------------------------------------------------------------
# Scalars


@pytest.mark.parametrize("value", [5, np.int64(5), np.int32(5), np.uint8(5)])
def test_check_int_accepts_python_and_numpy_integers_and_returns_a_python_int(value):
    got = check_int("k", value, 1)
    assert got == 5 and type(got) is int


@pytest.mark.parametrize("value", [0, -1, 2.0, 2.5, "3", True, np.bool_(True), None, [1]])
def test_check_int_refuses_non_integers_bools_and_values_below_the_minimum(value):
    with pytest.raises(ValueError, match=r"^k: expected an integer >= 1, got "):
        check_int("k", value, 1)


def test_check_int_minimum_zero_and_none():
    assert check_int("seed", 0, 0) == 0
    assert check_int("limit", None, 1, allow_none=True) is None
    with pytest.raises(ValueError, match=r"^limit: expected an integer >= 1 or None, got 0"):
        check_int("limit", 0, 1, allow_none=True)


@pytest.mark.parametrize("value, expected", [(2, 2.0), (np.float32(2), 2.0), (np.int64(5), 5.0),
                                             (0.25, 0.25), (np.float64(-3.5), -3.5)])
def test_check_number_accepts_real_scalars_and_returns_a_python_float(value, expected):
    got = check_number("x", value)
    assert got == expected and type(got) is float


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.float32("nan"), True,
                                   np.bool_(False), "1", None, 1j, np.ones(1)])
def test_check_number_refuses_non_finite_non_real_and_bool(value):
    with pytest.raises(ValueError, match=r"^x: expected a finite number, got "):
        check_number("x", value)


@pytest.mark.parametrize("kwargs, good, bad, text", [
    (dict(low=0.0), 0.0, -1e-9, ">= 0"),
    (dict(low=0.0, low_open=True), 1e-9, 0.0, "> 0"),
    (dict(high=1.0), 1.0, 1.5, "<= 1"),
    (dict(high=1.0, high_open=True), 0.999, 1.0, "< 1"),
    (dict(low=0.0, high=1.0, high_open=True), 0.0, 1.0, ">= 0 and < 1"),
])
def test_check_number_bounds_are_inclusive_unless_open(kwargs, good, bad, text):
    assert check_number("lr", good, **kwargs) == good
    with pytest.raises(ValueError, match=rf"^lr: expected a finite number {text}, got {bad!r}"):
        check_number("lr", bad, **kwargs)


def test_check_choice_and_check_bool():
    assert check_choice("mode", "b", ("a", "b")) == "b"
    assert type(check_choice("mode", np.str_("a"), ("a", "b"))) is str
    for bad in ("B", None, 1, ["a"]):
        with pytest.raises(ValueError, match=r"^mode: expected one of a, b, got "):
            check_choice("mode", bad, ("a", "b"))
    assert check_bool("flag", np.bool_(True)) is True and check_bool("flag", False) is False
    for bad in (0, 1, "True", None):
        with pytest.raises(ValueError, match=r"^flag: expected True or False, got "):
            check_bool("flag", bad)


# ------------------------------------------------------------------------------------------
# Arrays


def test_check_array_converts_host_floats_to_the_backend_dtype_and_checks_the_shape():
    backend = get_backend("numpy", "float32")
    x = check_array("x", np.zeros((3, 4), dtype=np.float64), backend, (None, 4))
    assert x.dtype == np.float32 and x.shape == (3, 4)
    for bad in (np.zeros((3, 5)), np.zeros((0, 4)), np.zeros(4), np.zeros((1, 3, 4))):
        with pytest.raises(ValueError, match=r"^x: expected shape \(N >= 1, 4\)"):
            check_array("x", bad, backend, (None, 4))
    with pytest.raises(TypeError, match=r"^x: expected a floating-point array, got dtype int64"):
        check_array("x", np.zeros((3, 4), dtype=np.int64), backend, (None, 4))
    with pytest.raises(TypeError, match=r"^x: expected an array, got list"):
        check_array("x", [[0.0] * 4], backend, (None, 4))
    with pytest.raises(ValueError, match=r"^x: contains NaN or inf"):
        check_array("x", np.full((2, 4), np.inf), backend, (None, 4))
    assert check_array("x", np.full((2, 4), np.inf), backend, (None, 4), check_finite=False) \
        .shape == (2, 4)


def test_check_array_refuses_an_array_of_another_backend():
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match=r"^eps: expected a NumPy array or an array of the "
                                         r"'numpy' backend, got array_api_strict"):
        check_array("eps", strict.zeros((2, 2)), get_backend("numpy"), (2, 2))


def test_check_range_reads_the_extremes():
    backend = get_backend("numpy", "float64")
    check_range("x", np.array([0.0, 1.0]), backend, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"^x: expected values in \[0, 1\], got values in "
                                         r"\[-0.5, 1\] \(why\)"):
        check_range("x", np.array([-0.5, 1.0]), backend, 0.0, 1.0, " (why)")


def test_check_labels_shape_dtype_and_range():
    backend = get_backend("numpy")
    np.testing.assert_array_equal(check_labels("y", np.array([0, 2]), 2, 3, backend), [0, 2])
    with pytest.raises(ValueError, match=r"^y: expected labels in 0\.\.2, got 0\.\.3"):
        check_labels("y", np.array([0, 3]), 2, 3, backend)
    with pytest.raises(ValueError, match=r"^y: expected \(2,\) integer labels, got shape \(3,\)"):
        check_labels("y", np.array([0, 1, 2]), 2, 3, backend)
    with pytest.raises(ValueError, match=r"^y: expected \(2,\) integer labels.*float64"):
        check_labels("y", np.array([0.0, 1.0]), 2, 3, backend)


def test_check_rng_wants_an_rng_of_the_same_backend_and_dtype():
    f32, f64 = get_backend("numpy", "float32"), get_backend("numpy", "float64")
    check_rng("rng", f32.rng(0), f32)
    with pytest.raises(TypeError, match=r"^rng: expected an RNG of the model's backend "
                                        r"\(numpy/float32\).*got numpy.random.*Generator"):
        check_rng("rng", np.random.default_rng(0), f32)
    with pytest.raises(TypeError, match=r"^rng: .*got an RNG of numpy/float64"):
        check_rng("rng", f64.rng(0), f32)


# ------------------------------------------------------------------------------------------
# The model uses them


def test_vae_accepts_numpy_scalars_and_stores_python_numbers():
    model = VAE(np.int64(6), (np.int32(5),), np.int64(2), beta=np.float32(0.5),
                samples=np.int64(2), input_shift=np.float32(0.5), seed=np.int64(3))
    for name in ("input_dim", "latent_dim", "samples"):
        assert type(getattr(model, name)) is int
    assert type(model.beta) is float and model.beta == 0.5
    assert all(type(w) is int for w in model.hidden)
    assert all(type(v) in (int, float, str, list, type(None)) for v in model.config.values())
    assert type(model.config["seed"]) is int
    # and the same weights as with Python numbers
    plain = VAE(6, (5,), 2, beta=0.5, samples=2, seed=3)
    np.testing.assert_array_equal(model.parameters.data, plain.parameters.data)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"latent_dim": np.bool_(True)}, r"^latent_dim: expected an integer >= 1"),
    ({"beta": np.float32("nan")}, r"^beta: expected a finite number >= 0"),
    ({"seed": np.int64(-1)}, r"^seed: expected an integer >= 0"),
    ({"num_classes": 0}, r"^num_classes: expected an integer >= 1 or None"),
])
def test_vae_refuses_bad_numpy_scalars_by_name(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        VAE(**{"input_dim": 6, "hidden": (5,), "latent_dim": 2, **kwargs})


def test_sample_and_log_likelihood_take_numpy_integers():
    model = VAE(6, (5,), 2)
    assert model.sample(np.int64(3), model.backend.rng(0)).shape == (3, 6)
    x = np.random.default_rng(0).random((4, 6))
    got = model.log_likelihood(x, np.int64(5), model.backend.rng(1), chunk_size=np.int32(2))
    want = model.log_likelihood(x, 5, model.backend.rng(1), chunk_size=2)
    np.testing.assert_array_equal(got, want)


def test_check_layers_fit_counts_weights_biases_and_copies(monkeypatch):
    """A 3 -> 4 -> 2 network holds (3 + 1) 4 + (4 + 1) 2 = 26 numbers, 4 copies of them
    (weights, gradients, two moments): 104 float32 numbers, 416 bytes, fit exactly in 416
    bytes and not in 415; the message names what was too large."""
    import vae_np.validation as validation

    monkeypatch.setattr(validation, "physical_memory", lambda: 416)
    validation.check_layers_fit("net", [(3, 4, 2)], 4)
    monkeypatch.setattr(validation, "physical_memory", lambda: 415)
    with pytest.raises(ValueError, match=r"^net: 104 numbers .* do not fit"):
        validation.check_layers_fit("net", [(3, 4, 2)], 4)
    with pytest.raises(ValueError, match=r"^two: 104 numbers"):  # two networks add up
        validation.check_layers_fit("two", [(3, 4), (4, 2)], 4)
    validation.check_layers_fit("net", [(3, 4, 2)], 4, copies=1)  # 104 bytes
    monkeypatch.setattr(validation, "physical_memory", lambda: None)  # the OS does not say
    validation.check_layers_fit("net", [(10 ** 9, 10 ** 9)], 8)
