"""save_model / load_model: model-only exports and trainer checkpoints, bit for bit on
every backend available here, and one clear error per kind of bad file."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from vae_np import load_model, save_model
from vae_np.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vae_np.saving import MODEL_FORMAT, TRAINER_FORMAT, read_model

from helpers import tiny_vae


# this file's models: 12-8-3, zero biases (trained() moves every parameter)
tiny = partial(tiny_vae, input_dim=12, hidden=(8,), latent_dim=3, seed=3, jitter=False)


def trained(model):
    """Parameters that differ from a fresh model's (so a load that re-initialises fails)."""
    data = model.parameters.data
    data[...] = data + 0.01 * model.backend.asarray(np.arange(data.shape[0]) % 7)
    return model


@pytest.mark.parametrize("backend", ["numpy", "array_api_strict"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_is_bitwise(tmp_path, backend, dtype):
    pytest.importorskip(backend)
    model = trained(tiny(dtype=dtype, decoder="gaussian", num_classes=4))
    save_model(model, tmp_path / "m.npz", image_shape=(3, 4))
    back = load_model(tmp_path / "m.npz", backend=backend)
    assert back.backend.name == backend and back.backend.dtype_name == dtype
    assert back.config == model.config
    for name, value in model.state_dict().items():
        got = back.state_dict()[name]
        assert got.dtype == value.dtype and np.array_equal(got.view(np.uint8), value.view(np.uint8))
    saved = read_model(tmp_path / "m.npz")
    assert saved.image_shape == (3, 4) and saved.kind == "model" and saved.num_classes == 4


def test_dtype_override_and_unchanged_file(tmp_path):
    model = trained(tiny())
    save_model(model, tmp_path / "m.npz")
    assert load_model(tmp_path / "m.npz", dtype="float32").backend.dtype_name == "float32"
    arrays, meta = load_checkpoint(tmp_path / "m.npz")
    assert meta["format"] == MODEL_FORMAT and all(k.startswith("model/") for k in arrays)


def test_loads_a_trainer_checkpoint(tmp_path):
    from vae_np.train import CHECKPOINT_FORMAT

    assert TRAINER_FORMAT == CHECKPOINT_FORMAT   # saving.py does not import the trainer
    model = trained(tiny())
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    arrays["optimizer/t"] = np.asarray(3)
    save_checkpoint(tmp_path / "c.npz", arrays, {"format": CHECKPOINT_FORMAT,
                                                 "model_config": model.config,
                                                 "data": {"source": "x.npz"}})
    back = read_model(tmp_path / "c.npz")
    assert back.kind == "trainer" and back.image_shape is None   # 12 is no square
    assert all(np.array_equal(back.model.state_dict()[k], v)
               for k, v in model.state_dict().items())


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="a directory"):
        load_model(tmp_path)


def test_corrupt_file(tmp_path):
    save_model(trained(tiny()), tmp_path / "m.npz")
    raw = bytearray((tmp_path / "m.npz").read_bytes())
    raw[200] ^= 0xFF
    (tmp_path / "m.npz").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="m.npz"):
        load_model(tmp_path / "m.npz")
    (tmp_path / "t.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="t.npz"):
        load_model(tmp_path / "t.npz")


@pytest.mark.parametrize("meta, match", [
    ({"format": "something else", "model_config": {}}, "not a vae_np model"),
    ({"format": MODEL_FORMAT}, "model_config: expected a dict"),
    ({"format": MODEL_FORMAT, "model_config": {"input_dim": 12, "wings": 2}},
     r"fields \['wings'\]"),
    ({"format": MODEL_FORMAT, "model_config": {"input_dim": 12, "latent_dim": 0}},
     "model_config: latent_dim"),
    ({"format": MODEL_FORMAT, "model_config": {"input_dim": 13, "hidden": [8],
                                               "latent_dim": 3}}, "do not fit"),
    ({"format": MODEL_FORMAT, "model_config": {"input_dim": 12, "hidden": [8],
                                               "latent_dim": 3, "seed": 3},
      "data": {"image_shape": [5, 5]}}, "data.image_shape"),
])
def test_incompatible_metadata_names_the_field(tmp_path, meta, match):
    arrays = {f"model/{k}": v for k, v in tiny(dtype="float32").state_dict().items()}
    save_checkpoint(tmp_path / "m.npz", arrays, meta)
    with pytest.raises(CheckpointError, match=match):
        load_model(tmp_path / "m.npz")


def test_save_checks_its_arguments(tmp_path):
    with pytest.raises(TypeError, match="model"):
        save_model("model", tmp_path / "m.npz")
    with pytest.raises(ValueError, match="image_shape"):
        save_model(tiny(), tmp_path / "m.npz", image_shape=(5, 5))
