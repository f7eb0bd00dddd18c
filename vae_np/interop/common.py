"""What the exporters share: the optional packages, a model's architecture, host copies
of parameters, and the checks every importer makes of the tensors it is given."""

from __future__ import annotations

import importlib

import numpy as np

from ..model import VAE

#: The pip extra that brings the packages of the ONNX and safetensors formats.
EXTRA = "export"


def require(package: str, why: str):
    """Import ``package`` (onnx, onnxruntime, safetensors.numpy) or raise an ImportError
    that names the extra to install; vae_np itself does not depend on these packages."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ImportError(f"{why} needs the {package.split('.')[0]} package: "
                          f"pip install 'vae_np[{EXTRA}]'") from None


def check_model(model) -> VAE:
    if not isinstance(model, VAE):
        raise TypeError(f"model: expected a vae_np.VAE, got {type(model).__name__}")
    return model


def architecture(model: VAE) -> str:
    """The network family of ``model``: ``config["architecture"]``, ``mlp`` when absent (the
    MLP models written before there was a choice)."""
    return model.config.get("architecture", "mlp")


def host_params(layer) -> dict[str, np.ndarray]:
    """A layer's parameters as host NumPy arrays of its backend's dtype."""
    return {k: np.asarray(layer.backend.to_numpy(v)) for k, v in layer.params.items()}


def float_dtype(tensors: dict[str, np.ndarray], dtype: str | None, where: str) -> str:
    """The dtype an imported model gets: ``dtype`` when given, else float64 when every
    tensor is float64 and float32 otherwise (float16 widens to float32)."""
    if dtype is not None:
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype: expected float32 or float64, got {dtype!r}")
        return dtype
    kinds = {np.asarray(v).dtype for v in tensors.values()}
    for name, value in tensors.items():
        if not np.issubdtype(np.asarray(value).dtype, np.floating):
            raise ValueError(f"{where}[{name!r}]: expected a floating-point tensor, got "
                             f"{np.asarray(value).dtype}")
    return "float64" if kinds == {np.dtype("float64")} else "float32"
