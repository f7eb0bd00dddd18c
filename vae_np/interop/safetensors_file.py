"""A VAE as one safetensors file: every parameter under vae_np's own name, the
configuration in the metadata. ``safetensors.numpy.load_file`` reads it without vae_np.

Tensors (float32 or float64, as the model), for an MLP with L hidden layers:

    encoder.linear{i}.W (D_in, D_out), encoder.linear{i}.b (D_out,)   i = 0..L
    decoder.linear{i}.W, decoder.linear{i}.b                          i = 0..L

``y = x W + b`` (W is (in, out), torch's weight transposed). The convolutional networks
(``vae_np.networks.Sequential``) name theirs by layer kind and count, as
``named_parameters`` does: ``encoder.conv2d{i}.W`` (C_out, C_in, kh, kw), ``.b`` (C_out,),
``encoder.linear{i}.W`` (D_in, D_out), ``decoder.conv2d{i}.W``, ... The encoder's input is
x - input_shift (and, for a conditional model, the one-hot label appended: D_in = c + K);
its last layer outputs [mu, logvar] side by side (2d). The decoder's input is z (with
the one-hot label appended); its outputs are the decoder distribution's parameters (c
logits; c means; or c means then c log-variances).

Metadata (string to string, as the format requires):

    format           "vae_np safetensors"
    format_version   "1"
    model_config     JSON of VAE.config (input_dim, hidden, latent_dim, decoder, ...)
    data             JSON of what inference needs of the data (image_shape, binarize, ...)
    vae_np_version   the writer's version
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_write
from ..model import VAE
from .common import check_model, require

__all__ = ["FORMAT", "read_safetensors", "write_safetensors"]

FORMAT = "vae_np safetensors"
FORMAT_VERSION = "1"


def write_safetensors(model: VAE, path: str | os.PathLike, data: dict | None = None) -> Path:
    """Write ``model`` to ``path`` atomically (module docstring); ``data``: a JSON-able
    summary of the training data (``SavedModel.data``) kept in the metadata."""
    st = require("safetensors.numpy", "safetensors export")
    check_model(model)
    import vae_np  # the version; here, not at the top: the package imports this module

    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "model_config": json.dumps(model.config),
                "data": json.dumps(data or {}), "vae_np_version": vae_np.__version__}
    payload = st.save(model.state_dict(), metadata=metadata)
    return atomic_write(path, lambda fh: fh.write(payload))


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of any safetensors file, read with the safetensors package."""
    st = require("safetensors", "safetensors import")
    try:
        with st.safe_open(str(path), framework="numpy") as fh:
            metadata = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (st.SafetensorError, OSError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors, dict(metadata)


def is_ours(metadata: dict[str, str]) -> bool:
    return metadata.get("format") == FORMAT


def model_from_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str],
                           backend="numpy", dtype: str | None = None) -> tuple[VAE, dict]:
    """The :class:`VAE` of one of our files, and its data summary. ``dtype``: default the
    file's. Raises ValueError naming the field or tensor that does not fit."""
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {metadata.get('format_version')!r}: this "
                         f"vae_np reads {FORMAT_VERSION!r}")
    try:
        config = json.loads(metadata["model_config"])
        data = json.loads(metadata.get("data", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: metadata model_config / data: expected JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(data, dict):
        raise ValueError(f"{path}: metadata model_config and data: expected JSON objects")
    config = dict(config)
    file_dtype = config.pop("dtype", None)
    try:
        model = VAE(**config, dtype=dtype or file_dtype, backend=backend)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: metadata model_config: {exc}") from None
    try:
        model.load_state_dict(tensors)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: tensors do not fit metadata model_config: {exc}") from None
    return model, data
