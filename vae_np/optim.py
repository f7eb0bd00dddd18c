"""Optimizers over a model's flat parameter buffer: Adam and SGD with momentum.

Both update ``Parameters.data`` in place from ``Parameters.grad``, optionally after
clipping the gradient's global L2 norm. Derivations: docs/derivations.md, "Adam".
"""

from __future__ import annotations

import math

import numpy as np

from . import kernels
from .parameters import Parameters


def _check_number(name, value, low=None, high=None, low_open=False):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name}: expected a number {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value >= high:
        raise ValueError(f"{name}: expected a number < {high}, got {value!r}")


def clip_grad_norm(parameters: Parameters, max_norm: float):
    """Scale all gradients so their global L2 norm is at most ``max_norm``.

    The scale min(1, max_norm / norm) is computed on the device: no host round trip.
    Returns the norm before clipping as a 0-d backend array.
    """
    _check_number("max_norm", max_norm, low=0.0, low_open=True)
    xp = parameters.backend.xp
    grad = parameters.grad
    norm = xp.sqrt(xp.sum(grad * grad))
    grad *= xp.minimum(1.0, max_norm / (norm + 1e-12))
    return norm


class Optimizer:
    """Shared bookkeeping: hyperparameter checks, clipping, step count, state."""

    def __init__(self, parameters: Parameters, lr: float, clip_norm: float | None):
        if not isinstance(parameters, Parameters):
            raise TypeError(f"parameters: expected vae_np.parameters.Parameters (model.parameters),"
                            f" got {type(parameters).__name__}")
        _check_number("lr", lr, low=0.0, low_open=True)
        if clip_norm is not None:
            _check_number("clip_norm", clip_norm, low=0.0, low_open=True)
        self.parameters = parameters
        self.lr = float(lr)
        self.clip_norm = clip_norm
        self.t = 0

    def step(self) -> None:
        """One update from the gradients currently in ``parameters.grad``."""
        if self.clip_norm is not None:
            clip_grad_norm(self.parameters, self.clip_norm)
        self.t += 1
        self._update()

    def _update(self) -> None:
        raise NotImplementedError

    _buffers: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, np.ndarray]:
        """Step count and moment buffers as host arrays (checkpoint-ready)."""
        to_numpy = self.parameters.backend.to_numpy
        state = {"t": np.asarray(self.t, dtype=np.int64)}
        state.update({name: to_numpy(getattr(self, name)).copy() for name in self._buffers})
        return state

    def load_state_dict(self, state) -> None:
        for name in ("t", *self._buffers):
            if name not in state:
                raise ValueError(f"state: missing {name!r}")
        for name in self._buffers:
            buffer = getattr(self, name)
            if tuple(np.shape(state[name])) != tuple(buffer.shape):
                raise ValueError(f"state[{name!r}]: expected shape {tuple(buffer.shape)}, "
                                 f"got {np.shape(state[name])}")
        self.t = int(state["t"])
        for name in self._buffers:
            getattr(self, name)[...] = self.parameters.backend.asarray(state[name])


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015, Algorithm 1), with bias-corrected moments:

        m_t = beta1 m_{t-1} + (1 - beta1) g_t
        v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
        m_hat = m_t / (1 - beta1^t),   v_hat = v_t / (1 - beta2^t)
        theta_t = theta_{t-1} - lr m_hat / (sqrt(v_hat) + eps)
    """

    _buffers = ("m", "v")

    def __init__(self, parameters: Parameters, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 clip_norm: float | None = None):
        super().__init__(parameters, lr, clip_norm)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        _check_number("betas[0]", betas[0], low=0.0, high=1.0)
        _check_number("betas[1]", betas[1], low=0.0, high=1.0)
        _check_number("eps", eps, low=0.0, low_open=True)
        self.beta1, self.beta2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        backend = parameters.backend
        self.m = backend.zeros((parameters.size,))
        self.v = backend.zeros((parameters.size,))
        self._kernel_state: dict = {}   # the fast kernel's bookkeeping between steps

    def _update(self) -> None:
        # Fast path: the same operations fused into one pass over the flat buffers, without
        # temporaries (vae_np.kernels; bit-identical on NumPy, tests/test_fast_paths.py).
        # It declines where it has no kernel (array_api_strict) and the reference runs.
        params = self.parameters
        if not kernels.adam_update(params.backend, params.data, params.grad, self.m, self.v,
                                   self.lr, self.beta1, self.beta2, self.eps, self.t,
                                   state=self._kernel_state):
            self._update_reference()

    def _update_reference(self) -> None:
        """Algorithm 1 as written above, one array expression per line."""
        xp = self.parameters.backend.xp
        g = self.parameters.grad
        self.m[...] = self.beta1 * self.m + (1.0 - self.beta1) * g
        self.v[...] = self.beta2 * self.v + (1.0 - self.beta2) * (g * g)
        m_hat = self.m / (1.0 - self.beta1 ** self.t)
        v_hat = self.v / (1.0 - self.beta2 ** self.t)
        self.parameters.data[...] = self.parameters.data - self.lr * m_hat / (xp.sqrt(v_hat) + self.eps)


class SGD(Optimizer):
    """Stochastic gradient descent with (heavy-ball) momentum:

        b_t = momentum b_{t-1} + g_t,   theta_t = theta_{t-1} - lr b_t

    (momentum = 0 is plain SGD; the same convention as PyTorch's SGD.)
    """

    _buffers = ("velocity",)

    def __init__(self, parameters: Parameters, lr: float = 1e-2, momentum: float = 0.0,
                 clip_norm: float | None = None):
        super().__init__(parameters, lr, clip_norm)
        _check_number("momentum", momentum, low=0.0, high=1.0)
        self.momentum = float(momentum)
        self.velocity = parameters.backend.zeros((parameters.size,))

    def _update(self) -> None:
        self.velocity[...] = self.momentum * self.velocity + self.parameters.grad
        self.parameters.data[...] = self.parameters.data - self.lr * self.velocity


OPTIMIZERS = {"adam": Adam, "sgd": SGD}
