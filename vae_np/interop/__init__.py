"""A vae_np model in the formats other tools read: ONNX, safetensors, PyTorch; and back.

    from vae_np import load_model, save_model
    from vae_np.interop import export_model, import_model

    model = load_model("results/checkpoint.npz")
    export_model(model, "vae.onnx", "onnx")          # vae.encoder.onnx, vae.decoder.onnx
    export_model(model, "vae.safetensors", "safetensors")
    export_model(model, "vae.pt", "torch")           # the starting example's state_dict
    imported = import_model("their_vae.pt")          # a state_dict of that layout
    save_model(imported.model, "their_vae.npz")      # vae-np eval / sample / ... run on it

The command line is the same: ``vae-np export CHECKPOINT --format onnx --out vae.onnx``
and ``vae-np import their_vae.pt --out their_vae.npz``.

The formats, each documented in its module:

- ``onnx`` (:mod:`.onnx_graphs`): two models, the encoder x [, y] -> (mu, logvar) and the
  decoder z [, y] -> the decoder distribution's parameters, built with ``onnx.helper``
  and checked with ``onnx.checker``; any model vae_np trains (a float64 conv model's
  Conv and Upsample as im2col MatMul and Expand: ONNX Runtime has no float64 Conv).
- ``safetensors`` (:mod:`.safetensors_file`): every parameter under vae_np's name
  (``encoder.linear0.W``, (D_in, D_out)) and ``VAE.config`` in the metadata; any model,
  and it imports back exactly.
- ``torch`` (:mod:`.torch_layout`, :mod:`.torch_format`): a ``torch.save`` state_dict
  with the starting example's module names (``encoder.base.1.weight``, ...; torch's
  (out, in) weights), for the unconditional ReLU MLP. It is written without PyTorch: the
  zip archive and the pickle are produced opcode by opcode; it is read without PyTorch
  too, by an unpickler that resolves only the functions that rebuild a float tensor.

``import_model`` reads a torch state_dict (``.pt``) of that layout, a safetensors file of
that layout, or a safetensors file written by ``export_model``. The packages the formats
need (onnx, safetensors; onnxruntime for the tests) come with ``pip install
'vae_np[export]'``; vae_np itself does not depend on them, and the torch format needs none.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..model import VAE
from .common import check_model
from .onnx_graphs import onnx_models, onnx_paths, write_onnx
from .safetensors_file import (is_ours, model_from_safetensors, read_safetensors,
                               write_safetensors)
from .torch_format import TorchFormatError, read_state_dict, write_state_dict
from .torch_layout import from_torch_layout, is_torch_layout, to_torch_layout

__all__ = ["FORMATS", "ImportedModel", "TorchFormatError", "export_model", "import_model",
           "onnx_models", "onnx_paths", "read_state_dict", "to_torch_layout",
           "write_state_dict"]

FORMATS = ("onnx", "safetensors", "torch")


def export_model(model: VAE, out: str | os.PathLike, format: str,
                 data: dict | None = None) -> list[Path]:
    """Write ``model`` in ``format`` (``onnx``, ``safetensors`` or ``torch``) to ``out``;
    returns the files written (two for onnx: :func:`onnx_paths`). ``data``: the training
    data's summary (``SavedModel.data``), kept by safetensors. Every file is written
    atomically."""
    check_model(model)
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    if format == "onnx":
        return list(write_onnx(model, out))
    if format == "safetensors":
        return [write_safetensors(model, out, data)]
    return [write_state_dict(out, to_torch_layout(model))]


@dataclass
class ImportedModel:
    """What :func:`import_model` read.

    model: the :class:`VAE`; data: the data summary the file recorded (``image_shape``,
    ``binarize``; empty for a torch state_dict); source: ``torch``, ``safetensors``
    (the starting example's layout) or ``vae_np safetensors``.
    """

    model: VAE
    source: str
    data: dict = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        """The recorded image shape, else a conv model's own (when a picture can show
        it: 1 or 3 channels), else a square for a square pixel count (28 x 28 for 784:
        the example's MNIST), else None (feature vectors)."""
        if "image_shape" in self.data:
            shape = self.data["image_shape"]
            return None if shape is None else tuple(shape)
        own = self.model.image_shape
        if own is not None:
            return own[:2] if own[2:] == (1,) else (own if own[2:] in ((), (3,)) else None)
        side = math.isqrt(self.model.input_dim)
        return (side, side) if side > 1 and side * side == self.model.input_dim else None


def import_model(path: str | os.PathLike, *, decoder: str | None = None,
                 variance: float | None = None, input_shift: float | None = None,
                 dtype: str | None = None, backend="numpy") -> ImportedModel:
    """The model in ``path``: a ``torch.save`` state_dict or a safetensors file.

    A state_dict of the starting example's layout (:mod:`.torch_layout`) takes its sizes
    from the tensors' shapes; ``decoder`` (default: ``gaussian`` for 2c outputs, else
    ``bernoulli``), ``variance`` and ``input_shift`` (default 0.5, the example's x - 0.5)
    say what the shapes cannot. A vae_np safetensors file carries its configuration, and
    these three must be left out. Raises FileNotFoundError, or ValueError naming what
    does not fit (:class:`TorchFormatError` for a file that is not a readable state_dict).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"import: no such file {path}")
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head[:2] == b"PK":
        tensors = read_state_dict(path)
        return ImportedModel(_from_layout(path, tensors, decoder, variance, input_shift, dtype,
                                          backend), "torch")
    if len(head) == 9 and head[8:9] == b"{":          # 8-byte header length, then JSON
        tensors, metadata = read_safetensors(path)
        if is_ours(metadata):
            given = [n for n, v in (("decoder", decoder), ("variance", variance),
                                    ("input_shift", input_shift)) if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: {path} is a vae_np safetensors file, "
                                 f"whose configuration says these; leave them out")
            model, data = model_from_safetensors(path, tensors, metadata, backend, dtype)
            return ImportedModel(model, "vae_np safetensors", data)
        if not is_torch_layout(tensors):
            raise ValueError(f"{path}: a safetensors file, but neither vae_np's (metadata "
                             f"format {metadata.get('format')!r}) nor the starting example's "
                             f"layout (tensors {sorted(tensors)[:6]}...)")
        return ImportedModel(_from_layout(path, tensors, decoder, variance, input_shift, dtype,
                                          backend), "safetensors")
    raise ValueError(f"{path}: not a PyTorch state_dict (a zip file) or a safetensors file")


def _from_layout(path, tensors, decoder, variance, input_shift, dtype, backend) -> VAE:
    return from_torch_layout(tensors, decoder=decoder, variance=variance,
                             input_shift=0.5 if input_shift is None else input_shift,
                             dtype=dtype, backend=backend, where=str(path))
