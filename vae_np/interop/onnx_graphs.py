"""A VAE as two ONNX models, built with ``onnx.helper`` alone (no PyTorch, no tracing).

The encoder model (``<prefix>.encoder.onnx``):

    inputs   x (N, c)  [y (N, K): one-hot labels, conditional models only]
    nodes    Sub(x, input_shift) -> [Concat(., y)] -> the encoder's layers -> Split(d, d)
    outputs  mu (N, d), logvar (N, d)

The decoder model (``<prefix>.decoder.onnx``):

    inputs   z (M, d)  [y (M, K)]
    nodes    [Concat(z, y)] -> the decoder's layers -> the distribution's parameters
    outputs  bernoulli: logits (M, c); gaussian: mean (M, c), logvar (M, c);
             gaussian-fixed: mean (M, c) (the fixed variance is in the metadata)

N and M are symbolic: any batch size. Tensors are float32 or float64, as the model; x and
the decoder's outputs are flat, c values per example (images in the data's (H, W, C)
order: the convolutional networks' Unflatten / Flatten do the layout in the graph).

Any network of mapped layers exports: the MLP, and ``vae_np.networks.Sequential`` (the
convolutional networks), whose side input (a conditional model's labels, E =
``extra_features``) joins by Concat before layer ``extra_at`` instead (the conv encoder's
first Linear); an MLP, and a Sequential without side inputs (the conv decoder), take y
appended to their input, as ``VAE`` gives it. :func:`network_model` exports one network
alone. Initializers carry vae_np's parameter names (``encoder.linear0.W``, (D_in, D_out);
``encoder.conv2d0.W``, (O, C, kh, kw)), so a graph reads like ``VAE.state_dict()``; each
model's metadata_props hold ``vae_np.part`` and ``vae_np.model_config`` (the JSON of
``VAE.config``). Opset 17, IR version 8: what ONNX Runtime 1.14 and newer run.

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
    Conv2d       Conv(W (O, C, kh, kw), b; pads, strides, group 1): vae_np's layout and
                 cross-correlation are ONNX's. float64 (ONNX Runtime's CPU provider, 1.32,
                 has no float64 Conv):
                 im2col, conv2d_forward's formula as one product: Pad, Transpose to (N, H,
                 W, C), a strided Slice per kernel offset (i, j), Concat -> (N, Ho, Wo, kh kw
                 C), MatMul with W transposed to (kh, kw, C, O) and reshaped, Add(b),
                 Transpose back. The same sums, in another order
    MaxPool2d    MaxPool(kernel = stride = k)
    Upsample     Resize(nearest, asymmetric, floor; scales 1, 1, f, f): x[floor(p / f)],
                 exactly vae_np's copy. float64 (no float64 Resize): Reshape to (N, C, H, 1,
                 W, 1), Expand to (N, C, H, f, W, f), Reshape: the same copy
    Flatten      Reshape (N, C H W); channels_last: Reshape (N, G, C/G, H, W), Transpose to
                 (N, G, H, W, C/G), Reshape: each group in the data's (H, W, C) order
    Unflatten    the inverse: Reshape (N, G, H, W, C/G), Transpose, Reshape (N, C, H, W)
    Sequential   its layers, in place (a nested network, without side inputs)
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
from ..networks import Sequential
from .common import check_model, host_params, require

__all__ = ["LAYER_OPS", "OPSET", "network_model", "onnx_models", "onnx_paths", "write_onnx"]

OPSET = 17
IR_VERSION = 8


class _Graph:
    """Nodes and initializers of one graph under construction, in one dtype."""

    def __init__(self, onnx, dtype: np.dtype):
        self.onnx, self.dtype = onnx, np.dtype(dtype)
        self.nodes, self.initializers = [], []
        self.count = 0

    def constant(self, name: str, value, dtype=None) -> str:
        """An initializer: floats in the graph's dtype unless ``dtype`` says otherwise."""
        value = np.asarray(value)
        array = np.asarray(value, dtype=dtype or (self.dtype if value.dtype.kind == "f"
                                                  else value.dtype))
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def ints(self, prefix: str, values) -> str:
        """An int64 initializer (a shape, pads, slice bounds), named after ``prefix``."""
        self.count += 1
        return self.constant(f"{prefix}.ints{self.count}", np.array(values, np.int64))

    def node(self, op: str, inputs: list[str], outputs: list[str] | None = None,
             **attrs) -> str | list[str]:
        self.count += 1
        outs = outputs or [f"{op.lower()}_{self.count}"]
        self.nodes.append(self.onnx.helper.make_node(op, inputs, outs, name=f"{op}_{self.count}",
                                                     **attrs))
        return outs[0] if len(outs) == 1 else outs


# Each function: (graph, layer, host params, name prefix, input name, input shape per
# example, without N) -> (output name, output shape per example).

def _expect(shape, want, prefix: str):
    if tuple(shape) != tuple(want):
        raise ValueError(f"network: {prefix} expects inputs of shape (N, "
                         f"{', '.join(map(str, want))}), the layer before gives (N, "
                         f"{', '.join(map(str, shape))})")


def _linear(g: _Graph, layer, params, prefix: str, x: str, shape):
    _expect(shape, params["W"].shape[:1], prefix)
    w = g.constant(f"{prefix}.W", params["W"])
    b = g.constant(f"{prefix}.b", params["b"])
    return g.node("Add", [g.node("MatMul", [x, w]), b]), params["W"].shape[1:]


def _leaky_relu(g: _Graph, layer, params, prefix: str, x: str, shape):
    if g.dtype == np.float32:
        return g.node("LeakyRelu", [x], alpha=layer.slope), shape
    alpha = g.constant(f"{prefix}.alpha", layer.slope)
    return g.node("Max", [x, g.node("Mul", [x, alpha])]), shape


def _softplus(g: _Graph, layer, params, prefix: str, x: str, shape):
    if g.dtype == np.float32:
        return g.node("Softplus", [x]), shape
    # max(x, 0) + ln(1 + exp(-|x|)), as vae_np.ops.softplus
    tail = g.node("Exp", [g.node("Neg", [g.node("Abs", [x])])])
    one = g.constant(f"{prefix}.one", 1.0)
    return g.node("Add", [g.node("Relu", [x]), g.node("Log", [g.node("Add", [tail, one])])]), \
        shape


def _unary(op: str):
    return lambda g, layer, params, prefix, x, shape: (g.node(op, [x]), shape)


def _images(shape, prefix: str):
    if len(shape) != 3:
        raise ValueError(f"network: {prefix} expects images (N, C, H, W), the layer before "
                         f"gives (N, {', '.join(map(str, shape))})")
    return shape


def _conv2d(g: _Graph, layer, params, prefix: str, x: str, shape):
    c, h, w = _images(shape, prefix)
    _expect((c,), (layer.in_channels,), f"{prefix} (channels)")
    out_shape = layer.output_shape(h, w)
    o, rows, cols = out_shape
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    weight = g.constant(f"{prefix}.W", params["W"])
    bias = g.constant(f"{prefix}.b", params["b"])
    if g.dtype == np.float32:
        return g.node("Conv", [x, weight, bias], kernel_shape=[kh, kw], pads=[ph, pw, ph, pw],
                      strides=[sh, sw], dilations=[1, 1], group=1), out_shape
    if ph or pw:
        x = g.node("Pad", [x, g.ints(prefix, [0, 0, ph, pw, 0, 0, ph, pw])], mode="constant")
    nhwc = g.node("Transpose", [x], perm=[0, 2, 3, 1])
    axes, steps = g.ints(prefix, [1, 2]), g.ints(prefix, [sh, sw])
    patches = [g.node("Slice", [nhwc, g.ints(prefix, [i, j]),
                                g.ints(prefix, [i + sh * (rows - 1) + 1, j + sw * (cols - 1) + 1]),
                                axes, steps])
               for i in range(kh) for j in range(kw)]                  # (N, Ho, Wo, C) each
    columns = g.node("Concat", patches, axis=3) if len(patches) > 1 else patches[0]
    matrix = g.node("Reshape", [g.node("Transpose", [weight], perm=[2, 3, 1, 0]),
                                g.ints(prefix, [kh * kw * c, o])])  # row (i kw + j) C + c
    y = g.node("Add", [g.node("MatMul", [columns, matrix]), bias])     # (N, Ho, Wo, O)
    return g.node("Transpose", [y], perm=[0, 3, 1, 2]), out_shape


def _maxpool2d(g: _Graph, layer, params, prefix: str, x: str, shape):
    c, h, w = _images(shape, prefix)
    k = layer.kernel_size
    if h % k or w % k:
        raise ValueError(f"network: {prefix} (MaxPool2d({k})) needs H and W multiples of {k}, "
                         f"got (N, {c}, {h}, {w})")
    return g.node("MaxPool", [x], kernel_shape=[k, k], strides=[k, k]), (c, h // k, w // k)


def _upsample(g: _Graph, layer, params, prefix: str, x: str, shape):
    c, h, w = _images(shape, prefix)
    f = layer.scale_factor
    out_shape = (c, f * h, f * w)
    if g.dtype == np.float32:
        scales = g.constant(f"{prefix}.scales", [1.0, 1.0, f, f], dtype=np.float32)
        return g.node("Resize", [x, "", scales], mode="nearest",
                      coordinate_transformation_mode="asymmetric", nearest_mode="floor"), \
            out_shape
    six = g.node("Reshape", [x, g.ints(prefix, [0, c, h, 1, w, 1])])
    blocks = g.node("Expand", [six, g.ints(prefix, [1, 1, 1, f, 1, f])])
    return g.node("Reshape", [blocks, g.ints(prefix, [0, *out_shape])]), out_shape


def _flatten(g: _Graph, layer, params, prefix: str, x: str, shape):
    gc, h, w = _images(shape, prefix)
    groups = layer.groups
    if gc % groups:
        raise ValueError(f"network: {prefix}: {gc} channels do not split into {groups} groups")
    size = gc * h * w
    if layer.channels_last and gc != groups:              # as conv._to_flat
        x = g.node("Reshape", [x, g.ints(prefix, [0, groups, gc // groups, h, w])])
        x = g.node("Transpose", [x], perm=[0, 1, 3, 4, 2])
    return g.node("Reshape", [x, g.ints(prefix, [0, size])]), (size,)


def _unflatten(g: _Graph, layer, params, prefix: str, x: str, shape):
    gc, h, w = layer.shape
    groups = layer.groups
    _expect(shape, (gc * h * w,), prefix)
    if not layer.channels_last or gc == groups:           # as conv._from_flat
        return g.node("Reshape", [x, g.ints(prefix, [0, gc, h, w])]), layer.shape
    x = g.node("Reshape", [x, g.ints(prefix, [0, groups, h, w, gc // groups])])
    x = g.node("Transpose", [x], perm=[0, 1, 4, 2, 3])
    return g.node("Reshape", [x, g.ints(prefix, [0, gc, h, w])]), layer.shape


def _sequential(g: _Graph, layer, params, prefix: str, x: str, shape):
    if layer.extra_features:
        raise ValueError(f"network: {prefix}: a nested network with side inputs has no "
                         f"ONNX mapping")
    return _network(g, layer, f"{prefix}.", x, shape)


#: Layer class -> function(graph, layer, host params, name prefix, input, input shape)
#: -> (output name, output shape); shapes per example, without the batch axis.
LAYER_OPS = {Linear: _linear, ReLU: _unary("Relu"), LeakyReLU: _leaky_relu,
             Tanh: _unary("Tanh"), Sigmoid: _unary("Sigmoid"), Softplus: _softplus,
             Conv2d: _conv2d, MaxPool2d: _maxpool2d, Upsample: _upsample, Flatten: _flatten,
             Unflatten: _unflatten, Sequential: _sequential}


def _layer_names(network) -> list[str]:
    """Each layer's name in the parameter names: Sequential's ``names`` (``conv2d0``), the
    MLP's ``linear{i}`` (its activations ``act{i}``, after ``linear{i - 1}``)."""
    if hasattr(network, "names"):
        return list(network.names)
    names, linear = [], 0
    for layer in network.layers:
        names.append(f"linear{linear}" if type(layer) is Linear else f"act{linear}")
        linear += type(layer) is Linear
    return names


def _network(g: _Graph, network, prefix: str, x: str, shape, extras=None):
    """Emit ``network``'s layers on x (shape per example ``shape``); ``extras``: (name,
    width) of the side input (labels), joined where the network takes it: Sequential's
    ``extra_at`` when it has ``extra_features``, else appended to x. -> (name, shape)."""
    side = getattr(network, "extra_features", 0)
    at = network.extra_at if side else 0
    if side and (extras is None or extras[1] != side):
        raise ValueError(f"network: {prefix or 'the network'} takes {side} side inputs, "
                         f"given {0 if extras is None else extras[1]}")
    for i, (layer, name) in enumerate(zip(network.layers, _layer_names(network))):
        if extras is not None and i == at:
            if len(shape) != 1:
                raise ValueError(f"network: the side inputs join flat features at layer "
                                 f"{i}, got (N, {', '.join(map(str, shape))})")
            x, shape = g.node("Concat", [x, extras[0]], axis=1), (shape[0] + extras[1],)
        emit = LAYER_OPS.get(type(layer))
        if emit is None:
            raise ValueError(f"model: {prefix}{name}: layer {type(layer).__name__} has no "
                             f"ONNX mapping (vae_np.interop.onnx_graphs.LAYER_OPS)")
        x, shape = emit(g, layer, host_params(layer), f"{prefix}{name}", x, tuple(shape))
    return x, tuple(shape)


def _input_width(network) -> int:
    """The width of a network's main input (without side inputs), from its first layer."""
    first = network.layers[0]
    if isinstance(first, Linear):
        return int(first.params["W"].shape[0])
    if isinstance(first, Unflatten):
        return int(np.prod(first.shape))
    if isinstance(first, Sequential):
        return _input_width(first)
    raise ValueError(f"network: cannot tell the input width from a first layer "
                     f"{type(first).__name__} (expected Linear, Unflatten or Sequential)")


def network_model(network, name: str = "network"):
    """One network alone as a checked ``onnx.ModelProto``: inputs ``x`` (N, D) [and
    ``extras`` (N, E) for a Sequential with E ``extra_features``], output ``out`` (N,
    D_out), as ``network(concat([x, extras], axis=1))``. Initializers are named as
    ``network.named_parameters()`` names them (``conv2d0.W``); dtype the network's."""
    onnx = _onnx()
    if not hasattr(network, "layers") or not hasattr(network, "backend"):
        raise TypeError(f"network: expected a vae_np MLP or Sequential, got "
                        f"{type(network).__name__}")
    g = _Graph(onnx, network.backend.numpy_dtype)
    elem = onnx.helper.np_dtype_to_tensor_dtype(g.dtype)
    width, side = _input_width(network), getattr(network, "extra_features", 0)
    inputs = [onnx.helper.make_tensor_value_info("x", elem, ["N", width])]
    if side:
        inputs.append(onnx.helper.make_tensor_value_info("extras", elem, ["N", side]))
    out, shape = _network(g, network, "", "x", (width,), ("extras", side) if side else None)
    if len(shape) != 1:
        raise ValueError(f"network: the output is (N, {', '.join(map(str, shape))}), not flat")
    g.node("Identity", [out], outputs=["out"])
    outputs = [onnx.helper.make_tensor_value_info("out", elem, ["N", shape[0]])]
    return _checked(onnx, onnx.helper.make_graph(g.nodes, f"vae_np_{name}", inputs, outputs,
                                                 g.initializers),
                    f"vae_np network {name}; see vae_np.interop.onnx_graphs", {})


def _onnx():
    onnx = require("onnx", "ONNX export")
    import onnx.numpy_helper  # noqa: F401  (a submodule the package does not import itself)
    return onnx


def onnx_models(model: VAE):
    """(encoder, decoder): two checked ``onnx.ModelProto`` of ``model`` (module docstring)."""
    onnx = _onnx()
    check_model(model)
    dtype = model.backend.numpy_dtype
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    d, c, k = model.latent_dim, model.input_dim, model.num_classes

    def value(name, width, rows="N"):
        return onnx.helper.make_tensor_value_info(name, elem, [rows, width])

    enc = _Graph(onnx, dtype)
    h = enc.node("Sub", ["x", enc.constant("input_shift", model.input_shift)])
    inputs = [value("x", c)] + ([value("y", k)] if k else [])
    h, _ = _network(enc, model.encoder, "encoder.", h, (c,), ("y", k) if k else None)
    enc.node("Split", [h, enc.constant("split_mu_logvar", np.array([d, d], np.int64))],
             outputs=["mu", "logvar"], axis=1)
    encoder = _model(onnx, enc, "encoder", inputs, [value("mu", d), value("logvar", d)], model)

    dec = _Graph(onnx, dtype)
    inputs = [value("z", d, "M")] + ([value("y", k, "M")] if k else [])
    h, _ = _network(dec, model.decoder, "decoder.", "z", (d,), ("y", k) if k else None)
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
    return _checked(onnx, graph, f"vae_np VAE {part} ({vae.likelihood.name} decoder); see "
                                 f"vae_np.interop.onnx_graphs",
                    {"vae_np.part": part, "vae_np.model_config": json.dumps(vae.config)})


def _checked(onnx, graph, doc: str, props: dict):
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="vae_np", ir_version=IR_VERSION, doc_string=doc)
    if props:
        onnx.helper.set_model_props(proto, props)
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
