"""Optimizers over a model's flat parameter buffer: Adam and SGD with momentum.

Both update ``Parameters.data`` in place from ``Parameters.grad``, optionally after
clipping the gradient's global L2 norm. Derivations: docs/06-adam.md, "Adam".
"""

from __future__ import annotations

import math

import numpy as np

from .backend import fast_twin, namespace_of
from .parameters import Parameters, as_finite_host_array
from .validation import check_number as _check_number


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
        """Restore :meth:`state_dict`'s output. Everything is checked before anything
        changes: ``t`` an integer >= 0, each buffer of the right shape and finite in the
        parameters' dtype (and ``v``, Adam's second moment, never negative)."""
        for name in ("t", *self._buffers):
            if name not in state:
                raise ValueError(f"state: missing {name!r}")
        t = np.asarray(state["t"])
        if t.shape != () or not (np.issubdtype(t.dtype, np.integer)
                                 or (np.issubdtype(t.dtype, np.floating) and np.isfinite(t)
                                     and float(t) == int(t))) or int(t) < 0:
            raise ValueError(f"state['t']: expected the step count, an integer >= 0, got "
                             f"{state['t']!r}")
        buffers = {}
        for name in self._buffers:
            buffer = getattr(self, name)
            buffers[name] = as_finite_host_array(state[name], f"state[{name!r}]", buffer.shape,
                                                 self.parameters.backend.numpy_dtype)
            if name in self._nonnegative_buffers and np.any(buffers[name] < 0):
                raise ValueError(f"state[{name!r}]: a second moment cannot be negative")
        self.t = int(t)
        for name, value in buffers.items():
            getattr(self, name)[...] = self.parameters.backend.asarray(value)

    _nonnegative_buffers: tuple[str, ...] = ()


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015, Algorithm 1), with bias-corrected moments:

        m_t = beta1 m_{t-1} + (1 - beta1) g_t
        v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
        m_t = 0 where |m_t| < tiny / min(lr / (1 - beta1^t), 1),  v_t = 0 where v_t < tiny
        m_hat = m_t / (1 - beta1^t),   v_hat = v_t / (1 - beta2^t)
        theta_t = theta_{t-1} - lr m_hat / (sqrt(v_hat) + eps)

    computed as theta_t = theta_{t-1} - [lr / (1 - beta1^t)] m_t /
    (sqrt(v_t) [1 / sqrt(1 - beta2^t)] + eps), the bracketed factors scalars: the same
    algorithm (eps where Algorithm 1 puts it), one division per parameter instead of three.

    The third line is ours, not the paper's (tiny: the dtype's smallest normal number,
    2^-126 in float32). A weight whose gradient is exactly 0 step after step (a ReLU unit
    that no example activates, a pixel that is always 0) has its first moment multiplied
    by beta1 each step. Arithmetic whose operand or result is subnormal (below tiny) takes
    a microcode assist of about a hundred cycles on x86. Without the flush the moment
    would reach the subnormal range after some 700 float32 steps and stay there, and
    every later step would pay several times over (benchmarks/README.md measures it).
    The threshold is tiny / step_size rather than tiny because the update computes
    step_size m: with lr = 1e-3 that product is subnormal for |m| below 1000 tiny, for the
    roughly 65 steps a decaying moment takes to cross that range. In a real run, weights
    die all the time, so some are always crossing it (26,000 of 1.4 million parameters
    after 1,200 steps on MNIST, which made the update 2.5 times slower). Flushing changes
    each affected update by less than step_size (tiny / step_size) / eps = 2^-126 / eps
    (about 1e-30 with the defaults), whatever the learning rate. That is far below a
    float32 parameter's last place, so training is unchanged. The flush is part of the
    algorithm on every path and backend, reference included, so all paths give the same
    bits.
    """

    _buffers = ("m", "v")
    _nonnegative_buffers = ("v",)

    def __init__(self, parameters: Parameters, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 clip_norm: float | None = None):
        super().__init__(parameters, lr, clip_norm)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        _check_number("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
        _check_number("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
        _check_number("eps", eps, low=0.0, low_open=True)
        self.beta1, self.beta2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        self.m = parameters.backend.zeros((parameters.size,))
        self.v = parameters.backend.zeros((parameters.size,))

    def _update(self) -> None:
        adam_update(self.parameters.data, self.parameters.grad, self.m, self.v, self.t,
                    self.lr, self.beta1, self.beta2, self.eps)


@fast_twin
def adam_update(p, g, m, v, t: int, lr: float, beta1: float, beta2: float, eps: float):
    """Step t >= 1 of Adam (:class:`Adam`'s Algorithm 1, one array expression per line),
    in place on the flat buffers p (parameters), m and v (moments) from the gradient g,
    all (P,) of one float dtype. (Its twins make one pass without temporaries; the
    reference makes some sixteen and five.)"""
    xp = namespace_of(p)
    tiny = xp.finfo(p.dtype).smallest_normal
    # The bias corrections as two scalars: lr m_hat = step_size m and
    # sqrt(v_hat) = sqrt(v) / sqrt(1 - beta2^t), so the pass over the buffers divides once
    # where m / (1 - beta1^t), v / (1 - beta2^t) and the update would divide three times.
    step_size = lr / (1.0 - beta1 ** t)
    inv_sqrt_correction2 = 1.0 / math.sqrt(1.0 - beta2 ** t)
    m[...] = beta1 * m + (1.0 - beta1) * g
    v[...] = beta2 * v + (1.0 - beta2) * (g * g)
    # The flush (see Adam): m where step_size m would be subnormal, v below the smallest normal.
    m[...] = xp.where(xp.abs(m) < float(tiny) / min(step_size, 1.0), 0.0, m)
    v[...] = xp.where(v < tiny, 0.0, v)
    p[...] = p - step_size * m / (xp.sqrt(v) * inv_sqrt_correction2 + eps)


class SGD(Optimizer):
    """Stochastic gradient descent with (heavy-ball) momentum:

        b_t = momentum b_{t-1} + g_t,   theta_t = theta_{t-1} - lr b_t

    (momentum = 0 is plain SGD; the same convention as PyTorch's SGD.)
    """

    _buffers = ("velocity",)

    def __init__(self, parameters: Parameters, lr: float = 1e-2, momentum: float = 0.0,
                 clip_norm: float | None = None):
        super().__init__(parameters, lr, clip_norm)
        _check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
        self.momentum = float(momentum)
        self.velocity = parameters.backend.zeros((parameters.size,))

    def _update(self) -> None:
        self.velocity[...] = self.momentum * self.velocity + self.parameters.grad
        self.parameters.data[...] = self.parameters.data - self.lr * self.velocity


OPTIMIZERS = {"adam": Adam, "sgd": SGD}
