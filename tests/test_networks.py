"""vae_np.networks: Sequential with the MLP's interface, and the starting example's
convolutional encoder and decoder, checked whole: by central differences (float64, every
parameter array and the input, element-wise on sampled entries and directional over
everything, both code paths), against the same network in PyTorch (forward and
gradients, where torch is installed), in the likelihood's output layout, and on the
Parameters flat buffer the VAE puts them on.

Tolerance 1e-6 (gradcheck.DEFAULT_TOLERANCE), as for the layers: the networks are
piecewise linear, so away from the ReLU and max-pool kinks the central difference has
only round-off (~1e-10). The biases are jittered (as tests/helpers.py does for the MLP):
with zero biases a ReLU input can sit exactly at 0 and the check would fail with nothing
wrong. The 28x28 preset's directional checks show ~7e-8: f = sum(out * dout) adds
thousands of O(1) terms of both signs, so its round-off, about 1e-16 sum|terms| / h ~ 1e-7,
is large against one directional derivative of O(1); still 15x below the tolerance.
Against torch (float64): 1e-10 relative, a few hundred float64 roundings of sums of O(1)
terms.
"""

from __future__ import annotations

import numpy as np
import pytest

from vae_np import gradcheck
from vae_np.backend import get_backend
from vae_np.conv import Conv2d, MaxPool2d, Upsample
from vae_np.layers import MLP, Linear, ReLU
from vae_np.networks import Sequential, conv_decoder, conv_encoder, conv_networks, image_layout
from vae_np.parameters import Parameters

TOL = gradcheck.DEFAULT_TOLERANCE
SMALL = dict(channels=(3, 4), hidden=6)          # the preset's structure at a checkable size


def jitter_biases(net, backend, seed=0):
    rng = np.random.default_rng(seed)
    for name, layer, key in net.named_parameters():
        if key == "b":
            layer.params[key][...] = backend.asarray(0.1 * rng.standard_normal(
                tuple(layer.params[key].shape)))


def check_network(net, x, backend, record_check, family, max_entries=12):
    """Element-wise (sampled) and directional checks of f = sum(net(x) * dout)."""
    jitter_biases(net, backend)
    x = backend.asarray(x)
    out = net.forward(x)
    dout = backend.asarray(np.random.default_rng(1).standard_normal(tuple(out.shape)))
    dx = net.backward(dout)
    entries = list(net.named_parameters())
    arrays = {"input": x, **{name: layer.params[key] for name, layer, key in entries}}
    analytic = {"input": backend.to_numpy(dx).copy(),
                **{name: backend.to_numpy(layer.grads[key]).copy()
                   for name, layer, key in entries}}

    def f():
        return float(backend.xp.sum(net.forward(x) * dout))

    report = gradcheck.check_gradients(f, arrays, analytic, max_entries=max_entries)
    record_check(family, report.max_rel_error)
    assert report.passed, report.table()
    result = gradcheck.check_directional(f, arrays, analytic)
    record_check(family + " (directional)", result.rel_error)
    assert result.passed, result


@pytest.mark.parametrize("image_shape", [(8, 12), (4, 8, 3)])
def test_encoder_gradients(image_shape, backend, code_path, record_check):
    enc = conv_encoder(image_shape, 2, backend, np.random.default_rng(0), **SMALL)
    c, h, w, _ = image_layout(image_shape)
    x = np.random.default_rng(2).uniform(size=(3, c * h * w)) - 0.5
    check_network(enc, x, backend, record_check, "networks.conv_encoder")


@pytest.mark.parametrize("image_shape, outputs", [((8, 12), 1), ((4, 8, 3), 2)])
def test_decoder_gradients(image_shape, outputs, backend, code_path, record_check):
    dec = conv_decoder(image_shape, 2, backend, np.random.default_rng(0),
                       outputs_per_pixel=outputs, **SMALL)
    z = np.random.default_rng(3).standard_normal((3, 2))
    check_network(dec, z, backend, record_check, "networks.conv_decoder")


def test_conditional_networks_gradients(np64, code_path, record_check):
    """Labels as extra features: the encoder takes them at its first Linear, the decoder
    after z; dL/d(labels) comes back in the input gradient's last columns."""
    enc, dec = conv_networks((4, 8, 3), 2, 2, np64, np.random.default_rng(0),
                             extra_features=3, **SMALL)
    x = np.random.default_rng(4).uniform(size=(2, 96 + 3))
    check_network(enc, x, np64, record_check, "networks.conv_encoder (labels)")
    check_network(dec, np.random.default_rng(5).standard_normal((2, 2 + 3)), np64,
                  record_check, "networks.conv_decoder (labels)")


def test_the_full_size_preset_gradients(np64, code_path, record_check):
    """The starting example's networks at MNIST size, directional (two passes each)."""
    enc, dec = conv_networks((28, 28), 4, 2, np64, np.random.default_rng(0))
    for net, x, name in ((enc, np.random.default_rng(6).uniform(size=(2, 784)), "encoder"),
                         (dec, np.random.default_rng(7).standard_normal((2, 4)), "decoder")):
        jitter_biases(net, np64)
        out = net.forward(x)
        dout = np.random.default_rng(8).standard_normal(out.shape)
        dx = net.backward(dout)
        entries = list(net.named_parameters())
        arrays = {"input": x, **{n: layer.params[k] for n, layer, k in entries}}
        analytic = {"input": dx.copy(), **{n: layer.grads[k].copy() for n, layer, k in entries}}
        result = gradcheck.check_directional(lambda: float(np.sum(net.forward(x) * dout)),
                                             arrays, analytic)
        record_check(f"networks.conv_{name} (28x28, directional)", result.rel_error)
        assert result.passed, result


# ------------------------------------------------------------------------------------------
# The layers the issue lists, and the same network in PyTorch


def test_the_preset_is_the_starting_example(np64):
    enc, dec = conv_networks((28, 28), 16, 1, np64, np.random.default_rng(0))
    described = [(type(layer).__name__, getattr(layer, "in_channels", None)
                  or getattr(layer, "in_features", None),
                  getattr(layer, "out_channels", None) or getattr(layer, "out_features", None))
                 for layer in enc.layers + dec.layers]
    assert described == [
        ("Unflatten", None, None), ("Conv2d", 1, 32), ("ReLU", None, None),
        ("MaxPool2d", None, None), ("Conv2d", 32, 64), ("ReLU", None, None),
        ("MaxPool2d", None, None), ("Flatten", None, None), ("Linear", 64 * 7 * 7, 512),
        ("ReLU", None, None), ("Linear", 512, 32),
        ("Linear", 16, 512), ("ReLU", None, None), ("Linear", 512, 64 * 7 * 7),
        ("ReLU", None, None), ("Unflatten", None, None), ("Upsample", None, None),
        ("Conv2d", 64, 32), ("ReLU", None, None), ("Upsample", None, None),
        ("Conv2d", 32, 1), ("Flatten", None, None)]
    for layer in enc.layers + dec.layers:
        if isinstance(layer, Conv2d):
            assert layer.kernel_size == (3, 3) and layer.padding == (1, 1)
            assert layer.stride == (1, 1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_decoders_relus_before_upsampling_give_the_examples_bits(dtype):
    """The decoder runs each ReLU before the Upsample (and the Unflatten) that the example
    puts it after, on a quarter of the values: its output, dx and every gradient must be
    the example order's to the bit (nearest upsampling copies, its backward sums blocks
    whose ReLU mask is one value)."""
    backend = get_backend("numpy", dtype=dtype)
    dec = conv_decoder((28, 28), 16, backend, np.random.default_rng(0), channels=(8, 16))
    jitter_biases(dec, backend)                         # some units off, some on
    kinds = [type(layer).__name__ for layer in dec.layers]
    relu_before_unflatten, relu_after_conv = kinds.index("Unflatten") - 1, kinds.index("Conv2d") + 1
    assert kinds[relu_before_unflatten] == kinds[relu_after_conv] == "ReLU"
    example = list(dec.layers)                          # the same layer objects, reordered
    example.insert(relu_before_unflatten + 2, example.pop(relu_before_unflatten))
    example.insert(relu_after_conv + 1, example.pop(relu_after_conv))
    assert [type(layer).__name__ for layer in example] == [
        "Linear", "ReLU", "Linear", "Unflatten", "Upsample", "ReLU", "Conv2d", "Upsample",
        "ReLU", "Conv2d", "Flatten"]                    # the example's order
    rng = np.random.default_rng(1)
    z = rng.standard_normal((5, 16)).astype(dtype)
    dout = rng.standard_normal((5, 784)).astype(dtype)
    results = []
    for net in (dec, Sequential(example, backend)):
        out = net.forward(z)
        dz = net.backward(dout)
        results.append([out, dz, *(layer.grads[key].copy()
                                   for _, layer, key in dec.named_parameters())])
    for ours, theirs in zip(*results):
        np.testing.assert_array_equal(ours, theirs)


def _torch_twin(net, torch, image_shape, decoder):
    """The same layers and weights as a torch.nn.Sequential (float64)."""
    nn = torch.nn
    c, h, w, channels_last = image_layout(image_shape)
    modules = []
    for layer in net.layers:
        kind = type(layer).__name__
        if kind == "Conv2d":
            m = nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=1).double()
            m.weight.data = torch.from_numpy(layer.params["W"].copy())
            m.bias.data = torch.from_numpy(layer.params["b"].copy())
        elif kind == "Linear":
            m = nn.Linear(layer.in_features, layer.out_features).double()
            m.weight.data = torch.from_numpy(layer.params["W"].T.copy())
            m.bias.data = torch.from_numpy(layer.params["b"].copy())
        elif kind == "ReLU":
            m = nn.ReLU()
        elif kind == "MaxPool2d":
            m = nn.MaxPool2d(2)
        elif kind == "Upsample":
            m = nn.Upsample(scale_factor=2, mode="nearest")
        elif kind == "Unflatten" and not decoder:
            m = nn.Unflatten(1, (h, w, c))
            modules.append(m)
            m = _Permute((0, 3, 1, 2))
        elif kind == "Unflatten":
            m = nn.Unflatten(1, layer.shape)
        elif kind == "Flatten" and decoder:     # (N, K C, H, W) -> K blocks of (H, W, C)
            m = _Permute((0, 1, 3, 4, 2), groups=layer.groups)
        else:
            m = nn.Flatten()
        modules.append(m)
    return nn.Sequential(*modules)


class _Permute:
    """A torch module-like callable: permute (after splitting channels into groups)."""

    def __new__(cls, order, groups=None):
        import torch

        class Permute(torch.nn.Module):
            def forward(self, x):
                if groups is not None:
                    n, gc, h, w = x.shape
                    x = x.reshape(n, groups, gc // groups, h, w)
                return x.permute(*order).reshape(x.shape[0], -1) if groups is not None \
                    else x.permute(*order)

        return Permute()


@pytest.mark.parametrize("image_shape, outputs", [((28, 28), 1), ((8, 12, 3), 2)])
def test_networks_match_torch_forward_and_gradients(np64, code_path, image_shape, outputs):
    torch = pytest.importorskip("torch")
    enc, dec = conv_networks(image_shape, 3, outputs, np64, np.random.default_rng(0))
    jitter_biases(enc, np64), jitter_biases(dec, np64, seed=1)
    c, h, w, _ = image_layout(image_shape)
    rng = np.random.default_rng(9)
    for net, x, decoder in ((enc, rng.uniform(size=(4, c * h * w)), False),
                            (dec, rng.standard_normal((4, 3)), True)):
        twin = _torch_twin(net, torch, image_shape, decoder)
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        yt = twin(xt)
        y = net.forward(x)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
        dout = rng.standard_normal(y.shape)
        yt.backward(torch.from_numpy(dout))
        dx = net.backward(dout)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
        grads = [p.grad.numpy() for p in twin.parameters()]
        mine = [layer.grads[k] for _, layer, k in net.named_parameters()]
        for ours, theirs in zip(mine, grads):
            theirs = theirs.T if ours.ndim == 2 else theirs          # Linear stores W^T
            np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)


def test_gaussian_decoder_output_is_the_likelihoods_layout(np64):
    """(M, 2c): the first c columns are the means, the last c the log-variances, each in
    the data's (H, W, C) pixel order: the last convolution's channel groups, rearranged."""
    dec = conv_decoder((4, 8, 3), 2, np64, np.random.default_rng(0), outputs_per_pixel=2,
                       **SMALL)
    z = np.random.default_rng(10).standard_normal((2, 2))
    h = z
    for layer in dec.layers[:-1]:
        h = layer(h)
    assert h.shape == (2, 6, 4, 8)                        # K C channels: [mean x3, logvar x3]
    out = dec(z)
    np.testing.assert_array_equal(out[:, :96], h[:, :3].transpose(0, 2, 3, 1).reshape(2, -1))
    np.testing.assert_array_equal(out[:, 96:], h[:, 3:].transpose(0, 2, 3, 1).reshape(2, -1))


def test_encoder_reads_flat_examples_in_the_datas_pixel_order(np64):
    """An (H, W, C) example whose pixel (y, x) channel c is at index (y W + x) C + c."""
    enc = conv_encoder((4, 8, 3), 2, np64, np.random.default_rng(0), **SMALL)
    image = np.random.default_rng(11).standard_normal((1, 3, 4, 8))
    flat = image.transpose(0, 2, 3, 1).reshape(1, -1)
    np.testing.assert_array_equal(enc.layers[0](flat), image)


# ------------------------------------------------------------------------------------------
# The interface VAE uses


def test_on_the_flat_parameter_buffer(np64):
    """Parameters rebinds params and grads to views; backward writes into the buffer."""
    enc, dec = conv_networks((8, 12), 2, 1, np64, np.random.default_rng(0), **SMALL)
    params = Parameters(np64, [*enc.named_parameters("encoder."),
                               *dec.named_parameters("decoder.")])
    assert params.names[0] == "encoder.conv2d0.W" and params.names[-1] == "decoder.conv2d1.b"
    assert len(set(params.names)) == len(params.names) == 16
    x = np.random.default_rng(12).uniform(size=(2, 96))
    out = enc.forward(x)
    enc.backward(np.ones(out.shape), input_grad=False)
    layer = enc.layers[1]
    assert np.shares_memory(layer.grads["W"], params.grad)
    np.testing.assert_array_equal(params.grads["encoder.conv2d0.W"], layer.grads["W"])
    assert np.any(params.grad != 0)


def test_inference_and_input_grad_false(np64, code_path):
    enc = conv_encoder((8, 12), 2, np64, np.random.default_rng(0), extra_features=2, **SMALL)
    x = np.random.default_rng(13).uniform(size=(2, 98))
    dout = np.random.default_rng(14).standard_normal((2, 4))
    enc.forward(x)
    dx = enc.backward(dout)
    grads = {n: layer.grads[k].copy() for n, layer, k in enc.named_parameters()}
    enc.forward(x)
    enc(x + 1.0)                                          # inference between the two
    np.testing.assert_array_equal(enc(x), enc.forward(x))
    np.testing.assert_array_equal(enc.backward(dout), dx)
    enc.forward(x)
    calls = []
    first_conv = enc.layers[1]
    original = first_conv.backward
    first_conv.backward = lambda g, input_grad=True: calls.append(input_grad) or original(
        g, input_grad=input_grad)
    assert enc.backward(dout, input_grad=False) is None
    assert calls == [False]                   # the first convolution skipped its col2im
    for name, layer, key in enc.named_parameters():
        np.testing.assert_array_equal(layer.grads[key], grads[name])
    with pytest.raises(RuntimeError, match="backward called before forward"):
        enc.backward(dout)                                # one backward per forward


def _networks_with_pairs(backend):
    """(network, its input): the conv preset (labels at the encoder's Linear) and two
    Sequentials whose extras join in or after a Linear + ReLU pair."""
    rng = np.random.default_rng(0)
    enc, dec = conv_networks((8, 12), 2, 1, backend, rng, extra_features=3, **SMALL)
    cut = Sequential([Linear(4, 5, backend, rng), ReLU(backend), Linear(7, 3, backend, rng)],
                     backend, extra_features=2, extra_at=1)   # the extras join the ReLU's input
    after = Sequential([Linear(4, 5, backend, rng), ReLU(backend), Linear(7, 3, backend, rng),
                        ReLU(backend)], backend, extra_features=2, extra_at=2)
    return [(enc, rng.standard_normal((3, 8 * 12 + 3))),
            (dec, rng.standard_normal((3, 2 + 3))),
            (cut, rng.standard_normal((3, 4 + 2))), (after, rng.standard_normal((3, 4 + 2)))]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("input_grad", [True, False])
def test_fused_pairs_give_the_layers_own_bits(monkeypatch, dtype, input_grad):
    """Sequential runs a Linear or Conv2d and the ReLU after it as one op (layers.
    FUSED_FORWARDS), the backward of a Linear and its ReLU, of a ReLU and the MaxPool2d
    after it and of an Upsample and the Conv2d after it (FUSED_BACKWARDS), never across
    the layer that takes the extras: outputs, dx, every gradient and the caches are the
    bits of the layers run one by one (the registries emptied), and the fused ops do run."""
    from vae_np import layers
    backend = get_backend("numpy", dtype=dtype)
    runs = []
    for registries in ("fused", "one by one"):
        if registries == "one by one":
            monkeypatch.setattr(layers, "FUSED_FORWARDS", {})
            monkeypatch.setattr(layers, "FUSED_BACKWARDS", {})
        else:
            counts = {}
            for table in (layers.FUSED_FORWARDS, layers.FUSED_BACKWARDS):
                for pair, fused in table.items():
                    def counted(*args, _fused=fused, _key=(id(table), pair)):
                        counts[_key] = counts.get(_key, 0) + 1
                        return _fused(*args)
                    monkeypatch.setitem(table, pair, counted)
        results = []
        for net, x in _networks_with_pairs(backend):
            jitter_biases(net, backend)
            x = x.astype(dtype)
            out = net.forward(x)
            caches = [layer.cache for layer in net.layers if isinstance(layer, ReLU)]
            dout = np.random.default_rng(2).standard_normal(out.shape).astype(dtype)
            dx = net.backward(dout, input_grad=input_grad)
            results.append([out, *caches, *([dx] if input_grad else []),
                            *(layer.grads[key].copy() for _, layer, key in net.named_parameters())])
        runs.append(results)
    fused_kinds = {pair for _, pair in counts}
    assert {(Conv2d, ReLU), (Linear, ReLU), (ReLU, MaxPool2d), (Upsample, Conv2d)} <= fused_kinds
    for fused_net, plain_net in zip(*runs):
        assert len(fused_net) == len(plain_net)
        for a, b in zip(fused_net, plain_net):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}"))


def test_sequential_of_linears_is_the_mlp(np64):
    """A Sequential of the MLP's layers computes the MLP's bits (the reference path)."""
    mlp = MLP((5, 4, 3), np64, np.random.default_rng(0))
    seq = Sequential([Linear(5, 4, np64, np.random.default_rng(0)), ReLU(np64),
                      Linear(4, 3, np64, np.random.default_rng(0), init="glorot")], np64)
    seq.layers[2].params["W"][...] = mlp.linears[1].params["W"]
    x = np.random.default_rng(15).standard_normal((3, 5))
    np.testing.assert_array_equal(seq.forward(x), mlp.forward(x))
    assert [n for n, _, _ in seq.named_parameters()] == \
        [n for n, _, _ in mlp.named_parameters()]


@pytest.mark.parametrize("call, message", [
    (lambda b: conv_encoder((28, 30), 2, b, np.random.default_rng(0)), "multiples of 4"),
    (lambda b: conv_encoder((28,), 2, b, np.random.default_rng(0)), "image_shape: expected"),
    (lambda b: conv_encoder((28, 28, 0), 2, b, np.random.default_rng(0)), "image_shape"),
    (lambda b: conv_encoder((28, 28), 0, b, np.random.default_rng(0)), "latent_dim"),
    (lambda b: conv_encoder((28, 28), 2, b, np.random.default_rng(0), channels=(3,)),
     "channels: expected two"),
    (lambda b: conv_decoder((28, 28), 2, b, np.random.default_rng(0), outputs_per_pixel=0),
     "outputs_per_pixel"),
    (lambda b: conv_encoder((28, 28), 2, b, np.random.default_rng(0), extra_features=-1),
     "extra_features"),
    (lambda b: Sequential([ReLU(b)], b, extra_features=2), "extra_at"),
])
def test_bad_arguments(np64, call, message):
    with pytest.raises(ValueError, match=message):
        call(np64)


def test_bad_input_shapes_are_named(np64):
    enc = conv_encoder((8, 12), 2, np64, np.random.default_rng(0), extra_features=2, **SMALL)
    with pytest.raises(ValueError, match=r"x: expected shape \(N, D \+ 2\)"):
        enc.forward(np.zeros((2, 8, 12)))
    enc = conv_encoder((8, 12), 2, np64, np.random.default_rng(0), **SMALL)
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 96\)"):
        enc.forward(np.zeros((2, 95)))
    with pytest.raises(TypeError, match="layers: expected a non-empty sequence"):
        Sequential([], np64)


def test_array_api_strict_runs_the_references(strict64):
    enc, dec = conv_networks((8, 12), 2, 2, strict64, np.random.default_rng(0), **SMALL)
    np64 = get_backend("numpy", "float64")
    enc_np, dec_np = conv_networks((8, 12), 2, 2, np64, np.random.default_rng(0), **SMALL)
    x = np.random.default_rng(16).uniform(size=(2, 96))
    np.testing.assert_allclose(strict64.to_numpy(enc.forward(strict64.asarray(x))),
                               enc_np.forward(x), rtol=1e-12, atol=1e-13)
    z = np.random.default_rng(17).standard_normal((2, 2))
    np.testing.assert_allclose(strict64.to_numpy(dec.forward(strict64.asarray(z))),
                               dec_np.forward(z), rtol=1e-12, atol=1e-13)


@pytest.mark.gpu
@pytest.mark.parametrize("outputs", [1, 2])
def test_cupy_networks_match_numpy_and_pass_the_directional_check(outputs, record_check):
    """The CuPy twins through the whole networks: the NumPy reference's outputs and
    gradients (float64, reordered sums: 1e-10 relative), and a directional check."""
    cp64 = get_backend("cupy", "float64")
    np64 = get_backend("numpy", "float64")
    nets = {b.name: conv_networks((4, 8, 3), 2, outputs, b, np.random.default_rng(0),
                                  extra_features=3, **SMALL) for b in (cp64, np64)}
    x = np.random.default_rng(18).uniform(size=(3, 96 + 3))
    for k, (enc, enc_np) in enumerate(((nets["cupy"][0], nets["numpy"][0]),
                                       (nets["cupy"][1], nets["numpy"][1]))):
        inp = x if k == 0 else np.random.default_rng(19).standard_normal((3, 5))
        out_np = enc_np.forward(inp)
        dout = np.random.default_rng(20).standard_normal(out_np.shape)
        dx_np = enc_np.backward(dout)
        out = enc.forward(cp64.asarray(inp))
        dx = enc.backward(cp64.asarray(dout))
        np.testing.assert_allclose(cp64.to_numpy(out), out_np, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(cp64.to_numpy(dx), dx_np, rtol=1e-10, atol=1e-12)
        for (_, layer, key), (_, layer_np, _) in zip(enc.named_parameters(),
                                                     enc_np.named_parameters()):
            np.testing.assert_allclose(cp64.to_numpy(layer.grads[key]), layer_np.grads[key],
                                       rtol=1e-10, atol=1e-12)
        check_network(enc, inp, cp64, record_check, "networks on cupy", max_entries=4)
