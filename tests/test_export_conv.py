"""vae_np.interop for the convolutional networks (vae_np.networks.conv_networks): ONNX
Runtime runs each exported network and each exported model part and matches vae_np within
the reordered-sum bound (tests/helpers.rounding_bound), in float32 and float64 (where ONNX
Runtime has no Conv or Resize kernel, the exporter's float64 im2col and Expand forms), with
and without labels; safetensors keeps every parameter under its named_parameters name,
exactly; the torch layout refuses the architecture on one line."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_within, jitter_biases, rounding_bound, unit_roundoff
from vae_np import VAE
from vae_np.interop import export_model, read_safetensors
from vae_np.interop.onnx_graphs import network_model
from vae_np.networks import image_layout

D = 3                                   # latent size
SHAPES = [(8, 8), (8, 8, 3)]            # one channel; three, (H, W, C) in the data


def conv_model(image_shape, decoder="bernoulli", num_classes=None, dtype="float64", seed=0):
    """A conv VAE (the starting example's networks at tiny widths), random biases."""
    model = VAE(architecture="conv", image_shape=image_shape, channels=(2, 3), hidden=(6,),
                latent_dim=D, decoder=decoder, num_classes=num_classes, dtype=dtype,
                seed=seed, variance=0.3 if decoder == "gaussian-fixed" else None)
    return jitter_biases(model, seed, scale=0.3)     # zero biases would hide a lost bias


def session(proto):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    onnx.checker.check_model(onnx.load_from_string(proto.SerializeToString()), full_check=True)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def inputs(model, n=6, seed=0):
    rng = np.random.default_rng(seed)
    dtype = model.backend.numpy_dtype
    x = rng.random((n, model.input_dim)).astype(dtype)
    labels = rng.integers(0, model.num_classes or 1, n)
    one_hot = np.eye(model.num_classes or 1, dtype=dtype)[labels]
    z = rng.standard_normal((n, D)).astype(dtype)
    return x, labels, one_hot, z


# ------------------------------------------------------------------------------------------
# Each network alone


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("num_classes", [None, 3])
@pytest.mark.parametrize("decoder", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("image_shape", SHAPES)
def test_onnx_runtime_runs_each_conv_network_as_vae_np(image_shape, decoder, num_classes,
                                                       dtype):
    pytest.importorskip("onnx")
    model = conv_model(image_shape, decoder, num_classes, dtype)
    x, _, one_hot, z = inputs(model)
    eps = unit_roundoff(dtype)
    k = num_classes or 0

    enc = model.encoder
    proto = network_model(enc, "encoder")
    ops = {node.op_type for node in proto.graph.node}
    assert ops >= ({"Conv"} if dtype == "float32" else {"Pad", "Slice", "MatMul"}) | {"MaxPool"}
    assert ("Transpose" in ops) == (len(image_shape) == 3 or dtype == "float64")
    assert ("Concat" in ops) == bool(k or dtype == "float64")
    inits = {i.name for i in proto.graph.initializer}
    assert {name for name, _, _ in enc.named_parameters()} <= inits   # conv2d0.W, linear1.b
    sess = session(proto)
    assert [i.name for i in sess.get_inputs()] == ["x", "extras"][:1 + bool(k)]
    h = np.concatenate([x, one_hot], axis=1) if k else x
    (out,) = sess.run(None, {"x": x, **({"extras": one_hot} if k else {})})
    assert out.dtype == np.dtype(dtype) and out.shape == (len(x), 2 * D)
    assert_within(out, enc(h), rounding_bound(enc, h, eps), "encoder")

    dec = model.decoder                  # labels join z at its input: one input, d + K wide
    sess = session(network_model(dec, "decoder"))
    h = np.concatenate([z, one_hot], axis=1) if k else z
    (out,) = sess.run(None, {"x": h})
    assert out.shape == (len(z), model.likelihood.outputs_per_pixel * model.input_dim)
    bound = rounding_bound(dec, h, eps)
    assert_within(out, dec(h), bound, "decoder")
    assert np.max(bound) < (1e-4 if dtype == "float32" else 1e-12)   # tight enough to matter


def test_the_bound_catches_a_layout_mistake():
    """A network whose Unflatten reads the pixels channel-major instead of (H, W, C) is the
    mistake the Transposes prevent: it moves the outputs by far more than the bound."""
    pytest.importorskip("onnx")
    model = conv_model((8, 8, 3), dtype="float32")
    enc = model.encoder
    x = inputs(model)[0]
    enc.layers[0].channels_last = False
    (wrong,) = session(network_model(enc)).run(None, {"x": x})
    enc.layers[0].channels_last = True
    bound = rounding_bound(enc, x, unit_roundoff(np.float32))
    assert np.max(np.abs(wrong - enc(x)) - bound) > 100 * np.max(bound)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_strides_rectangular_kernels_and_padding_map_in_both_forms(dtype):
    """Conv2d's attributes beyond the example's 3x3, stride 1, padding 1: pads are (rows,
    columns) per side, the im2col form's slices step by the stride."""
    pytest.importorskip("onnx")
    from vae_np.backend import get_backend
    from vae_np.conv import Conv2d, Flatten, Unflatten, Upsample
    from vae_np.networks import Sequential

    backend, rng = get_backend("numpy", dtype), np.random.default_rng(4)
    conv = Conv2d(2, 3, (3, 2), backend, rng, stride=(2, 1), padding=(1, 0))
    conv.params["b"][...] = rng.standard_normal(3)
    net = Sequential([Unflatten((2, 7, 6), backend, channels_last=True), conv,
                      Upsample(3, backend), Flatten(backend, channels_last=True)], backend)
    x = rng.standard_normal((5, 84)).astype(dtype)
    (out,) = session(network_model(net)).run(None, {"x": x})
    assert out.shape == (5, 3 * 12 * 15)                 # (7 + 2 - 3) // 2 + 1 = 4 rows, x3
    assert_within(out, net(x), rounding_bound(net, x, unit_roundoff(dtype)), "strided conv")


def test_network_model_refuses_what_it_cannot_map():
    with pytest.raises(TypeError, match="network: expected a vae_np MLP or Sequential"):
        network_model({"layers": []})


# ------------------------------------------------------------------------------------------
# The model's two parts, as export_model writes them


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("decoder,num_classes", [("bernoulli", None), ("gaussian", 3),
                                                 ("gaussian-fixed", 2)])
@pytest.mark.parametrize("image_shape", SHAPES)
def test_onnx_runtime_runs_a_conv_model_as_vae_np(tmp_path, image_shape, decoder, num_classes,
                                                  dtype):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = conv_model(image_shape, decoder, num_classes, dtype)
    paths = export_model(model, tmp_path / "vae.onnx", "onnx")
    for path in paths:
        onnx.checker.check_model(str(path), full_check=True)
    enc, dec = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in paths)
    x, labels, one_hot, z = inputs(model, seed=1)
    extra, feed = ({"y": labels}, {"y": one_hot}) if num_classes else ({}, {})
    eps = unit_roundoff(dtype)
    c = model.input_dim

    mu, logvar = enc.run(["mu", "logvar"], {"x": x, **feed})
    h = np.concatenate([x, one_hot], axis=1) if num_classes else x
    shift = np.r_[np.full(c, 0.5), np.zeros(num_classes)] if num_classes else 0.5
    bound = rounding_bound(model.encoder, h, eps, shift)
    ref_mu, ref_logvar = model.encode(x, **extra)
    assert_within(mu, ref_mu, bound[:, :D], "mu")
    assert_within(logvar, ref_logvar, bound[:, D:], "logvar")

    names = [o.name for o in dec.get_outputs()]
    assert names == {"bernoulli": ["logits"], "gaussian": ["mean", "logvar"],
                     "gaussian-fixed": ["mean"]}[decoder]
    outs = np.concatenate(dec.run(names, {"z": z, **feed}), axis=1)
    h = np.concatenate([z, one_hot], axis=1) if num_classes else z
    assert_within(outs, model.decoder_outputs(z, **extra),
                  rounding_bound(model.decoder, h, eps), "decoder outputs")


# ------------------------------------------------------------------------------------------
# safetensors and the torch layout


@pytest.mark.parametrize("image_shape", SHAPES)
def test_safetensors_of_conv_networks_round_trip_exactly(tmp_path, image_shape):
    """Every parameter under its named_parameters name, bit for bit; loaded into conv
    networks drawn from another seed, they compute what the exported ones do. (Rebuilding
    the model from the metadata, VAE(**model_config), is VAE(architecture="conv")'s.)"""
    st = pytest.importorskip("safetensors.numpy")
    model = conv_model(image_shape, "gaussian", 3, "float64", seed=1)
    (path,) = export_model(model, tmp_path / "m.safetensors", "safetensors",
                           data={"image_shape": list(image_shape)})
    state = model.state_dict()
    assert "encoder.conv2d1.W" in state and "decoder.linear1.b" in state
    assert state["encoder.conv2d0.W"].shape == (2, image_layout(image_shape)[0], 3, 3)
    tensors = st.load_file(str(path))                # without vae_np
    assert sorted(tensors) == sorted(state)
    for name, value in state.items():
        assert tensors[name].dtype == value.dtype and np.array_equal(tensors[name], value), name
    tensors, metadata = read_safetensors(path)
    assert '"architecture": "conv"' in metadata["model_config"]

    other = conv_model(image_shape, "gaussian", 3, "float64", seed=2)
    assert not np.array_equal(other.state_dict()["encoder.conv2d0.W"], state["encoder.conv2d0.W"])
    other.load_state_dict(tensors)
    x, labels, _, z = inputs(model)
    for a, b in zip(model.encode(x, y=labels), other.encode(x, y=labels)):
        assert np.array_equal(a, b)
    assert np.array_equal(model.decoder_outputs(z, y=labels), other.decoder_outputs(z, y=labels))


def test_the_torch_layout_refuses_a_conv_model_on_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"architecture 'conv'.*export it as onnx or "
                                         r"safetensors") as info:
        export_model(conv_model((8, 8)), tmp_path / "m.pt", "torch")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "m.pt").exists()


def test_a_nested_network_exports_under_its_parameter_names():
    pytest.importorskip("onnx")
    from vae_np.layers import Linear, Tanh
    from vae_np.networks import Sequential, conv_encoder

    model = conv_model((8, 8), dtype="float64")
    rng = np.random.default_rng(5)
    trunk = conv_encoder((8, 8), D, model.backend, rng, channels=(2, 3), hidden=6)
    net = Sequential([trunk, Tanh(model.backend), Linear(2 * D, 4, model.backend, rng)],
                     model.backend)
    net.layers[2].params["b"][...] = rng.standard_normal(4)
    proto = network_model(net)
    names = [name for name, _, _ in net.named_parameters()]
    assert "sequential0.conv2d0.W" in names
    assert set(names) <= {i.name for i in proto.graph.initializer}
    x = inputs(model)[0]
    (out,) = session(proto).run(None, {"x": x})
    assert_within(out, net(x), rounding_bound(net, x, unit_roundoff(np.float64)), "nested")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_conv_vae_exports_and_its_safetensors_import_back(tmp_path, dtype):
    """The integration: VAE(architecture="conv") exports to ONNX as its networks compute,
    and its safetensors file rebuilds it (VAE(**model_config)) bit for bit."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("safetensors")
    from vae_np.interop import import_model

    model = jitter_biases(VAE(input_dim=192, latent_dim=D, architecture="conv",
                              image_shape=(8, 8, 3), num_classes=2, dtype=dtype, seed=3), 3)
    enc_path, _ = export_model(model, tmp_path / "vae.onnx", "onnx")
    x, labels, one_hot, _ = inputs(model)
    mu, logvar = ort.InferenceSession(str(enc_path), providers=["CPUExecutionProvider"]).run(
        ["mu", "logvar"], {"x": x, "y": one_hot})
    h = np.concatenate([x, one_hot], axis=1)
    bound = rounding_bound(model.encoder, h, unit_roundoff(dtype),
                           np.r_[np.full(192, model.input_shift), np.zeros(2)])
    ref = np.concatenate(model.encode(x, y=labels), axis=1)
    assert_within(np.concatenate([mu, logvar], axis=1), ref, bound, "encoder")
    (path,) = export_model(model, tmp_path / "m.safetensors", "safetensors")
    back = import_model(path).model
    assert back.config == model.config
    for name, value in model.state_dict().items():
        assert np.array_equal(back.state_dict()[name], value), name
