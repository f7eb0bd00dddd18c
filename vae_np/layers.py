"""Layers with hand-written backward passes, and the MLP built from them.

Every layer follows one contract (the CS231n forward/backward pair, kept on the object):

- ``forward(x)`` computes the output and keeps in ``self.cache`` what backward needs;
- ``backward(dout)`` takes dL/d(output), returns dL/d(input), and writes dL/d(param)
  into ``self.grads[name]`` for every parameter in ``self.params[name]``;
- ``layer(x)`` (``__call__``) is inference: the same output, and the cache of the last
  ``forward`` stays as it was, so an inference call between a training forward and its
  backward changes nothing.

A cache is read only by the backward of the layer that wrote it. The MLP's fast variant
(``MLP._forward_fused``, beside ``MLP.forward``) keeps its own cache in the MLP, and the
MLP's backward takes the variant that its forward took.

Gradients are *written* (``grads[k][...] = ...``), not rebound, because the model may
point ``params`` and ``grads`` at views of one flat buffer (see ``vae_np.parameters``).
Shapes: ``N`` is the batch size, ``D_in``/``D_out`` the feature sizes.
The derivations are in docs/03-layers.md, section "Linear" and the ones after it.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np

from .backend import Backend
from .ops import sigmoid, softplus
from .validation import check_int

INITIALISATIONS = ("he", "glorot")


class Layer:
    """Base class: a layer with no parameters unless it says otherwise."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.params: dict = {}
        self.grads: dict = {}
        self.cache = None

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError

    def __call__(self, x):
        """Inference: ``forward(x)`` without replacing the cache a training step keeps."""
        kept = self.cache
        try:
            return self.forward(x)
        finally:
            self.cache = kept

    def _cached(self):
        if self.cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return self.cache


class Linear(Layer):
    """y = x @ W + b.

    Shapes: x (N, D_in), W (D_in, D_out), b (D_out,), y (N, D_out).
    Backward: dx = dout @ W^T, dW = x^T @ dout, db = sum_n dout.
    """

    def __init__(self, in_features: int, out_features: int, backend: Backend,
                 rng: np.random.Generator, init: str = "he"):
        super().__init__(backend)
        in_features = check_int("in_features", in_features, 1)
        out_features = check_int("out_features", out_features, 1)
        if init not in INITIALISATIONS:
            raise ValueError(f"init: expected one of {INITIALISATIONS}, got {init!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        # He et al. (2015) keeps the activation variance through ReLUs: Var W = 2 / fan_in.
        # Glorot & Bengio (2010) balances forward and backward: Var W = 2 / (fan_in + fan_out).
        fan = in_features if init == "he" else (in_features + out_features) / 2.0
        std = math.sqrt(2.0 / fan) if init == "he" else math.sqrt(1.0 / fan)
        # Drawn on the host from a NumPy generator, so every backend starts from the same
        # weights for the same seed.
        weight = rng.standard_normal((in_features, out_features)) * std
        self.params = {"W": backend.asarray(weight), "b": backend.zeros((out_features,))}
        self.grads = {k: backend.zeros(v.shape) for k, v in self.params.items()}

    def forward(self, x):
        self.cache = x
        return x @ self.params["W"] + self.params["b"]

    def backward(self, dout, input_grad: bool = True):
        """``input_grad=False`` skips dx (returns None): a network's input needs none, and
        its dx is the largest matrix product of the first layer's backward."""
        x = self._cached()
        W = self.params["W"]
        self.grads["W"][...] = x.T @ dout
        self.grads["b"][...] = self.backend.xp.sum(dout, axis=0)
        return dout @ W.T if input_grad else None


class ReLU(Layer):
    """y = max(x, 0); dy/dx = 1 where x > 0, else 0 (the kink at 0 gets 0)."""

    def forward(self, x):
        xp = self.backend.xp
        out = xp.maximum(x, 0.0)
        self.cache = out
        return out

    def backward(self, dout):
        out = self._cached()
        return self.backend.xp.where(out > 0, dout, 0.0)


class LeakyReLU(Layer):
    """y = x for x > 0, slope * x otherwise; dy/dx = 1 or slope."""

    def __init__(self, backend: Backend, slope: float = 0.01):
        super().__init__(backend)
        if not 0.0 <= slope < 1.0:
            raise ValueError(f"slope: expected a number in [0, 1), got {slope!r}")
        self.slope = float(slope)

    def forward(self, x):
        positive = x > 0
        self.cache = positive
        return self.backend.xp.where(positive, x, self.slope * x)

    def backward(self, dout):
        positive = self._cached()
        return self.backend.xp.where(positive, dout, self.slope * dout)


class Tanh(Layer):
    """y = tanh(x); dy/dx = 1 - y^2 (written with the output, which forward keeps)."""

    def forward(self, x):
        out = self.backend.xp.tanh(x)
        self.cache = out
        return out

    def backward(self, dout):
        out = self._cached()
        return dout * (1.0 - out * out)


class Sigmoid(Layer):
    """y = 1 / (1 + exp(-x)); dy/dx = y (1 - y)."""

    def forward(self, x):
        out = sigmoid(self.backend.xp, x)
        self.cache = out
        return out

    def backward(self, dout):
        out = self._cached()
        return dout * out * (1.0 - out)


class Softplus(Layer):
    """y = ln(1 + exp(x)); dy/dx = sigmoid(x)."""

    def forward(self, x):
        self.cache = x
        return softplus(self.backend.xp, x)

    def backward(self, dout):
        x = self._cached()
        return dout * sigmoid(self.backend.xp, x)


ACTIVATIONS = {
    "relu": ReLU,
    "leaky_relu": LeakyReLU,
    "tanh": Tanh,
    "sigmoid": Sigmoid,
    "softplus": Softplus,
}


def make_activation(name: str, backend: Backend) -> Layer:
    """An activation layer by name (see ``ACTIVATIONS``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name](backend)


class MLP(Layer):
    """Linear layers with an activation between them (none after the last).

    ``sizes = (D_0, D_1, ..., D_L)`` gives L Linear layers D_{i-1} -> D_i. Hidden layers
    use He initialisation for ReLU-like activations and Glorot otherwise; the output layer
    uses Glorot. Backward runs the layers in reverse, each taking its successor's dx.
    Parameters are named ``linear{i}.W`` and ``linear{i}.b``.

    On a fast backend (``backend.fast``) a Linear followed by a ReLU runs fused (see
    ``_forward_fused``); other layers, and subclasses of Linear or ReLU, run their own
    ``forward``/``backward``. Either way the results are the reference's to the last bit.
    """

    def __init__(self, sizes: Sequence[int], backend: Backend, rng: np.random.Generator,
                 activation: str = "relu"):
        super().__init__(backend)
        sizes = tuple(sizes)
        if len(sizes) < 2:
            raise ValueError(f"sizes: expected at least an input and an output size, got {sizes!r}")
        if activation not in ACTIVATIONS:  # checked even when there is no hidden layer
            raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
        hidden_init = "he" if activation in ("relu", "leaky_relu") else "glorot"
        self.layers: list[Layer] = []
        self.linears: list[Linear] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            last = i == len(sizes) - 2
            linear = Linear(fan_in, fan_out, backend, rng, init="glorot" if last else hidden_init)
            self.linears.append(linear)
            self.layers.append(linear)
            if not last:
                self.layers.append(make_activation(activation, backend))
        self.sizes = sizes
        self.activation = activation

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Layer, str]]:
        """Yield ``(full name, owning layer, key)`` for every parameter, in order."""
        for i, linear in enumerate(self.linears):
            for key in linear.params:
                yield f"{prefix}linear{i}.{key}", linear, key

    def forward(self, x):
        """(N, D_0) -> (N, D_L). Keeps what :meth:`backward` needs: the layers' own caches
        (reference), or this MLP's record of the fused variant."""
        if self.backend.fast:
            out, self.cache = self._forward_fused(x, keep=True)
            return out
        for layer in self.layers:
            x = layer.forward(x)
        self.cache = _LAYER_CACHES
        return x

    def __call__(self, x):
        """Inference: the output of :meth:`forward`; no cache is touched."""
        if self.backend.fast:
            return self._forward_fused(x, keep=False)[0]
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, dout, input_grad: bool = True):
        """dL/d(input), or None with ``input_grad=False`` (the first Linear skips its dx)."""
        cache = self._cached()
        self.cache = None                   # one backward per forward
        if cache is not _LAYER_CACHES:
            return self._backward_fused(dout, cache, input_grad)
        for layer in reversed(self.layers[1:]):
            dout = layer.backward(dout)
        return self.layers[0].backward(dout, input_grad=input_grad)

    # ----------------------------------------------------------------------------------
    # The fast variant: the same operations with fewer passes over memory and no copies.
    # Each Linear's product lands in a fresh array, so its bias add and the ReLU after it
    # run in place on it (one compiled pass with numba, one kernel on CuPy); backward
    # writes dW and db straight into their views of the flat gradient buffer and applies
    # ReLU's mask in place on the fresh dx. Bit-identical to the layers' own code on
    # NumPy (tests/test_fast_paths.py).

    def _fused_relu_after(self, i: int) -> bool:
        """Layer i is exactly a Linear and layer i + 1 exactly a ReLU (a subclass may
        change the math, so it runs its own code)."""
        return (type(self.layers[i]) is Linear and i + 1 < len(self.layers)
                and type(self.layers[i + 1]) is ReLU)

    def _forward_fused(self, x, keep: bool):
        """(output, record): ``record[i]`` is what the fused backward of layer i reads (a
        Linear's input, a fused ReLU's output); other layers keep their own caches."""
        backend, nx = self.backend, self.backend.native
        record: list = [None] * len(self.layers)
        i = 0
        while i < len(self.layers):
            layer = self.layers[i]
            if type(layer) is not Linear:               # its own code, and its own cache
                x = layer.forward(x) if keep else layer(x)
                i += 1
                continue
            record[i] = x
            out = nx.matmul(x, layer.params["W"])            # fresh: ours to change in place
            if self._fused_relu_after(i):
                if backend.name == "cupy":
                    backend.cuda_kernel("bias_relu")(layer.params["b"], out)
                elif backend.numba is not None:
                    backend.numba.bias_relu(out, layer.params["b"])
                else:
                    out += layer.params["b"]
                    nx.maximum(out, 0.0, out=out)
                record[i + 1] = out
                i += 1
            else:
                out += layer.params["b"]
            x = out
            i += 1
        return x, (_FusedRecord(record) if keep else None)

    def _backward_fused(self, dout, record, input_grad: bool):
        """:meth:`backward` for a record of :meth:`_forward_fused`; ``dout`` is only read."""
        backend, nx = self.backend, self.backend.native
        bias_grad_done = False
        for k in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[k]
            if type(layer) is Linear:
                x = record[k]
                nx.matmul(x.T, dout, out=layer.grads["W"])
                if not bias_grad_done:
                    nx.sum(dout, axis=0, out=layer.grads["b"])
                bias_grad_done = False
                if k == 0 and not input_grad:
                    return None
                dout = nx.matmul(dout, layer.params["W"].T)   # fresh: ours to change in place
            elif k > 0 and self._fused_relu_after(k - 1):
                out = record[k]
                below = self.layers[k - 1]
                if backend.name == "cupy":
                    backend.cuda_kernel("relu_backward")(out, dout)
                elif backend.numba is not None and dout.shape[1] >= 2 and dout.flags.c_contiguous:
                    # the mask and the bias gradient of the Linear below in one pass
                    backend.numba.relu_backward_bias_grad(out, dout, below.grads["b"])
                    bias_grad_done = True
                elif backend.numba is not None:
                    backend.numba.relu_backward(out, dout)
                else:
                    # NumPy's where() allocates; multiplying by the mask instead would
                    # give -0.0 for negative dout and keep NaN where the reference has 0
                    dout = nx.where(out > 0, dout, 0.0)
            elif k == 0:                                  # a Linear subclass first
                return layer.backward(dout, input_grad=input_grad)
            else:
                dout = layer.backward(dout)
        return dout


class _FusedRecord(list):
    """What ``MLP._forward_fused`` keeps for ``MLP._backward_fused``: one entry per layer."""


# MLP.cache when the layers hold their own caches (the reference variant ran).
_LAYER_CACHES = "layer caches"
