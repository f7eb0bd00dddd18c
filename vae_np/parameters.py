"""All of a model's parameters and gradients in two flat buffers.

Layers keep ``params[k]`` and ``grads[k]`` as *views* into ``Parameters.data`` and
``Parameters.grad``. The optimizer then updates one contiguous vector instead of looping
over a dozen arrays, and checkpoints, gradient norms and gradient checks see one array.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from .backend import Backend


class Parameters:
    """Named parameters backed by flat ``data`` and ``grad`` buffers of length ``size``.

    Args:
        backend: where the buffers live.
        entries: ``(name, layer, key)`` triples; ``layer.params[key]`` holds the initial
            value. Each layer's ``params[key]``/``grads[key]`` are rebound to views.
    """

    def __init__(self, backend: Backend, entries: Iterable[tuple[str, object, str]]):
        self.backend = backend
        xp = backend.xp
        entries = list(entries)
        names = [name for name, _, _ in entries]
        if len(set(names)) != len(names):
            raise ValueError(f"entries: parameter names must be unique, got {names}")
        self.shapes = {name: tuple(layer.params[key].shape) for name, layer, key in entries}
        self.offsets = {}
        offset = 0
        for name in names:
            self.offsets[name] = offset
            offset += math.prod(self.shapes[name])
        self.size = offset
        self.data = xp.zeros((self.size,), dtype=backend.dtype)
        self.grad = xp.zeros((self.size,), dtype=backend.dtype)
        self.values: dict = {}
        self.grads: dict = {}
        for name, layer, key in entries:
            self.values[name] = self._view(self.data, name)
            self.grads[name] = self._view(self.grad, name)
            self.values[name][...] = layer.params[key]
            layer.params[key] = self.values[name]
            layer.grads[key] = self.grads[name]

    def _view(self, flat, name):
        start = self.offsets[name]
        shape = self.shapes[name]
        return self.backend.xp.reshape(flat[start:start + math.prod(shape)], shape)

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def zero_grad(self) -> None:
        self.grad[...] = 0.0

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of every parameter, by name."""
        return {name: self.backend.to_numpy(v).copy() for name, v in self.values.items()}

    def load_state_dict(self, arrays: dict) -> None:
        """Copy host arrays into the parameters; names and shapes must match exactly."""
        missing = sorted(set(self.shapes) - set(arrays))
        unexpected = sorted(set(arrays) - set(self.shapes))
        if missing or unexpected:
            raise ValueError(f"arrays: parameter names differ (missing {missing}, "
                             f"unexpected {unexpected})")
        # Every array is checked, in the model's dtype (1e300 is finite in float64 and inf
        # in float32), before any is copied: a bad file changes nothing.
        converted = {name: as_finite_host_array(arrays[name], f"arrays[{name!r}]", shape,
                                                self.backend.numpy_dtype)
                     for name, shape in self.shapes.items()}
        for name, value in converted.items():
            self.values[name][...] = self.backend.asarray(value)


def as_finite_host_array(value, name: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """``value`` (host data) as a NumPy array of ``dtype`` after checking its shape, that
    it is floating point, and that it is finite *after* the cast."""
    value = np.asarray(value)
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {value.shape}")
    if not np.issubdtype(value.dtype, np.floating):
        raise TypeError(f"{name}: expected a floating dtype, got {value.dtype}")
    with np.errstate(over="ignore"):
        cast = value.astype(dtype)
    if not np.all(np.isfinite(cast)):
        what = "contains NaN or inf" if not np.all(np.isfinite(value)) else \
            f"holds values too large for {np.dtype(dtype).name} (they become inf)"
        raise ValueError(f"{name}: {what}")
    return cast
