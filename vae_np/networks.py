"""Networks of layers with the MLP's interface, and the starting example's convolutional
encoder and decoder built from them.

:class:`Sequential` runs any list of layers (``vae_np.layers``, ``vae_np.conv``) with the
interface ``VAE`` uses for its MLPs: ``forward(x)`` keeps the caches, ``backward(dout,
input_grad=True)`` returns dL/d(input) (None with ``input_grad=False``), ``net(x)`` is
inference, and ``named_parameters(prefix)`` yields ``(name, layer, key)`` for
``vae_np.parameters.Parameters``. Inputs and outputs are flat (N, features), as the
MLP's: the network's first layer unflattens the images, its last flattens.

:func:`conv_encoder` and :func:`conv_decoder` build the convolutional networks of the
PyTorch example this project started from (its commented-out second architecture),
generalised to any image size with H and W multiples of 4, any channel count and any
number of decoder outputs per pixel.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from .backend import Backend
from .conv import Conv2d, Flatten, MaxPool2d, Unflatten, Upsample
from .layers import Layer, Linear, ReLU, fused_backward, fused_forward

# Sequential.cache after a forward (each layer keeps its own cache).
_FORWARD_DONE = "layer caches"


class Sequential(Layer):
    """Layers run in order; backward runs them in reverse, each taking its successor's dx.
    A pair in ``layers.FUSED_FORWARDS`` / ``FUSED_BACKWARDS`` (forward: a Linear or a
    Conv2d and the ReLU after it; backward: a Linear and its ReLU, a ReLU and a MaxPool2d,
    an Upsample and a Conv2d) runs as one op, with the layers' own caches and bits, as in
    the MLP; never across the layer that takes the extras.

    Args:
        layers: the layers, each with ``forward``/``backward``/``__call__``.
        extra_features: E >= 0 side inputs: the last E columns of the network's input
            (N, D + E) bypass the layers before index ``extra_at`` and are appended to
            that layer's input (a conditional VAE's one-hot labels, which an image trunk
            cannot take: ``VAE`` appends them to every encoder input). dL/d(extras) is
            split off that layer's dx and appended to the network's.
        extra_at: the index of the layer whose input gets the extras (required with E > 0).

    Parameters are named ``{kind}{i}.{key}``, ``kind`` the layer class in lower case and
    ``i`` counting the layers of that kind (``conv2d0.W``, ``linear1.b``), like the MLP's
    ``linear{i}.W``.
    """

    def __init__(self, layers: Sequence[Layer], backend: Backend, extra_features: int = 0,
                 extra_at: int | None = None):
        super().__init__(backend)
        self.layers = list(layers)
        if not self.layers or not all(isinstance(layer, Layer) for layer in self.layers):
            raise TypeError(f"layers: expected a non-empty sequence of vae_np layers, got "
                            f"{layers!r}")
        if not isinstance(extra_features, (int, np.integer)) or isinstance(extra_features, bool) \
                or extra_features < 0:
            raise ValueError(f"extra_features: expected an integer >= 0, got {extra_features!r}")
        if extra_features and (not isinstance(extra_at, (int, np.integer))
                               or isinstance(extra_at, bool)
                               or not 0 < extra_at < len(self.layers)):
            raise ValueError(f"extra_at: expected the index of a layer after the first "
                             f"(1..{len(self.layers) - 1}) with extra_features > 0, "
                             f"got {extra_at!r}")
        self.extra_features = int(extra_features)
        self.extra_at = int(extra_at) if self.extra_features else None
        names, counts = [], {}
        for layer in self.layers:
            kind = type(layer).__name__.lower()
            names.append(f"{kind}{counts.get(kind, 0)}")
            counts[kind] = counts.get(kind, 0) + 1
        self.names = names
        self._first_with_parameters = next(       # a nested network counts as having some
            (i for i, layer in enumerate(self.layers)
             if layer.params or hasattr(layer, "named_parameters")), len(self.layers))

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Layer, str]]:
        """Yield ``(full name, owning layer, key)`` for every parameter, in order."""
        for name, layer in zip(self.names, self.layers):
            if hasattr(layer, "named_parameters"):
                yield from layer.named_parameters(f"{prefix}{name}.")
            else:
                for key in layer.params:
                    yield f"{prefix}{name}.{key}", layer, key

    def _split(self, x):
        e = self.extra_features
        if getattr(x, "ndim", None) != 2 or x.shape[1] <= e:
            raise ValueError(f"x: expected shape (N, D + {e}) with the {e} extra features "
                             f"last, got shape {getattr(x, 'shape', type(x).__name__)}")
        return x[:, :x.shape[1] - e], x[:, x.shape[1] - e:]

    def _run(self, x, train: bool):
        extras = None
        if self.extra_features:
            x, extras = self._split(x)
        layers, i = self.layers, 0
        while i < len(layers):
            if i == self.extra_at:
                x = self.backend.xp.concat([x, extras], axis=1)
            fused = self._fused(fused_forward, i)
            if fused is not None:
                x, i = fused(layers[i], layers[i + 1], x, train), i + 2
            else:
                x, i = (layers[i].forward(x) if train else layers[i](x)), i + 1
        return x

    def _fused(self, lookup, i):
        """The one-op pass (``lookup``: layers.fused_forward or fused_backward) of layers
        i and i + 1, or None; never across the layer that takes the extras."""
        if i + 1 >= len(self.layers) or i + 1 == self.extra_at:
            return None
        return lookup(self.layers[i], self.layers[i + 1])

    def forward(self, x):
        """(N, D [+ E]) -> the last layer's output; every layer keeps its cache."""
        out = self._run(x, train=True)
        self.cache = _FORWARD_DONE
        return out

    def __call__(self, x):
        """Inference: the output of :meth:`forward`; no cache is touched."""
        return self._run(x, train=False)

    def backward(self, dout, input_grad: bool = True):
        """dL/d(input) for dout = dL/d(output), or None with ``input_grad=False``: then the
        layers before the first one with parameters are skipped (their dx would only
        feed the input) and that layer skips its own dx when it can (Linear, Conv2d and
        Sequential take ``input_grad``: the encoder's first convolution drops its col2im)."""
        self._cached()
        self.cache = None                       # one backward per forward
        stop = 0 if input_grad else self._first_with_parameters
        dextras = None
        layers, i = self.layers, len(self.layers) - 1
        while i >= stop:
            fused = self._fused(fused_backward, i - 1) if i - 1 >= stop else None
            if fused is not None:                       # the pair (i - 1, i) as one op
                i -= 1
                dout = fused(layers[i], layers[i + 1], dout, input_grad or i > stop)
            elif i == stop and not input_grad and isinstance(layers[i],
                                                            (Linear, Conv2d, Sequential)):
                dout = layers[i].backward(dout, input_grad=False)
            else:
                dout = layers[i].backward(dout)
            if i == self.extra_at and dout is not None:
                cut = dout.shape[1] - self.extra_features
                dout, dextras = dout[:, :cut], dout[:, cut:]
            i -= 1
        if not input_grad:
            return None
        return dout if dextras is None else self.backend.xp.concat([dout, dextras], axis=1)


def image_layout(image_shape) -> tuple[int, int, int, bool]:
    """(C, H, W, channels_last) of ``image_shape`` as ``vae_np.data`` gives it: (H, W) for
    one channel, (H, W, C) for C channels, each flat example in (H, W, C) order."""
    shape = tuple(image_shape) if isinstance(image_shape, (tuple, list)) else image_shape
    if not isinstance(shape, tuple) or len(shape) not in (2, 3) or any(
            not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 1 for s in shape):
        raise ValueError(f"image_shape: expected (H, W) or (H, W, C), positive integers, "
                         f"got {image_shape!r}")
    h, w = int(shape[0]), int(shape[1])
    c = int(shape[2]) if len(shape) == 3 else 1
    return c, h, w, c > 1


def _check_preset(image_shape, latent_dim, channels, hidden, extra_features):
    c, h, w, channels_last = image_layout(image_shape)
    if h % 4 or w % 4:
        raise ValueError(f"image_shape: the two 2x2 max-pools need H and W that are multiples "
                         f"of 4, got {tuple(image_shape)}")
    if not isinstance(latent_dim, (int, np.integer)) or isinstance(latent_dim, bool) \
            or latent_dim < 1:
        raise ValueError(f"latent_dim: expected a positive integer, got {latent_dim!r}")
    widths = (hidden,) if isinstance(hidden, (int, np.integer)) and not isinstance(
        hidden, bool) else hidden
    if not isinstance(widths, (tuple, list)) or any(
            not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1 for v in widths):
        raise ValueError(f"hidden: expected a positive integer or a sequence of them (the "
                         f"dense widths between the convolutions and z), got {hidden!r}")
    if not isinstance(channels, (tuple, list)) or len(channels) != 2 or any(
            not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1 for v in channels):
        raise ValueError(f"channels: expected two positive integers (the two convolutions' "
                         f"widths), got {channels!r}")
    if not isinstance(extra_features, (int, np.integer)) or isinstance(extra_features, bool) \
            or extra_features < 0:
        raise ValueError(f"extra_features: expected an integer >= 0, got {extra_features!r}")
    return c, h, w, channels_last, tuple(int(v) for v in widths)


def _dense(widths, backend, rng, last_init="he") -> list[Layer]:
    """Linear(widths[0], widths[1]), ReLU, ..., Linear(widths[-2], widths[-1]): a ReLU
    between each two, He-initialised but for the last (``last_init``)."""
    layers: list[Layer] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        last = i == len(widths) - 2
        layers.append(Linear(n_in, n_out, backend, rng, init=last_init if last else "he"))
        if not last:
            layers.append(ReLU(backend))
    return layers


def conv_encoder(image_shape, latent_dim: int, backend: Backend, rng: np.random.Generator, *,
                 channels: Sequence[int] = (32, 64), hidden: int | Sequence[int] = 512,
                 extra_features: int = 0) -> Sequential:
    """The starting example's encoder: (N, C H W [+ E]) -> (N, 2 d), [mu, logvar].

        Unflatten(C, H, W), Conv2d(C, 32, 3, padding 1), ReLU, MaxPool2d(2),
        Conv2d(32, 64, 3, padding 1), ReLU, MaxPool2d(2), Flatten,
        Linear(64 (H/4) (W/4) [+ E], 512), ReLU, Linear(512, 2 d)

    One Linear(512, 2 d) head, not the example's two Linear(512, d): the two heads are
    exactly the two halves of its columns (the same products, the same initial
    distribution), and one head gives the (N, 2d) output that ``VAE`` splits into
    (mu, logvar) for the MLP, so the model treats both architectures alike.
    ``image_shape`` is (H, W) or (H, W, C) as ``vae_np.data`` gives it (flat examples in
    (H, W, C) order); ``extra_features`` E columns (a conditional VAE's labels) join at
    the first Linear. Hidden layers He-initialised, the head Glorot, as in the MLP.
    ``hidden``: the width of the dense layer (512), or a sequence of widths for several
    (``()``: the head right after the convolutions).
    """
    c, h, w, channels_last, widths = _check_preset(image_shape, latent_dim, channels, hidden,
                                                   extra_features)
    c1, c2 = channels
    layers = [
        Unflatten((c, h, w), backend, channels_last=channels_last),
        Conv2d(c, c1, 3, backend, rng, padding=1), ReLU(backend), MaxPool2d(2, backend),
        Conv2d(c1, c2, 3, backend, rng, padding=1), ReLU(backend), MaxPool2d(2, backend),
        Flatten(backend),
        *_dense((c2 * (h // 4) * (w // 4) + extra_features, *widths, 2 * latent_dim),
                backend, rng, last_init="glorot"),
    ]
    return Sequential(layers, backend, extra_features=extra_features,
                      extra_at=8 if extra_features else None)


def conv_decoder(image_shape, latent_dim: int, backend: Backend, rng: np.random.Generator, *,
                 outputs_per_pixel: int = 1, channels: Sequence[int] = (32, 64),
                 hidden: int | Sequence[int] = 512, extra_features: int = 0) -> Sequential:
    """The starting example's decoder: (N, d [+ E]) -> (N, K C H W), K outputs per pixel.

        Linear(d [+ E], 512), ReLU, Linear(512, 64 (H/4) (W/4)), ReLU, Unflatten(64, H/4, W/4),
        Upsample(2), Conv2d(64, 32, 3, padding 1), ReLU, Upsample(2),
        Conv2d(32, K C, 3, padding 1), Flatten

    K = ``outputs_per_pixel`` of the likelihood (1: Bernoulli logits or a fixed-variance
    mean; 2: Gaussian [mean, log-variance]). The last convolution's K C channels are K
    groups of C, flattened group after group, each in the data's (H, W, C) pixel order: the
    likelihood's [mu (c), logvar (c)] layout on (M, K c), c = C H W. The example puts each
    ReLU after its Upsample; a ReLU commutes with nearest upsampling (and with Unflatten),
    to the bit both ways, so each runs before it, on a quarter of the values (the decoder's
    ReLUs took 4.7 % of the conv step at batch 128, their forwards and backwards).
    ``extra_features`` E (labels appended to z) widen the first Linear. The last layer is Glorot-initialised.
    ``hidden``: as the encoder's, mirrored (the last width first).
    """
    c, h, w, channels_last, widths = _check_preset(image_shape, latent_dim, channels, hidden,
                                                   extra_features)
    if not isinstance(outputs_per_pixel, (int, np.integer)) or isinstance(outputs_per_pixel, bool) \
            or outputs_per_pixel < 1:
        raise ValueError(f"outputs_per_pixel: expected a positive integer, got "
                         f"{outputs_per_pixel!r}")
    c1, c2 = channels
    k = int(outputs_per_pixel)
    layers = [
        *_dense((latent_dim + extra_features, *reversed(widths), c2 * (h // 4) * (w // 4)),
                backend, rng),
        ReLU(backend), Unflatten((c2, h // 4, w // 4), backend),
        Upsample(2, backend), Conv2d(c2, c1, 3, backend, rng, padding=1), ReLU(backend),
        Upsample(2, backend),
        Conv2d(c1, k * c, 3, backend, rng, padding=1, init="glorot"),
        Flatten(backend, channels_last=channels_last, groups=k),
    ]
    return Sequential(layers, backend)


def conv_networks(image_shape, latent_dim: int, outputs_per_pixel: int, backend: Backend,
                  rng: np.random.Generator, *, extra_features: int = 0,
                  channels: Sequence[int] = (32, 64),
                  hidden: int | Sequence[int] = 512) -> tuple[Sequential, Sequential]:
    """(encoder, decoder) of the starting example, drawn from ``rng`` in that order (as
    ``VAE`` draws its two MLPs); ``extra_features`` go to both (the encoder at its first
    Linear, the decoder after z)."""
    encoder = conv_encoder(image_shape, latent_dim, backend, rng, channels=channels,
                           hidden=hidden, extra_features=extra_features)
    decoder = conv_decoder(image_shape, latent_dim, backend, rng,
                           outputs_per_pixel=outputs_per_pixel, channels=channels,
                           hidden=hidden, extra_features=extra_features)
    return encoder, decoder


#: ``VAE(architecture=...)``: ``mlp``, fully connected layers (the default), or ``conv``,
#: the starting example's convolutional encoder and decoder (:func:`conv_networks`).
ARCHITECTURES = ("mlp", "conv")
#: Each architecture's dense widths when ``hidden`` is left out: the MLP's two layers of
#: 512, the conv preset's one dense layer of 512.
DEFAULT_HIDDEN = {"mlp": (512, 512), "conv": (512,)}
#: The conv preset's two convolution widths.
CONV_CHANNELS = (32, 64)


def conv_image_shape(image_shape, input_dim: int | None) -> tuple[int, ...]:
    """The image shape of a conv VAE, (H, W) or (H, W, C): ``image_shape`` (whose pixel
    count ``input_dim`` must match when given), or MNIST's (28, 28) when both are left out
    or ``input_dim`` is 784. Any other flat size is ambiguous: ValueError asking for it."""
    if image_shape is None:
        if input_dim not in (None, 784):
            raise ValueError(f"image_shape: the conv architecture needs the image shape, "
                             f"(H, W) or (H, W, C), of the input_dim={input_dim} values of "
                             f"an example")
        return (28, 28)
    c, h, w, _ = image_layout(image_shape)
    shape = (h, w) if len(tuple(image_shape)) == 2 else (h, w, c)
    if input_dim is not None and input_dim != h * w * c:
        raise ValueError(f"image_shape: {shape} holds {h * w * c} values, input_dim is "
                         f"{input_dim}")
    return shape


def conv_widest(image_shape, channels: Sequence[int], hidden: Sequence[int]) -> int:
    """The widest decoder activation of one example, in values: the last convolution's
    c1 H W input (the im2col columns are chunked by the layer itself) or a dense layer."""
    c, h, w, _ = image_layout(image_shape)
    c1, c2 = channels
    return max(c1 * h * w, c2 * (h // 2) * (w // 2), *hidden)
