"""vae_np's MLP VAE under the module names of the PyTorch example it started from.

The starting example (docs/README.md, "The starting example") is, in PyTorch:

    class Encoder(nn.Module):                      # 784 -> 512 -> 512 -> (mu, logvar)
        base = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(),
                             nn.Linear(512, 512), nn.ReLU())
        mu = nn.Linear(512, 64)
        logvar = nn.Linear(512, 64)
    class Decoder(nn.Module):                      # 64 -> 512 -> 512 -> 784
        base = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                             nn.Linear(512, 784))
    class VAE(nn.Module):
        encoder = Encoder(); decoder = Decoder()
        # z = mu + exp(0.5 * logvar) * eps  (the example's 0.5 ** logvar, fixed)

Its state_dict, for L hidden layers of any widths (the example: L = 2, 512 each):

    encoder.base.{2i+1}.weight (H_i, H_{i-1}), .bias (H_i,)   i = 0..L-1 (index 0: Flatten)
    encoder.mu.weight (d, H_L), encoder.mu.bias (d,)
    encoder.logvar.weight (d, H_L), encoder.logvar.bias (d,)
    decoder.base.{2i}.weight, .bias                           i = 0..L (the last: outputs)

with H_{-1} = c, the pixel count. A torch Linear's weight is (out, in): vae_np's W
transposed. vae_np's last encoder Linear outputs [mu, logvar] side by side, (H_L, 2d):
its first d columns are the mu head and the rest the logvar head. The modules take
``x - input_shift`` (the example fed x - 0.5 from its data pipeline; vae_np keeps the shift
in the model) and the decoder outputs the raw parameters vae_np's decoder does (logits
for Bernoulli, [mean, logvar] side by side (M, 2c) for a Gaussian, the mean for a fixed
Gaussian): a head on top of ``decoder.base`` (a Sigmoid, an Unflatten) has no parameters
and changes no name.

The names are the issue's (``encoder.base.1.weight``); the heads' module names ``mu`` and
``logvar`` are this project's reading of "the mean / log-variance heads" (the example's
source is not in the repository): ``HEADS`` holds them, in one place.

Only this layout is mapped: an unconditional ReLU MLP. Other models export to ONNX and
safetensors, which carry any of them.
"""

from __future__ import annotations

import re

import numpy as np

from ..model import VAE
from ..layers import MLP
from .common import architecture, check_model, float_dtype, host_params

__all__ = ["HEADS", "from_torch_layout", "is_torch_layout", "to_torch_layout"]

#: The encoder's mean and log-variance head modules.
HEADS = ("mu", "logvar")


def to_torch_layout(model: VAE) -> dict[str, np.ndarray]:
    """``model``'s parameters under the starting example's names and torch shapes, in
    order (encoder, then decoder)."""
    check_model(model)
    config = model.config
    if architecture(model) != "mlp" or not isinstance(model.encoder, MLP) \
            or not isinstance(model.decoder, MLP):
        raise ValueError(f"model: architecture {architecture(model)!r}; the torch layout maps "
                         f"only the starting example's MLP: export it as onnx or safetensors")
    if model.num_classes is not None:
        raise ValueError(f"model: conditional (num_classes={model.num_classes}); the starting "
                         f"example's layout has no label input: export it as onnx or "
                         f"safetensors")
    if config["activation"] != "relu":
        raise ValueError(f"model: activation {config['activation']!r}; the starting example's "
                         f"layout has ReLU modules: export it as onnx or safetensors")
    d = model.latent_dim
    enc = [host_params(layer) for layer in model.encoder.linears]
    dec = [host_params(layer) for layer in model.decoder.linears]
    out: dict[str, np.ndarray] = {}
    for i, p in enumerate(enc[:-1]):
        out[f"encoder.base.{2 * i + 1}.weight"] = p["W"].T.copy()
        out[f"encoder.base.{2 * i + 1}.bias"] = p["b"].copy()
    last = enc[-1]
    for head, cols in zip(HEADS, (slice(0, d), slice(d, 2 * d))):
        out[f"encoder.{head}.weight"] = last["W"][:, cols].T.copy()
        out[f"encoder.{head}.bias"] = last["b"][cols].copy()
    for i, p in enumerate(dec):
        out[f"decoder.base.{2 * i}.weight"] = p["W"].T.copy()
        out[f"decoder.base.{2 * i}.bias"] = p["b"].copy()
    return out


_BASE = re.compile(r"^(encoder|decoder)\.base\.(\d+)\.(weight|bias)$")


def is_torch_layout(names) -> bool:
    """Whether ``names`` look like this layout (an ``encoder.base.*`` or head tensor)."""
    return any(_BASE.match(n) or n.startswith(tuple(f"encoder.{h}." for h in HEADS))
               for n in names)


def expected_names(hidden_layers: int) -> list[str]:
    names = [f"encoder.base.{2 * i + 1}.{p}" for i in range(hidden_layers)
             for p in ("weight", "bias")]
    names += [f"encoder.{h}.{p}" for h in HEADS for p in ("weight", "bias")]
    names += [f"decoder.base.{2 * i}.{p}" for i in range(hidden_layers + 1)
              for p in ("weight", "bias")]
    return names


def from_torch_layout(tensors: dict[str, np.ndarray], *, decoder: str | None = None,
                      variance: float | None = None, input_shift: float = 0.5,
                      dtype: str | None = None, backend="numpy", where: str = "state_dict"
                      ) -> VAE:
    """A :class:`VAE` with the weights of a state_dict of this layout.

    The sizes come from the shapes (c from the first weight's columns, the hidden widths,
    d from the mu head). ``decoder``: default ``gaussian`` when the last decoder layer
    outputs 2c values, else ``bernoulli``; give ``gaussian-fixed`` (and ``variance``) for
    the example's own loss. ``dtype``: default the tensors' (float64 if all are).
    Raises ValueError naming the tensors that are missing, unexpected or misshapen.
    """
    names = set(tensors)
    hidden_layers = sum(1 for n in names if _BASE.match(n) and n.startswith("encoder.")
                        and n.endswith(".weight"))
    expected = expected_names(hidden_layers)
    missing = [n for n in expected if n not in names]
    unexpected = sorted(names - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: not the starting example's layout (vae_np.interop."
                         f"torch_layout): missing {missing}, unexpected {unexpected}")
    arrays = {n: np.asarray(tensors[n]) for n in expected}
    for name, value in arrays.items():
        want = 2 if name.endswith(".weight") else 1
        if value.ndim != want:
            raise ValueError(f"{where}[{name!r}]: expected a {want}-d tensor, got shape "
                             f"{value.shape}")
    c = arrays["encoder.base.1.weight" if hidden_layers else "encoder.mu.weight"].shape[1]
    hidden = [arrays[f"encoder.base.{2 * i + 1}.weight"].shape[0] for i in range(hidden_layers)]
    d = arrays["encoder.mu.weight"].shape[0]
    out = arrays[f"decoder.base.{2 * hidden_layers}.weight"].shape[0]
    if out not in (c, 2 * c):
        raise ValueError(f"{where}['decoder.base.{2 * hidden_layers}.weight']: outputs {out} "
                         f"values; the encoder takes c = {c}, so a decoder outputs c "
                         f"(bernoulli, gaussian-fixed) or 2c (gaussian)")
    if decoder is None:
        decoder = "gaussian" if out == 2 * c else "bernoulli"
    per_pixel = 2 if decoder == "gaussian" else 1
    if out != per_pixel * c:
        raise ValueError(f"decoder: {decoder!r} needs {per_pixel * c} decoder outputs, "
                         f"{where}['decoder.base.{2 * hidden_layers}.weight'] has {out}")
    widths = [c, *hidden]
    shapes = {}
    for i in range(hidden_layers):
        shapes[f"encoder.base.{2 * i + 1}.weight"] = (widths[i + 1], widths[i])
        shapes[f"encoder.base.{2 * i + 1}.bias"] = (widths[i + 1],)
    for head in HEADS:
        shapes[f"encoder.{head}.weight"], shapes[f"encoder.{head}.bias"] = (d, widths[-1]), (d,)
    dec_widths = [d, *reversed(hidden), out]
    for i in range(hidden_layers + 1):
        shapes[f"decoder.base.{2 * i}.weight"] = (dec_widths[i + 1], dec_widths[i])
        shapes[f"decoder.base.{2 * i}.bias"] = (dec_widths[i + 1],)
    for name, shape in shapes.items():
        if arrays[name].shape != shape:
            raise ValueError(f"{where}[{name!r}]: expected shape {shape} (from c = {c}, "
                             f"hidden {hidden}, d = {d}), got {arrays[name].shape}")
    model = VAE(input_dim=c, hidden=tuple(hidden), latent_dim=d, decoder=decoder,
                variance=variance, input_shift=input_shift,
                dtype=float_dtype(arrays, dtype, where), backend=backend)
    state = {}
    for i in range(hidden_layers):
        state[f"encoder.linear{i}.W"] = arrays[f"encoder.base.{2 * i + 1}.weight"].T
        state[f"encoder.linear{i}.b"] = arrays[f"encoder.base.{2 * i + 1}.bias"]
    state[f"encoder.linear{hidden_layers}.W"] = np.concatenate(
        [arrays[f"encoder.{h}.weight"].T for h in HEADS], axis=1)
    state[f"encoder.linear{hidden_layers}.b"] = np.concatenate(
        [arrays[f"encoder.{h}.bias"] for h in HEADS])
    for i in range(hidden_layers + 1):
        state[f"decoder.linear{i}.W"] = arrays[f"decoder.base.{2 * i}.weight"].T
        state[f"decoder.linear{i}.b"] = arrays[f"decoder.base.{2 * i}.bias"]
    try:
        model.load_state_dict(state)
    except (ValueError, TypeError) as exc:        # NaN, inf, or too large for the dtype
        raise ValueError(f"{where}: {exc}") from None
    return model
