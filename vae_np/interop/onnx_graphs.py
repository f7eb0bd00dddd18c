"""A VAE as two ONNX models, built with ``onnx.helper`` alone (no PyTorch, no tracing).

The encoder model (``<prefix>.encoder.onnx``):

    inputs   x (N, c)  [y (N, K): one-hot labels, conditional models only]
    nodes    Sub(x, input_shift) -> [Concat(., y)] -> the encoder's layers -> Split(d, d)
             (the conv encoder concatenates y at its first Linear instead, where
             ``networks.Sequential`` takes its side inputs)
    outputs  mu (N, d), logvar (N, d)

The decoder model (``<prefix>.decoder.onnx``):

    inputs   z (M, d)  [y (M, K)]
    nodes    [Concat(z, y)] -> the decoder's layers -> the distribution's parameters
    outputs  bernoulli: logits (M, c); gaussian: mean (M, c), logvar (M, c);
             gaussian-fixed: mean (M, c) (the fixed variance is in the metadata)

N and M are symbolic: any batch size. Tensors are float32 or float64, as the model.
Initializers carry vae_np's parameter names (``encoder.linear0.W``, (D_in, D_out)), so a
graph reads like ``VAE.state_dict()``; each model's metadata_props hold ``vae_np.part``
and ``vae_np.model_config`` (the JSON of ``VAE.config``). Opset 17, IR version 8: what
ONNX Runtime 1.14 and newer run.

Each layer kind maps to ONNX operators in ``LAYER_OPS`` (one function per kind: a new
architecture adds its layers there):

    Linear       MatMul(x, W) + Add(b)                   y = x W + b, as vae_np computes it
    ReLU         Relu
    LeakyReLU    LeakyRelu(alpha)          float32; in float64 Max(x, alpha x) with alpha a
                                           float64 constant (ONNX float attributes are 32-bit:
                                           0.01 would become 0.0099999998)
    Tanh         Tanh
    Sigmoid      Sigmoid
    Softplus     Softplus                  float32; in float64 Relu(x) + Log(1 + Exp(-|x|))
                                           (ONNX Runtime has no float64 Softplus; exact to an
                                           absolute 1e-16, as log1p would be)
    Conv2d       Conv(x, W, b)             pads, strides and kernel as the layer's; W is
                                           already ONNX's (C_out, C_in, kh, kw)
    MaxPool2d    MaxPool(k, stride k)
    Upsample     Resize(nearest)           coordinate_transformation_mode asymmetric,
                                           nearest_mode floor: output pixel i reads input
                                           pixel floor(i / f), as the layer does
    Unflatten    Reshape [-> Transpose -> Reshape]    the layer's (H, W, C) pixel order
    Flatten      [Reshape -> Transpose ->] Reshape    and groups, by (C, H, W) tracked
                                           through the image layers

A conv model exports in float32 only (ONNX Runtime has no float64 Conv: a float64 model is
a ValueError that says to export a float32 copy).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_write
from ..conv import Conv2d, Flatten, MaxPool2d, Unflatten, Upsample
from ..layers import LeakyReLU, Linear, ReLU, Sigmoid, Softplus, Tanh
from ..model import VAE
from .common import check_model, host_params, network_layers, require

__all__ = ["LAYER_OPS", "OPSET", "onnx_models", "onnx_paths", "write_onnx"]

OPSET = 17
IR_VERSION = 8


class _Graph:
    """Nodes and initializers of one graph under construction, in one dtype."""

    def __init__(self, onnx, dtype: np.dtype):
        self.onnx, self.dtype = onnx, np.dtype(dtype)
        self.nodes, self.initializers = [], []
        self.count = 0
        self.shape: tuple[int, int, int] | None = None  # (C, H, W) between image layers

    def constant(self, name: str, value, dtype=None) -> str:
        """An initializer: floats in the graph's dtype unless ``dtype`` says otherwise."""
        array = np.asarray(value, dtype=dtype or (self.dtype if np.asarray(value).dtype.kind
                                                  == "f" else np.asarray(value).dtype))
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | None = None,
             **attrs) -> str | list[str]:
        self.count += 1
        outs = outputs or [f"{op.lower()}_{self.count}"]
        self.nodes.append(self.onnx.helper.make_node(op, inputs, outs, name=f"{op}_{self.count}",
                                                     **attrs))
        return outs[0] if len(outs) == 1 else outs


def _linear(g: _Graph, layer, params, prefix: str, x: str) -> str:
    w = g.constant(f"{prefix}.W", params["W"])
    b = g.constant(f"{prefix}.b", params["b"])
    return g.node("Add", [g.node("MatMul", [x, w]), b])


def _leaky_relu(g: _Graph, layer, params, prefix: str, x: str) -> str:
    if g.dtype == np.float32:
        return g.node("LeakyRelu", [x], alpha=layer.slope)
    return g.node("Max", [x, g.node("Mul", [x, g.constant(f"{prefix}.alpha", layer.slope)])])


def _softplus(g: _Graph, layer, params, prefix: str, x: str) -> str:
    if g.dtype == np.float32:
        return g.node("Softplus", [x])
    # max(x, 0) + ln(1 + exp(-|x|)), as vae_np.ops.softplus
    tail = g.node("Exp", [g.node("Neg", [g.node("Abs", [x])])])
    one = g.constant(f"{prefix}.one", 1.0)
    return g.node("Add", [g.node("Relu", [x]), g.node("Log", [g.node("Add", [tail, one])])])


def _unary(op: str):
    return lambda g, layer, params, prefix, x: g.node(op, [x])


def _conv2d(g: _Graph, layer, params, prefix: str, x: str) -> str:
    (ph, pw), (sh, sw) = layer.padding, layer.stride
    c, h, w = g.shape
    g.shape = layer.output_shape(h, w)
    return g.node("Conv", [x, g.constant(f"{prefix}.W", params["W"]),
                           g.constant(f"{prefix}.b", params["b"])],
                  kernel_shape=list(layer.kernel_size), pads=[ph, pw, ph, pw], strides=[sh, sw])


def _maxpool2d(g: _Graph, layer, params, prefix: str, x: str) -> str:
    k = layer.kernel_size
    c, h, w = g.shape
    g.shape = (c, h // k, w // k)
    return g.node("MaxPool", [x], kernel_shape=[k, k], strides=[k, k])


def _upsample(g: _Graph, layer, params, prefix: str, x: str) -> str:
    f = layer.scale_factor
    c, h, w = g.shape
    g.shape = (c, h * f, w * f)
    # asymmetric + floor: output pixel i reads input pixel floor(i / f), exactly
    scales = g.constant(f"{prefix}.scales", [1.0, 1.0, float(f), float(f)], np.float32)
    return g.node("Resize", [x, "", scales], mode="nearest",
                  coordinate_transformation_mode="asymmetric", nearest_mode="floor")


def _reshape(g: _Graph, prefix: str, x: str, shape) -> str:
    return g.node("Reshape", [x, g.constant(prefix, np.array(shape, np.int64))])


def _unflatten(g: _Graph, layer, params, prefix: str, x: str) -> str:
    """conv._from_flat: (N, G C H W) -> (N, G C, H, W), pixel-major within each group
    when ``channels_last``."""
    gc, h, w = g.shape = layer.shape
    groups = layer.groups
    if layer.channels_last and gc != groups:
        x = _reshape(g, f"{prefix}.grouped", x, [0, groups, h, w, gc // groups])
        x = g.node("Transpose", [x], perm=[0, 1, 4, 2, 3])
    return _reshape(g, f"{prefix}.shape", x, [0, gc, h, w])


def _flatten(g: _Graph, layer, params, prefix: str, x: str) -> str:
    """conv._to_flat, the inverse of :func:`_unflatten`."""
    gc, h, w = g.shape
    groups = layer.groups
    if layer.channels_last and gc != groups:
        x = _reshape(g, f"{prefix}.grouped", x, [0, groups, gc // groups, h, w])
        x = g.node("Transpose", [x], perm=[0, 1, 3, 4, 2])
    g.shape = None
    return _reshape(g, f"{prefix}.shape", x, [0, -1])


#: Layer class -> function(graph, layer, host params, name prefix, input) -> output name.
LAYER_OPS = {Linear: _linear, ReLU: _unary("Relu"), LeakyReLU: _leaky_relu,
             Tanh: _unary("Tanh"), Sigmoid: _unary("Sigmoid"), Softplus: _softplus,
             Conv2d: _conv2d, MaxPool2d: _maxpool2d, Upsample: _upsample,
             Unflatten: _unflatten, Flatten: _flatten}


def _layers(g: _Graph, model: VAE, part: str, x: str, y: str | None = None) -> str:
    """The layers of ``part`` on ``x``; a network with side inputs (the conv encoder's
    labels, ``networks.Sequential.extra_at``) gets ``Concat(., y)`` before that layer."""
    net = getattr(model, part)
    names = getattr(net, "names", None)          # a Sequential's parameter names
    extra_at = getattr(net, "extra_at", None)
    linear = 0
    for i, layer in enumerate(network_layers(model, part)):
        emit = LAYER_OPS.get(type(layer))
        if emit is None:
            raise ValueError(f"model: {part} layer {type(layer).__name__} has no ONNX mapping "
                             f"(vae_np.interop.onnx_graphs.LAYER_OPS)")
        if i == extra_at:
            x = g.node("Concat", [x, y], axis=1)
        if names is not None:
            prefix = f"{part}.{names[i]}"
        else:
            prefix = f"{part}.linear{linear}" if type(layer) is Linear else f"{part}.act{linear}"
        x = emit(g, layer, host_params(model, layer), prefix, x)
        linear += type(layer) is Linear
    return x


def onnx_models(model: VAE):
    """(encoder, decoder): two checked ``onnx.ModelProto`` of ``model`` (module docstring)."""
    check_model(model)
    if model.architecture == "conv" and model.backend.dtype_name == "float64":
        raise ValueError("model: a float64 conv VAE: ONNX Runtime has no float64 Conv, so "
                         "its graphs would not run there; export a float32 copy (vae-np "
                         "export --dtype float32, or load_model(path, dtype='float32'))")
    onnx = require("onnx", "ONNX export")
    import onnx.numpy_helper  # noqa: F401  (a submodule the package does not import itself)

    dtype = model.backend.numpy_dtype
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    d, c, k = model.latent_dim, model.input_dim, model.num_classes

    def value(name, width, rows="N"):
        return onnx.helper.make_tensor_value_info(name, elem, [rows, width])

    enc = _Graph(onnx, dtype)
    h = enc.node("Sub", ["x", enc.constant("input_shift", model.input_shift)])
    inputs = [value("x", c)]
    side = getattr(model.encoder, "extra_features", 0)   # labels that skip the conv trunk
    if k:
        if not side:
            h = enc.node("Concat", [h, "y"], axis=1)
        inputs.append(value("y", k))
    h = _layers(enc, model, "encoder", h, "y" if side else None)
    enc.node("Split", [h, enc.constant("split_mu_logvar", np.array([d, d], np.int64))],
             outputs=["mu", "logvar"], axis=1)
    encoder = _model(onnx, enc, "encoder", inputs, [value("mu", d), value("logvar", d)], model)

    dec = _Graph(onnx, dtype)
    h, inputs = "z", [value("z", d, "M")]
    if k:
        h = dec.node("Concat", ["z", "y"], axis=1)
        inputs.append(value("y", k, "M"))
    h = _layers(dec, model, "decoder", h)
    kind = model.likelihood.name
    if kind == "gaussian":
        dec.node("Split", [h, dec.constant("split_mean_logvar", np.array([c, c], np.int64))],
                 outputs=["mean", "logvar"], axis=1)
        outputs = [value("mean", c, "M"), value("logvar", c, "M")]
    else:
        name = "logits" if kind == "bernoulli" else "mean"
        dec.node("Identity", [h], outputs=[name])
        outputs = [value(name, c, "M")]
    decoder = _model(onnx, dec, "decoder", inputs, outputs, model)
    return encoder, decoder


def _model(onnx, g: _Graph, part: str, inputs, outputs, vae: VAE):
    graph = onnx.helper.make_graph(g.nodes, f"vae_np_{part}", inputs, outputs, g.initializers)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="vae_np", ir_version=IR_VERSION,
                                   doc_string=f"vae_np VAE {part} ({vae.likelihood.name} "
                                              f"decoder); see vae_np.interop.onnx_graphs")
    onnx.helper.set_model_props(proto, {"vae_np.part": part,
                                        "vae_np.model_config": json.dumps(vae.config)})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def onnx_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """The two files for ``--out``: ``model.onnx`` or ``model`` -> ``model.encoder.onnx``
    and ``model.decoder.onnx``."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() == ".onnx" else out
    return (stem.with_name(stem.name + ".encoder.onnx"),
            stem.with_name(stem.name + ".decoder.onnx"))


def write_onnx(model: VAE, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write the encoder and decoder models (:func:`onnx_models`), each atomically; returns
    their paths (:func:`onnx_paths`)."""
    paths = onnx_paths(out)
    for proto, path in zip(onnx_models(model), paths):
        data = proto.SerializeToString()
        atomic_write(path, lambda fh, data=data: fh.write(data))
    return paths
