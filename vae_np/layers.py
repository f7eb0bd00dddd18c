"""Layers with hand-written backward passes, and the MLP built from them.

Every layer follows one contract (the CS231n forward/backward pair, kept on the object):

- ``forward(x)`` computes the output and keeps in ``self.cache`` what backward needs;
- ``backward(dout)`` takes dL/d(output), returns dL/d(input), and writes dL/d(param)
  into ``self.grads[name]`` for every parameter in ``self.params[name]``;
- ``layer(x)`` (``__call__``) is inference: the same output, and the cache of the last
  ``forward`` stays as it was, so an inference call between a training forward and its
  backward changes nothing.

A cache is read only by the backward of the layer that wrote it. Where a Linear is followed
by a ReLU, the MLP runs the two forwards as one op (:func:`linear_relu_forward`) and writes
both layers' caches, so every backward is the layer's own.

Gradients are *written* (``grads[k][...] = ...``), not rebound, because the model may
point ``params`` and ``grads`` at views of one flat buffer (see ``vae_np.parameters``).
Shapes: ``N`` is the batch size, ``D_in``/``D_out`` the feature sizes.
The derivations are in docs/03-layers.md, section "Linear" and the ones after it.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np

from .backend import Backend, backend_of, fast_twin, namespace_of
from .ops import sigmoid, softplus
from .validation import check_int

INITIALISATIONS = ("he", "glorot")


# ------------------------------------------------------------------------------------------
# The ops on arrays the layers are made of (each with its fast twins, backend.fast_twin)


@fast_twin
def linear_relu_forward(x, W, b):
    """max(x @ W + b, 0): a Linear and the ReLU after it. x (N, D_in), W (D_in, D_out),
    b (D_out,) -> (N, D_out). (Its twins add the bias and clip in one pass over the
    product.)"""
    return namespace_of(x).maximum(x @ W + b, 0.0)


@fast_twin
def relu_backward(out, dout):
    """dL/dx of y = max(x, 0) from its output ``out`` and dL/dy ``dout``, both (N, D) or
    images (N, C, H, W): dout where out > 0, else 0 (the kink at 0 gets 0; out > 0
    exactly where x > 0)."""
    return namespace_of(out).where(out > 0, dout, 0.0)


@fast_twin
def relu_backward_and_bias_grad(out, dout):
    """The backward of a ReLU and the bias gradient of the Linear before it, for
    out = max(x @ W + b, 0) and dout = dL/d(out), both (N, D): (dpre, db) with
    dpre = dL/d(x @ W + b) = relu_backward(out, dout), (N, D), and db = sum_n dpre, (D,).
    (Its compiled twin masks and sums in one pass over dout.)"""
    dpre = relu_backward(out, dout)
    return dpre, namespace_of(dpre).sum(dpre, axis=0)


@fast_twin
def matmul(a, b):
    """a @ b for a (M, K) and b (K, N) -> (M, N). (Its CPU twin runs the product through
    the BLAS that VAE_NP_BLAS chooses: NumPy's by default, the same call as here.)"""
    return a @ b


@fast_twin
def matmul_into(out, a, b):
    """out[...] = a @ b for a (M, K), b (K, N) and out (M, N) (a gradient's view of the
    flat buffer, ``vae_np.parameters``); returns out. (Its twins write the product
    straight into out, without a temporary and a copy.)"""
    out[...] = a @ b
    return out


#: Rows (batch size N) under which a float32 Linear's input gradient on NumPy is computed
#: as (W dout^T)^T: OpenBLAS's sgemm runs that orientation up to twice as fast when N is
#: short, and the whole float32 step about 5 % faster at N = 20-48; its dgemm does not,
#: and the float64 step was 4-11 % slower that way (an AMD EPYC, benchmarks/README.md,
#: "The input gradient of a short batch").
SHORT_BATCH = 64


def linear_input_grad(dout, W):
    """dL/dx = dout @ W^T of y = x @ W + b: dout (N, D_out), W (D_in, D_out) -> a fresh
    C-ordered (N, D_in).

    For NumPy arrays, both float32, under :data:`SHORT_BATCH` rows, it is the transpose of
    the product W @ dout^T (D_in, N), copied into row order (the copy is exact): the same
    sums of products, with their rounding from the BLAS kernel that orientation selects,
    so the last bits can differ from dout @ W^T's. Both the reference and the fast paths
    take this function, so they keep the same bits. (The rule is a measurement of
    OpenBLAS; CuPy's cuBLAS, unmeasured, keeps dout @ W^T.)"""
    if (backend_of(dout).name != "numpy" or dout.shape[0] >= SHORT_BATCH
            or not dout.dtype == W.dtype == np.float32):
        return matmul(dout, W.T)
    dx = np.empty((dout.shape[0], W.shape[0]), dtype=dout.dtype)
    dx[...] = matmul(W, dout.T).T
    return dx


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
        y = matmul(x, self.params["W"])
        y += self.params["b"]           # in place on the fresh product: one array, not two
        return y

    def backward(self, dout, input_grad: bool = True, bias_grad=None):
        """``input_grad=False`` skips dx (returns None): a network's input needs none, and
        its dx is the largest matrix product of the first layer's backward. ``bias_grad``:
        sum_n dout (D_out,) when the caller has it already (the MLP's ReLU backward sums
        it in the same pass as its mask, :func:`relu_backward_and_bias_grad`)."""
        x = self._cached()
        W = self.params["W"]
        if getattr(dout, "shape", None) != (x.shape[0], self.out_features):
            raise ValueError(f"dout: expected shape ({x.shape[0]}, {self.out_features}) (the "
                             "forward's batch, out_features), got "
                             f"{type(dout).__name__} of shape {getattr(dout, 'shape', None)}")
        matmul_into(self.grads["W"], x.T, dout)                 # dW = x^T dout
        if bias_grad is None:
            bias_grad = self.backend.xp.sum(dout, axis=0)       # db = sum_n dout
        elif getattr(bias_grad, "shape", None) != (self.out_features,):  # no broadcasting
            raise ValueError(f"bias_grad: expected an array of shape ({self.out_features},), "
                             f"got {type(bias_grad).__name__} of shape "
                             f"{getattr(bias_grad, 'shape', None)}")
        self.grads["b"][...] = bias_grad
        return linear_input_grad(dout, W) if input_grad else None   # dx = dout W^T


class ReLU(Layer):
    """y = max(x, 0); dy/dx = 1 where x > 0, else 0 (the kink at 0 gets 0)."""

    def forward(self, x):
        xp = self.backend.xp
        out = xp.maximum(x, 0.0)
        self.cache = out
        return out

    def backward(self, dout):
        return relu_backward(self._cached(), dout)


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


# ------------------------------------------------------------------------------------------
# Pairs of layers that run as one op. The networks (MLP, networks.Sequential) look a layer
# and the one after it up here by their exact classes (a subclass runs its own code).

#: (first class, second class) -> ``fused(first, second, x, keep)``: the pair's forward as
#: one op; with ``keep`` it leaves the caches the two layers' forwards would, so every
#: backward reads its own layer's cache. vae_np.conv adds (Conv2d, ReLU).
FUSED_FORWARDS: dict = {}
#: (first class, second class) -> ``fused(first, second, dout, input_grad)``: the pair's
#: backward (dL/d(first's input), or None), writing both layers' gradients. vae_np.conv
#: adds (ReLU, MaxPool2d) and (Upsample, Conv2d).
FUSED_BACKWARDS: dict = {}


def fused_forward(first, second):
    """The one-op forward of layer ``first`` followed by ``second``, or None."""
    return FUSED_FORWARDS.get((type(first), type(second)))


def fused_backward(first, second):
    """The one-op backward of layer ``first`` followed by ``second``, or None."""
    return FUSED_BACKWARDS.get((type(first), type(second)))


def _linear_relu_forward(linear, relu, x, keep):
    out = linear_relu_forward(x, linear.params["W"], linear.params["b"])
    if keep:
        linear.cache, relu.cache = x, out
    return out


def _linear_relu_backward(linear, relu, dout, input_grad):
    """The ReLU's mask and the Linear's bias gradient in one pass, then the Linear."""
    dpre, db = relu_backward_and_bias_grad(relu.cache, dout)
    return linear.backward(dpre, input_grad=input_grad, bias_grad=db)


FUSED_FORWARDS[(Linear, ReLU)] = _linear_relu_forward
FUSED_BACKWARDS[(Linear, ReLU)] = _linear_relu_backward


class MLP(Layer):
    """Linear layers with an activation between them (none after the last).

    ``sizes = (D_0, D_1, ..., D_L)`` gives L Linear layers D_{i-1} -> D_i. Hidden layers
    use He initialisation for ReLU-like activations and Glorot otherwise; the output layer
    uses Glorot. Backward runs the layers in reverse, each taking its successor's dx.
    Parameters are named ``linear{i}.W`` and ``linear{i}.b``.

    A Linear followed by a ReLU runs as one op each way (:data:`FUSED_FORWARDS`,
    :func:`linear_relu_forward`), which keeps the two layers' caches as their own forwards
    would (a subclass of Linear or ReLU runs its own code). The MLP keeps ``cache`` only
    to allow one backward per forward.
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
        """(N, D_0) -> (N, D_L): the layers in turn, each keeping what its backward reads."""
        self.cache = None
        x = self._run(x, keep=True)
        self.cache = _FORWARD_DONE
        return x

    def __call__(self, x):
        """Inference: the output of :meth:`forward`; no cache is touched."""
        return self._run(x, keep=False)

    def _run(self, x, keep: bool):
        """The layers in turn, writing their caches (``keep``, as ``forward``) or not
        (inference). A pair in :data:`FUSED_FORWARDS` (a Linear and the ReLU right after
        it) is one op, which leaves the caches the two forwards would."""
        layers, i = self.layers, 0
        while i < len(layers):
            fused = fused_forward(layers[i], layers[i + 1]) if i + 1 < len(layers) else None
            if fused is not None:
                x, i = fused(layers[i], layers[i + 1], x, keep), i + 2
            else:
                x, i = (layers[i].forward(x) if keep else layers[i](x)), i + 1
        return x

    def backward(self, dout, input_grad: bool = True):
        """dL/d(input), or None with ``input_grad=False`` (the first Linear skips its dx)."""
        self._cached()
        self.cache = None                   # one backward per forward
        layers, i = self.layers, len(self.layers) - 1
        while i > 0:
            fused = fused_backward(layers[i - 1], layers[i])
            if fused is not None:
                dout = fused(layers[i - 1], layers[i], dout, input_grad or i > 1)
                i -= 2
            else:
                dout, i = layers[i].backward(dout), i - 1
        return layers[0].backward(dout, input_grad=input_grad) if i == 0 else dout


# MLP.cache after a forward (the layers hold the caches themselves).
_FORWARD_DONE = "forward done"
