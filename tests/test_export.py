"""vae_np.interop checked by the real clients: ONNX Runtime runs the exported graphs,
safetensors reads the files, PyTorch loads the state_dicts into a re-creation of the
starting example's classes; and what is not a state_dict of that layout is refused, on one
line, naming what differs. Each client is skipped where it is not installed."""

from __future__ import annotations

import io
import json
import math
import pickle
import sys
import zipfile

import numpy as np
import pytest

from helpers import assert_within, jitter_biases, rounding_bound, unit_roundoff
from vae_np import VAE, load_model, reparameterize, save_model
from vae_np.cli import main
from vae_np.interop import (ImportedModel, TorchFormatError, export_model, import_model,
                            onnx_paths, read_state_dict, to_torch_layout, write_state_dict)

SMALL = dict(input_dim=12, hidden=(7, 5), latent_dim=3)


def small_model(decoder="bernoulli", activation="relu", num_classes=None, dtype="float64",
                seed=1, **kw):
    model = VAE(**{**SMALL, **kw}, decoder=decoder, activation=activation,
                num_classes=num_classes, dtype=dtype, seed=seed)
    return jitter_biases(model, seed, scale=0.3)     # zero biases would hide a lost bias


# ------------------------------------------------------------------------------------------
# ONNX: ONNX Runtime runs both graphs


ONNX_CASES = ([(dec, "relu", k) for dec in ("bernoulli", "gaussian", "gaussian-fixed")
               for k in (None, 3)]
              + [("bernoulli", act, None) for act in ("leaky_relu", "tanh", "sigmoid",
                                                      "softplus")]
              + [("gaussian", "softplus", 3)])


def sessions(tmp_path, model):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    paths = export_model(model, tmp_path / "vae.onnx", "onnx")
    assert paths == list(onnx_paths(tmp_path / "vae.onnx"))
    assert [p.name for p in paths] == ["vae.encoder.onnx", "vae.decoder.onnx"]
    for path in paths:
        onnx.checker.check_model(str(path), full_check=True)    # the file as written
    return [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in paths]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("decoder,activation,num_classes", ONNX_CASES)
def test_onnx_runtime_runs_both_graphs_as_vae_np(tmp_path, decoder, activation, num_classes,
                                                  dtype):
    model = small_model(decoder, activation, num_classes, dtype, input_shift=0.25)
    enc, dec = sessions(tmp_path, model)
    rng = np.random.default_rng(0)
    # a few rows of large inputs put the activations far into their tails
    x = np.concatenate([rng.random((5, 12)), 40 * rng.standard_normal((2, 12))]).astype(dtype)
    labels = rng.integers(0, 3, len(x))
    extra, feed = {}, {}
    if num_classes:
        extra, feed = {"y": labels}, {"y": np.eye(3, dtype=dtype)[labels]}
    assert [i.name for i in enc.get_inputs()] == ["x", *feed]
    mu, logvar = enc.run(["mu", "logvar"], {"x": x, **feed})
    assert mu.dtype == logvar.dtype == np.dtype(dtype)
    eps = unit_roundoff(dtype)
    h_in = np.concatenate([x, feed["y"]], axis=1) if num_classes else x
    shift = np.r_[np.full(12, 0.25), np.zeros(3)] if num_classes else 0.25
    bound = rounding_bound(model.encoder, h_in, eps, shift)
    ref_mu, ref_logvar = (model.backend.to_numpy(a) for a in model.encode(x, **extra))
    assert_within(mu, ref_mu, bound[:, :3], "mu")
    assert_within(logvar, ref_logvar, bound[:, 3:], "logvar")

    z = rng.standard_normal((len(x), 3)).astype(dtype)
    names = {"bernoulli": ["logits"], "gaussian": ["mean", "logvar"],
             "gaussian-fixed": ["mean"]}[decoder]
    assert [o.name for o in dec.get_outputs()] == names
    outs = np.concatenate(dec.run(names, {"z": z, **feed}), axis=1)
    z_in = np.concatenate([z, feed["y"]], axis=1) if num_classes else z
    ref = model.backend.to_numpy(model.decoder_outputs(z, **extra))
    assert_within(outs, ref, rounding_bound(model.decoder, z_in, eps), "decoder outputs")


def test_onnx_the_starting_configuration_in_float32(tmp_path):
    """784-512-512-64: fan-ins of 512 and 784, where float32's rounding is largest."""
    model = jitter_biases(VAE(seed=2), 2)
    enc, dec = sessions(tmp_path, model)
    x = np.random.default_rng(1).random((16, 784), dtype=np.float32)
    mu, logvar = enc.run(None, {"x": x})
    bound = rounding_bound(model.encoder, x, unit_roundoff(np.float32), 0.5)
    ref = np.concatenate([model.backend.to_numpy(a) for a in model.encode(x)], axis=1)
    assert_within(np.concatenate([mu, logvar], axis=1), ref, bound, "encoder")
    (logits,) = dec.run(None, {"z": mu})
    ref = model.backend.to_numpy(model.decoder_outputs(mu))
    assert_within(logits, ref, rounding_bound(model.decoder, mu, unit_roundoff(np.float32)),
                  "logits")
    assert np.max(bound) < 1e-2       # the bound is tight enough to mean something here


def test_onnx_graphs_name_the_parameters_and_carry_the_configuration(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    model = small_model("gaussian-fixed", "leaky_relu", 3, "float32", variance=0.2)
    enc_path, dec_path = export_model(model, tmp_path / "m", "onnx")
    enc = onnx.load(str(enc_path))
    inits = {i.name: numpy_helper.to_array(i) for i in enc.graph.initializer}
    state = model.state_dict()
    for name in ("encoder.linear0.W", "encoder.linear2.b"):
        assert np.array_equal(inits[name], state[name])
    assert {op.op_type for op in enc.graph.node} >= {"Sub", "Concat", "MatMul", "Add",
                                                     "LeakyRelu", "Split"}
    props = {p.key: p.value for p in onnx.load(str(dec_path)).metadata_props}
    assert props["vae_np.part"] == "decoder"
    assert json.loads(props["vae_np.model_config"]) == model.config


def test_onnx_export_without_the_package_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)       # import onnx now fails
    with pytest.raises(ImportError, match=r"pip install 'vae_np\[export\]'"):
        export_model(small_model(), tmp_path / "m.onnx", "onnx")
    save_model(small_model(), tmp_path / "m.npz")
    assert main(["export", str(tmp_path / "m.npz"), "--format", "onnx",
                 "--out", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vae_np[export]" in err
    assert not list(tmp_path.glob("*.onnx"))


# ------------------------------------------------------------------------------------------
# safetensors: the file is exact, and readable without vae_np


def test_safetensors_round_trip_is_exact(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    model = small_model("gaussian-fixed", "tanh", 3, "float64", variance=0.3, input_shift=0.1)
    data = {"image_shape": [3, 4], "binarize": "none", "source": "a test"}
    (path,) = export_model(model, tmp_path / "m.safetensors", "safetensors", data=data)
    tensors = st.load_file(str(path))
    state = model.state_dict()
    assert sorted(tensors) == sorted(state)         # vae_np's names, documented
    for name, value in state.items():
        assert tensors[name].dtype == value.dtype and np.array_equal(tensors[name], value), name
    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata()
    assert meta["format"] == "vae_np safetensors"
    assert json.loads(meta["model_config"]) == model.config
    assert json.loads(meta["data"]) == data

    imported = import_model(path)
    assert imported.source == "vae_np safetensors" and imported.data == data
    assert imported.image_shape == (3, 4)
    back = imported.model
    assert back.config == model.config
    for name, value in back.state_dict().items():
        assert np.array_equal(value, state[name]), name
    x = np.random.default_rng(0).random((4, 12))
    y = np.array([0, 2, 1, 0])
    for a, b in zip(model.encode(x, y=y), back.encode(x, y=y)):
        assert np.array_equal(a, b)


# ------------------------------------------------------------------------------------------
# The torch layout and file format, without torch


def expected_torch_names(layers):
    names = [f"encoder.base.{2 * i + 1}.{p}" for i in range(layers) for p in ("weight", "bias")]
    names += [f"encoder.{h}.{p}" for h in ("mu", "logvar") for p in ("weight", "bias")]
    return names + [f"decoder.base.{2 * i}.{p}" for i in range(layers + 1)
                    for p in ("weight", "bias")]


def test_torch_layout_of_the_starting_configuration():
    model = VAE()                                  # 784-512-512, latent 64
    layout = to_torch_layout(model)
    assert list(layout) == expected_torch_names(2)
    shapes = {n: v.shape for n, v in layout.items()}
    assert shapes["encoder.base.1.weight"] == (512, 784)
    assert shapes["encoder.base.3.weight"] == (512, 512)
    assert shapes["encoder.mu.weight"] == shapes["encoder.logvar.weight"] == (64, 512)
    assert shapes["decoder.base.0.weight"] == (512, 64)
    assert shapes["decoder.base.4.weight"] == (784, 512)
    state = model.state_dict()
    w = state["encoder.linear2.W"]                 # (512, 128): [mu | logvar] columns
    assert np.array_equal(layout["encoder.mu.weight"], w[:, :64].T)
    assert np.array_equal(layout["encoder.logvar.weight"], w[:, 64:].T)
    assert np.array_equal(layout["decoder.base.2.weight"], state["decoder.linear1.W"].T)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("decoder", ["bernoulli", "gaussian"])
def test_torch_file_round_trip_without_torch_is_exact(tmp_path, dtype, decoder):
    model = small_model(decoder, dtype=dtype)
    (path,) = export_model(model, tmp_path / "m.pt", "torch")
    tensors = read_state_dict(path)
    layout = to_torch_layout(model)
    assert list(tensors) == list(layout)
    for name, value in layout.items():
        assert tensors[name].dtype == np.dtype(dtype) and np.array_equal(tensors[name], value)
    imported = import_model(path, input_shift=model.input_shift)
    assert imported.source == "torch"
    back = imported.model
    assert back.config["decoder"] == decoder and back.config["dtype"] == dtype
    assert {k: v for k, v in back.config.items() if k != "seed"} == \
        {k: v for k, v in model.config.items() if k != "seed"}
    for name, value in back.state_dict().items():
        assert np.array_equal(value, model.state_dict()[name]), name


def test_torch_format_keeps_every_shape_and_dtype(tmp_path):
    tensors = {"scalar": np.array(2.5), "empty": np.zeros((0, 3), np.float32),
               "half": np.arange(4, dtype=np.float16).reshape(2, 2),
               "ünïcode.name": np.linspace(0, 1, 7, dtype=np.float32)}
    back = read_state_dict(write_state_dict(tmp_path / "t.pt", tensors))
    assert list(back) == list(tensors)
    for name, value in tensors.items():
        assert back[name].shape == value.shape and back[name].dtype == value.dtype
        assert np.array_equal(back[name], value)
    with zipfile.ZipFile(tmp_path / "t.pt") as archive:   # storages start 64-byte aligned
        raw = (tmp_path / "t.pt").read_bytes()
        for info in archive.infolist():
            if "/data/" in info.filename:
                extra = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30],
                                       "little")
                assert (info.header_offset + 30 + len(info.filename) + extra) % 64 == 0


# ------------------------------------------------------------------------------------------
# With PyTorch: the starting example's classes, re-created (its reparameterisation fixed)


def example_vae(torch, c=784, hidden=(512, 512), d=64, per_pixel=1):
    """The starting example's modules (vae_np.interop.torch_layout's docstring), for any
    widths: Flatten and Linear/ReLU pairs, two heads; z = mu + exp(0.5 * logvar) * eps."""
    nn = torch.nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            layers = [nn.Flatten()]
            for a, b in zip((c, *hidden), hidden):
                layers += [nn.Linear(a, b), nn.ReLU()]
            self.base = nn.Sequential(*layers)
            self.mu = nn.Linear(hidden[-1], d)
            self.logvar = nn.Linear(hidden[-1], d)

        def forward(self, x):
            h = self.base(x)
            return self.mu(h), self.logvar(h)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            widths = (d, *reversed(hidden))
            layers = []
            for a, b in zip(widths, widths[1:]):
                layers += [nn.Linear(a, b), nn.ReLU()]
            self.base = nn.Sequential(*layers, nn.Linear(widths[-1], per_pixel * c))

        def forward(self, z):
            return self.base(z)

    class ExampleVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = Encoder(), Decoder()

        def forward(self, x, eps):
            mu, logvar = self.encoder(x)
            z = mu + torch.exp(0.5 * logvar) * eps           # not 0.5 ** logvar
            return self.decoder(z), mu, logvar

    return ExampleVAE()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_loads_the_export_into_the_starting_example(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    model = jitter_biases(VAE(dtype=dtype, seed=3), 3)      # the starting configuration
    (path,) = export_model(model, tmp_path / "vae.pt", "torch")
    state = torch.load(path, weights_only=True)
    net = example_vae(torch).to(getattr(torch, dtype))
    net.load_state_dict(state, strict=True)                  # every name and shape
    rng = np.random.default_rng(0)
    x = rng.random((8, 784)).astype(dtype)
    eps = rng.standard_normal((8, 64)).astype(dtype)
    with torch.no_grad():
        logits, mu, logvar = (t.numpy() for t in net(torch.from_numpy(x - 0.5),
                                                     torch.from_numpy(eps)))
    u = unit_roundoff(dtype)
    enc_bound = rounding_bound(model.encoder, x, u, 0.5)
    ref_mu, ref_logvar = (model.backend.to_numpy(a) for a in model.encode(x))
    assert_within(mu, ref_mu, enc_bound[:, :64], "mu")
    assert_within(logvar, ref_logvar, enc_bound[:, 64:], "logvar")
    z = np.asarray(reparameterize(ref_mu, ref_logvar, eps[None])[0])
    # z differs by what mu and logvar did (times 1 and |eps| exp(logvar / 2) / 2), plus
    # the roundings of exp, the product and the sum
    z_err = enc_bound[:, :64] + enc_bound[:, 64:] * 0.5 * np.abs(eps) * np.exp(0.5 * ref_logvar) \
        + 8 * u * (np.abs(z) + 1)
    ref_logits = model.backend.to_numpy(model.decoder_outputs(z))
    assert_within(logits, ref_logits, rounding_bound(model.decoder, z, u, err=z_err),
                  "logits")


@pytest.mark.parametrize("decoder", ["bernoulli", "gaussian"])
def test_an_imported_pytorch_model_gives_the_log_likelihood_pytorch_computes(tmp_path, decoder):
    torch = pytest.importorskip("torch")
    c, hidden, d, n, k = 20, (16, 12), 4, 6, 50
    torch.manual_seed(0)
    net = example_vae(torch, c, hidden, d, per_pixel=2 if decoder == "gaussian" else 1).double()
    torch.save(net.state_dict(), tmp_path / "theirs.pt")
    model = import_model(tmp_path / "theirs.pt").model
    assert model.config["decoder"] == decoder and model.config["dtype"] == "float64"
    assert (model.input_dim, model.hidden, model.latent_dim) == (c, hidden, d)

    rng = np.random.default_rng(1)
    x = (rng.random((n, c)) < 0.4).astype(np.float64)
    eps = model.backend.rng(7).normal((k, n, d))       # the noise vae_np's estimator draws
    ours = model.backend.to_numpy(model.log_likelihood(x, num_samples=k,
                                                       rng=model.backend.rng(7),
                                                       chunk_size=k))
    # PyTorch's own estimate with the same noise, from torch.distributions
    with torch.no_grad():
        xt, et = torch.from_numpy(x), torch.from_numpy(np.asarray(eps))
        mu, logvar = net.encoder(xt - 0.5)
        std = torch.exp(0.5 * logvar)
        z = mu + std * et                                            # (K, N, d)
        out = net.decoder(z)
        if decoder == "bernoulli":
            log_px = torch.distributions.Bernoulli(logits=out).log_prob(xt).sum(-1)
        else:
            mean, lv = out[..., :c], out[..., c:]
            log_px = torch.distributions.Normal(mean, torch.exp(0.5 * lv)).log_prob(xt).sum(-1)
        normal = torch.distributions.Normal
        log_w = log_px + normal(0.0, 1.0).log_prob(z).sum(-1) - normal(mu, std).log_prob(z).sum(-1)
        theirs = (torch.logsumexp(log_w, 0) - math.log(k)).numpy()
    # float64 both sides: the same terms summed in another order, ~1e-15 relative per term
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-10)
    assert np.all(np.isfinite(theirs)) and np.ptp(theirs) > 0


def test_a_safetensors_file_of_the_example_layout_imports(tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    torch.manual_seed(1)
    net = example_vae(torch, 9, (6,), 2)
    st.save_file(net.state_dict(), str(tmp_path / "theirs.safetensors"))
    imported = import_model(tmp_path / "theirs.safetensors", decoder="gaussian-fixed",
                            variance=0.5)
    assert imported.source == "safetensors" and imported.image_shape == (3, 3)
    model = imported.model
    assert model.config["variance"] == 0.5 and model.config["dtype"] == "float32"
    x = np.random.default_rng(0).random((3, 9)).astype(np.float32)
    with torch.no_grad():
        mu = net.encoder(torch.from_numpy(x - 0.5))[0].numpy()
    ref = model.backend.to_numpy(model.encode(x)[0])
    assert_within(mu, ref, rounding_bound(model.encoder, x, unit_roundoff(np.float32),
                                          0.5)[:, :2], "mu")


# ------------------------------------------------------------------------------------------
# What is refused, and how


def write_layout(tmp_path, tensors, name="sd.pt"):
    return write_state_dict(tmp_path / name, tensors)


def test_another_layout_names_what_differs(tmp_path):
    theirs = {"fc1.weight": np.zeros((5, 12)), "fc1.bias": np.zeros(5),
              "fc21.weight": np.zeros((3, 5)), "fc21.bias": np.zeros(3)}
    with pytest.raises(ValueError, match=r"not the starting example's layout.*missing "
                                         r"\['encoder\.mu\.weight'.*unexpected \['fc1\.bias'"):
        import_model(write_layout(tmp_path, theirs))


def test_a_missing_tensor_is_named(tmp_path):
    layout = to_torch_layout(small_model())
    del layout["encoder.logvar.bias"]
    with pytest.raises(ValueError, match=r"missing \['encoder\.logvar\.bias'\], unexpected \[\]"):
        import_model(write_layout(tmp_path, layout))


def test_a_misshapen_tensor_is_named_with_both_shapes(tmp_path):
    layout = to_torch_layout(small_model())
    layout["decoder.base.2.weight"] = np.zeros((7, 4))
    with pytest.raises(ValueError, match=r"\['decoder\.base\.2\.weight'\]: expected shape "
                                         r"\(7, 5\).*got \(7, 4\)"):
        import_model(write_layout(tmp_path, layout))
    layout = to_torch_layout(small_model())
    layout["decoder.base.4.weight"] = np.zeros((5, 7))       # neither c nor 2c outputs
    with pytest.raises(ValueError, match=r"outputs 5 values; the encoder takes c = 12"):
        import_model(write_layout(tmp_path, layout))
    layout = to_torch_layout(small_model())
    with pytest.raises(ValueError, match=r"decoder: 'gaussian' needs 24 decoder outputs"):
        import_model(write_layout(tmp_path, layout), decoder="gaussian")
    layout["encoder.mu.bias"] = np.array([np.nan, 0.0, 0.0])
    with pytest.raises(ValueError, match="contains NaN"):
        import_model(write_layout(tmp_path, layout))


def test_files_that_are_not_state_dicts_are_refused(tmp_path):
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(100))
    with pytest.raises(ValueError, match="not a PyTorch state_dict .* or a safetensors file"):
        import_model(tmp_path / "noise.pt")
    save_model(small_model(), tmp_path / "ours.npz")
    with pytest.raises(TorchFormatError, match="needs no import"):
        import_model(tmp_path / "ours.npz")
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"w": [1.0]}, protocol=2))
    with pytest.raises(TorchFormatError, match="legacy pre-1.6"):
        read_state_dict(legacy)
    with pytest.raises(FileNotFoundError):
        import_model(tmp_path / "absent.pt")


def zip_with_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/version", b"3\n")
    return path


def test_a_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    # builtins.open(marker, "w"): unpickled by a plain pickle, it creates the file
    payload = (pickle.PROTO + b"\x02" + pickle.GLOBAL + b"builtins\nopen\n"
               + pickle.BINUNICODE + len(str(marker).encode()).to_bytes(4, "little")
               + str(marker).encode() + pickle.BINUNICODE + b"\x01\x00\x00\x00w"
               + pickle.TUPLE2 + pickle.REDUCE + pickle.STOP)
    path = zip_with_pickle(tmp_path / "evil.pt", payload)
    with pytest.raises(TorchFormatError, match="refusing to unpickle builtins.open"):
        import_model(path)
    assert not marker.exists()
    pickle.loads(payload).close()         # the payload is live: a plain unpickler runs it
    assert marker.exists()


def test_whole_models_and_training_checkpoints_are_not_state_dicts(tmp_path):
    whole = zip_with_pickle(tmp_path / "whole.pt", pickle.PROTO + b"\x02" + pickle.GLOBAL
                            + b"torch.nn.modules.linear\nLinear\n" + pickle.EMPTY_TUPLE
                            + pickle.REDUCE + pickle.STOP)
    with pytest.raises(TorchFormatError, match="torch.nn.modules.linear.Linear"):
        read_state_dict(whole)
    buf = io.BytesIO()
    pickle.Pickler(buf, protocol=2).dump({"epoch": 3})
    with pytest.raises(TorchFormatError, match="entry 'epoch' is a int, not a tensor"):
        read_state_dict(zip_with_pickle(tmp_path / "ckpt.pt", buf.getvalue()))


def test_export_refuses_what_the_torch_layout_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="conditional.*no label input"):
        export_model(small_model(num_classes=3), tmp_path / "c.pt", "torch")
    with pytest.raises(ValueError, match="activation 'tanh'.*ReLU"):
        export_model(small_model(activation="tanh"), tmp_path / "t.pt", "torch")
    with pytest.raises(ValueError, match="format: expected one of onnx, safetensors, torch"):
        export_model(small_model(), tmp_path / "m.x", "keras")
    with pytest.raises(TypeError, match="model: expected a vae_np.VAE"):
        export_model({"w": 1}, tmp_path / "m.pt", "torch")
    assert list(tmp_path.iterdir()) == []


def test_a_vae_np_safetensors_file_refuses_settings_it_already_has(tmp_path):
    pytest.importorskip("safetensors")
    (path,) = export_model(small_model(), tmp_path / "m.safetensors", "safetensors")
    with pytest.raises(ValueError, match="decoder: .* leave them out"):
        import_model(path, decoder="gaussian")


# ------------------------------------------------------------------------------------------
# vae-np export / import, and the subcommands on an imported model


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_export_import_and_use(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x_train=rng.random((20, 16)).astype(np.float32),
             x_test=rng.random((6, 16)).astype(np.float32))
    save_model(VAE(input_dim=16, hidden=(8,), latent_dim=2, seed=4), tmp_path / "m.npz",
               image_shape=(4, 4))
    code, out, err = run(capsys, "export", tmp_path / "m.npz", "--format", "torch",
                         "--out", tmp_path / "m.pt")
    assert code == 0, err
    code, out, err = run(capsys, "import", tmp_path / "m.pt", "--out", tmp_path / "back.npz")
    assert code == 0 and "16-8-2" in out, err
    back, orig = load_model(tmp_path / "back.npz"), load_model(tmp_path / "m.npz")
    for name, value in orig.state_dict().items():
        assert np.array_equal(back.state_dict()[name], value)
    for argv in (["eval", "--dataset", tmp_path / "data.npz", "-K", "4"],
                 ["sample", "--n", "4", "--out", tmp_path / "s.png"],
                 ["interpolate", "--dataset", tmp_path / "data.npz", "--pairs", "1",
                  "--steps", "3", "--out", tmp_path / "i.png"]):
        code, out, err = run(capsys, argv[0], tmp_path / "back.npz", *argv[1:])
        assert code == 0, err
    assert (tmp_path / "s.png").stat().st_size > 0


def test_cli_errors_are_one_line_with_status_1(tmp_path, capsys):
    save_model(small_model(num_classes=3), tmp_path / "cond.npz")
    code, _, err = run(capsys, "export", tmp_path / "cond.npz", "--format", "torch",
                       "--out", tmp_path / "c.pt")
    assert code == 1 and err.count("\n") == 1 and "no label input" in err
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    code, _, err = run(capsys, "import", tmp_path / "junk.pt", "--out", tmp_path / "o.npz")
    assert code == 1 and err.count("\n") == 1 and "not a PyTorch state_dict" in err
    code, _, err = run(capsys, "export", tmp_path / "junk.pt", "--format", "onnx",
                       "--out", tmp_path / "j.onnx")
    assert code == 1 and err.count("\n") == 1
    assert not (tmp_path / "o.npz").exists() and not (tmp_path / "c.pt").exists()


def test_imported_model_image_shape_guess():
    assert ImportedModel(VAE(), "torch").image_shape == (28, 28)
    assert ImportedModel(small_model(), "torch").image_shape is None


def test_cli_export_and_import_never_write_over_their_input(tmp_path, capsys):
    """#19 item 1 for the interop subcommands: an --out that is the file read is refused
    before any work, and the file is left as it was; import writes .npz or nothing."""
    save_model(small_model(), tmp_path / "m.npz")
    before = (tmp_path / "m.npz").read_bytes()
    code, _, err = run(capsys, "export", tmp_path / "m.npz", "--format", "safetensors",
                       "--out", tmp_path / "m.npz")
    assert code == 1 and err.count("\n") == 1 and "--out" in err and "checkpoint" in err, err
    code, _, err = run(capsys, "export", tmp_path / "m.npz", "--format", "torch",
                       "--out", tmp_path / "m.pt")
    assert code == 0, err
    pt = (tmp_path / "m.pt").read_bytes()
    code, _, err = run(capsys, "import", tmp_path / "m.pt", "--out", tmp_path / "m.pt")
    assert code == 1 and err.count("\n") == 1 and "--out" in err, err
    code, _, err = run(capsys, "import", tmp_path / "m.pt", "--out", tmp_path / "back.pt")
    assert code == 1 and ".npz" in err and not (tmp_path / "back.pt").exists(), err
    assert (tmp_path / "m.npz").read_bytes() == before and (tmp_path / "m.pt").read_bytes() == pt


# ------------------------------------------------------------------------------------------
# The conv architecture: safetensors keeps it; ONNX and the torch layout do not map it yet

CONV = dict(architecture="conv", image_shape=(8, 8, 3), channels=(2, 3), hidden=(5,),
            latent_dim=3)


@pytest.mark.parametrize("decoder, num_classes, channels",
                         [("bernoulli", None, 1), ("gaussian", 3, 3), ("gaussian-fixed", 3, 1)])
def test_onnx_runtime_runs_the_conv_graphs_as_vae_np(tmp_path, decoder, num_classes, channels):
    """float32 against vae_np: both sum the same products (at most 3 * 3 * C_in, or a dense
    layer's dozen, per output) in other orders; the unit roundoff 6e-8 times a few dozen
    terms of size O(1) is ~2e-6, so 1e-5 (absolute and relative) has a margin of 5."""
    shape = (8, 8) if channels == 1 else (8, 8, channels)
    variance = 0.3 if decoder == "gaussian-fixed" else None
    model = jitter_biases(VAE(**{**CONV, "image_shape": shape}, decoder=decoder,
                              num_classes=num_classes, variance=variance, seed=2))
    enc, dec = sessions(tmp_path, model)
    rng = np.random.default_rng(0)
    x = rng.random((5, 64 * channels)).astype(np.float32)
    labels = rng.integers(0, 3, 5)
    extra, feed = {}, {}
    if num_classes:
        extra, feed = {"y": labels}, {"y": np.eye(3, dtype=np.float32)[labels]}
    for got, want in zip(enc.run(["mu", "logvar"], {"x": x, **feed}), model.encode(x, **extra)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    z = rng.standard_normal((5, 3)).astype(np.float32)
    outs = np.concatenate(dec.run(None, {"z": z, **feed}), axis=1)
    np.testing.assert_allclose(outs, model.decoder_outputs(z, **extra), rtol=1e-5, atol=1e-5)
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(tmp_path / "vae.encoder.onnx")).graph
    names = {i.name for i in graph.initializer if i.name.endswith((".W", ".b"))}
    assert names == {n for n in model.state_dict() if n.startswith("encoder.")}


def test_conv_export_refuses_the_torch_layout_and_writes_onnx_in_both_dtypes(tmp_path, capsys):
    model = VAE(**CONV, dtype="float64")
    with pytest.raises(ValueError, match="architecture 'conv'.*onnx or safetensors"):
        export_model(model, tmp_path / "c.pt", "torch")
    save_model(model, tmp_path / "conv.npz")
    code, _, err = run(capsys, "export", tmp_path / "conv.npz", "--format", "torch",
                       "--out", tmp_path / "c.pt")
    assert code == 1 and err.count("\n") == 1 and "'conv'" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.npz"]   # nothing written
    for dtype in ("float64", "float32"):   # float64: Conv as im2col MatMul (test_export_conv)
        code, _, err = run(capsys, "export", tmp_path / "conv.npz", "--format", "onnx",
                           "--dtype", dtype, "--out", tmp_path / f"c{dtype}.onnx")
        assert code == 0, err


def test_a_conditional_conv_model_round_trips_through_safetensors_exactly(tmp_path):
    pytest.importorskip("safetensors")
    model = VAE(**CONV, num_classes=2, decoder="gaussian", dtype="float64", seed=3)
    (path,) = export_model(model, tmp_path / "c.safetensors", "safetensors")
    imported = import_model(path)
    back = imported.model
    assert back.config == model.config and back.architecture == "conv"
    assert imported.image_shape == (8, 8, 3)                # the model's own
    x = np.random.default_rng(0).random((4, 192))
    y = np.array([0, 1, 1, 0])
    for a, b in zip(model.encode(x, y=y), back.encode(x, y=y)):
        assert np.array_equal(a, b)
    z = np.random.default_rng(1).standard_normal((4, 3))
    assert np.array_equal(model.decode(z, y=y), back.decode(z, y=y))
