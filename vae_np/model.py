"""The variational autoencoder: an encoder q(z | x), a decoder p(x | z) and the training
objective between them, with hand-written backprop. The networks are MLPs
(``architecture="mlp"``, the default) or the starting example's convolutional encoder and
decoder (``architecture="conv"``, ``vae_np.networks.conv_networks``); both take and give
flat examples (N, c), so everything below is the same for both.

Forward (``VAE.loss``), for a batch x of N examples and S samples per example:

    h = encoder(x - input_shift)                      (N, 2d)
    mu, logvar = h[:, :d], h[:, d:]                   (N, d) each
    terms = objective.forward(x, mu, logvar, eps, decoder)       eps ~ N(0, I), (S, N, d)

where the objective, chosen once at construction (``objective="vae"``: the negative ELBO;
``"iwae"``: the negative importance-weighted bound), reparameterises z = mu + exp(logvar /
2) eps, runs the decoder and scores x; vae_np/objectives.py writes out both. Backward
(``VAE.backward``) runs the objective's backward, through the decoder into (mu, logvar),
then the encoder's; docs/05-whole-model.md and docs/09-iwae.md derive every line.

A conditional VAE (``num_classes``) appends the one-hot label of each example to the
encoder's input and to the decoder's latent input (``_one_hot``, ``_with_labels``); the
convolutional encoder takes them as side inputs that join at its first dense layer
(``networks.Sequential``'s ``extra_features``).

Inference (``encode``, ``decode``, ``reconstruct``, ``sample``, ``log_likelihood``) keeps
nothing and disturbs nothing; what ``backward`` reads is kept by ``loss`` on the model
(and by each network's ``forward`` in that network). ``log_likelihood`` estimates ln p(x) by
importance sampling with the ln w of the IWAE bound (``objectives.iwae_log_weights``).

There is one ``loss`` and one ``backward``. Each op they call chooses its own variant:
on NumPy and CuPy the MLPs, the likelihoods, the KL term, reparameterisation, the IWAE
bound and Adam run fast twins that give their reference's results to the last bit on
NumPy (tests/test_fast_paths.py); ``vae_np.backend.use_fast_paths(False)`` runs the
references.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .backend import Backend, get_backend
from .layers import MLP
from .likelihoods import make_likelihood
from .networks import (ARCHITECTURES, CONV_CHANNELS, DEFAULT_HIDDEN, conv_image_shape,
                       conv_networks, conv_widest)
from .objectives import (OBJECTIVES, ELBOTerms, iwae_log_weights, make_objective,
                         repeat_over_samples, reparameterize)
from .parameters import Parameters
from .validation import (check_array, check_choice, check_int, check_labels, check_layers_fit,
                         check_number, check_range, check_rng)

# ELBOTerms and OBJECTIVES live in objectives.py; named here too for the callers that have
# always imported them from the model (the trainer, train_cli).
__all__ = ["ELBOTerms", "OBJECTIVES", "VAE", "log_likelihood_chunk_size"]


def log_likelihood_chunk_size(model: "VAE", n: int, num_samples: int) -> int:
    """The number of importance samples :meth:`VAE.log_likelihood` draws at a time for an
    ``n``-example batch by default: about 2**22 values of the widest decoder layer per
    chunk, between 1 and ``num_samples``. The sharded evaluation (``vae_np.distributed``)
    asks for the same chunks, so that on CuPy, whose RNG keys each draw by its call number,
    the draws are the single-process ones (on NumPy they do not depend on the chunking)."""
    width = model.input_dim * model.likelihood.outputs_per_pixel
    return max(1, min(num_samples, 2 ** 22 // (n * max(width, model.widest, 1))))


class VAE:
    """A VAE with MLP or convolutional encoder and decoder and hand-written backprop.

        VAE()                                                # MNIST, 784-512-512-64 MLP
        VAE(architecture="conv")                             # MNIST, the example's conv net
        VAE(architecture="conv", image_shape=(32, 32, 3))    # your RGB images
        VAE(architecture="conv", image_shape=(8, 8), channels=(4, 8), hidden=(16,))

    Args:
        input_dim: c, values per example: default 784 (MNIST) for the MLP, H W C of
            ``image_shape`` when that is given (a different input_dim is a ValueError).
        hidden: dense layer widths of the encoder; the decoder mirrors them. Default
            (512, 512) for the MLP; (512,) for conv, the one dense layer between the
            convolutions and z (``()``: none).
        latent_dim: d.
        decoder: ``"bernoulli"`` (logits), ``"gaussian"`` (mean and log-variance) or
            ``"gaussian-fixed"`` (mean, with fixed ``variance``).
        variance: lambda for ``gaussian-fixed`` (default
            ``likelihoods.DEFAULT_FIXED_VARIANCE``, the starting example's).
        beta: weight of the KL term (1 gives the ELBO); must stay 1 for ``"iwae"``.
        samples: S >= 1, reparameterised samples per example in the training loss (the
            k of the importance-weighted bound with ``objective="iwae"``).
        activation: hidden activation name (``vae_np.layers.ACTIVATIONS``).
        input_shift: subtracted from x before the encoder (0.5 centres [0, 1] pixels);
            the likelihood always scores the unshifted x.
        backend: a :class:`Backend` or a backend name.
        dtype: ``"float32"`` (default) or ``"float64"``; with a :class:`Backend`, leave it
            out or repeat the backend's own (a contradiction is a ValueError).
        seed: seeds the weight initialisation (drawn on the host, identical on every
            backend); an integer >= 0.
        objective: ``"vae"`` (default): the negative ELBO, closed-form KL, S samples
            averaged; ``"iwae"``: the negative importance-weighted bound with k = S samples
            (Burda et al. 2015; docs/09-iwae.md).
        num_classes: K for a conditional VAE, None (default) for an unconditional one.
            The one-hot label (K,) of each example is appended to the encoder's input and
            to the decoder's latent input, so the model is q(z | x, y) and p(x | z, y);
            ``loss``, ``encode``, ``decode``, ``reconstruct``, ``sample`` and
            ``log_likelihood`` then take labels ``y``, (N,) integers in 0..K-1.
        architecture: ``"mlp"`` (default) or ``"conv"``: the starting example's
            Conv2d(C, 32, 3) ReLU MaxPool(2) Conv2d(32, 64, 3) ReLU MaxPool(2) dense
            encoder and its mirror with nearest Upsample(2) (``vae_np.networks``), for
            images with H and W multiples of 4; ReLU units only.
        image_shape: (H, W) or (H, W, C) of one example, flat in (H, W, C) order as
            ``vae_np.data`` gives it (``Dataset.image_shape``). Conv: default (28, 28),
            allowed only with input_dim 784 or left out. The MLP only records it.
        channels: conv only: the two convolutions' widths, default (32, 64).

    Attributes besides the arguments: ``encoder``, ``decoder`` (``layers.MLP`` or
    ``networks.Sequential``), ``parameters``, ``config`` (the arguments, JSON-able: what
    ``vae_np.saving`` stores), ``widest`` (the widest decoder activation per example, in
    values: :func:`log_likelihood_chunk_size` sizes its chunks by it).
    """

    def __init__(self, input_dim: int | None = None, hidden: Sequence[int] | None = None,
                 latent_dim: int = 64, decoder: str = "bernoulli",
                 variance: float | None = None, beta: float = 1.0, samples: int = 1,
                 activation: str = "relu", input_shift: float = 0.5,
                 backend: Backend | str = "numpy", dtype: str | None = None, seed: int = 0,
                 objective: str = "vae", num_classes: int | None = None,
                 architecture: str = "mlp", image_shape: Sequence[int] | None = None,
                 channels: Sequence[int] | None = None):
        self.architecture = check_choice("architecture", architecture, ARCHITECTURES)
        input_dim = check_int("input_dim", input_dim, 1, allow_none=True)
        if self.architecture == "conv":
            self.image_shape = conv_image_shape(image_shape, input_dim)
        else:
            self.image_shape = None if image_shape is None else conv_image_shape(image_shape,
                                                                                 input_dim)
        if input_dim is None:
            input_dim = 784 if self.image_shape is None else math.prod(self.image_shape)
        self.input_dim = input_dim
        self.num_classes = check_int("num_classes", num_classes, 1, allow_none=True)
        self.latent_dim = check_int("latent_dim", latent_dim, 1)
        self.samples = check_int("samples", samples, 1)
        if hidden is None:
            hidden = DEFAULT_HIDDEN[self.architecture]
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise TypeError(f"hidden: expected a sequence of layer widths such as (512, 512) "
                            f"(or () for none), got {hidden!r}")
        self.hidden = tuple(check_int("hidden", width, 1) for width in hidden)
        seed = check_int("seed", seed, 0)
        self.beta = check_number("beta", beta, low=0.0)
        self.input_shift = check_number("input_shift", input_shift)
        self.backend = get_backend(backend, dtype)
        self.likelihood = make_likelihood(decoder, variance)
        # The objective is chosen here, once: loss and backward call its forward and backward.
        self._objective = make_objective(objective, self.likelihood, self.beta)
        self.objective = self._objective.name
        k = self.num_classes or 0                  # one-hot width appended to each input
        widths = ((self.input_dim + k, *self.hidden, 2 * self.latent_dim),
                  (self.latent_dim + k, *reversed(self.hidden),
                   self.input_dim * self.likelihood.outputs_per_pixel))
        init_rng = np.random.default_rng(seed)
        self.channels = None
        if self.architecture == "mlp":
            if channels is not None:
                raise ValueError(f"channels: the convolution widths are for "
                                 f"architecture='conv', got {channels!r} with 'mlp'")
            check_layers_fit(f"VAE(input_dim={self.input_dim}, hidden={list(self.hidden)}, "
                             f"latent_dim={self.latent_dim}, num_classes={self.num_classes})",
                             widths, self.backend.numpy_dtype.itemsize)
            self.encoder = MLP(widths[0], self.backend, init_rng, activation)
            self.decoder = MLP(widths[1], self.backend, init_rng, activation)
            self.widest = max(self.hidden, default=1)
        else:
            if activation != "relu":
                raise ValueError(f"activation: the conv architecture has ReLU units (the "
                                 f"starting example's), got {activation!r}")
            channels = CONV_CHANNELS if channels is None else channels
            self.encoder, self.decoder = conv_networks(     # which checks channels
                self.image_shape, self.latent_dim, self.likelihood.outputs_per_pixel,
                self.backend, init_rng, extra_features=k, channels=channels,
                hidden=self.hidden)
            self.channels = tuple(int(c) for c in channels)
            self.widest = conv_widest(self.image_shape, self.channels, self.hidden)
        if decoder == "gaussian":
            # logvar_x = 0 at the start: random weights there put exp(-logvar_x) anywhere up
            # to 1e35 on a fresh model (issue 19); they learn from zero like a bias. The
            # logvar outputs are the second half of the last layer's outputs (the Linear's
            # columns, the Conv2d's output channels: the likelihood's [mu, logvar] layout).
            last = [layer for layer in self.decoder.layers if layer.params][-1].params
            half = last["b"].shape[0] // 2
            if last["W"].ndim == 2:
                last["W"][:, half:] = 0.0
            else:
                last["W"][half:, ...] = 0.0
            last["b"][half:] = 0.0
        self.parameters = Parameters(self.backend, [*self.encoder.named_parameters("encoder."),
                                                    *self.decoder.named_parameters("decoder.")])
        self.config = {
            "input_dim": self.input_dim, "hidden": list(self.hidden),
            "latent_dim": self.latent_dim, "decoder": decoder,
            "variance": getattr(self.likelihood, "variance", None), "beta": self.beta,
            "samples": self.samples, "activation": activation, "input_shift": self.input_shift,
            "dtype": self.backend.dtype_name, "seed": seed, "objective": self.objective,
            "num_classes": self.num_classes, "architecture": self.architecture,
            "image_shape": None if self.image_shape is None else list(self.image_shape),
            "channels": None if self.channels is None else list(self.channels),
        }
        self._step = None                          # what the last loss kept for backward

    # ----------------------------------------------------------------------------------
    # Conditional plumbing: labels as one-hot columns beside the data

    def _one_hot(self, y, n: int):
        """Labels y (n,) as one-hot rows (n, K) of the model dtype; None for an
        unconditional model (which refuses labels, as a conditional one needs them)."""
        if self.num_classes is None:
            if y is not None:
                raise ValueError("y: this VAE is unconditional (num_classes=None); labels "
                                 "are for a VAE(num_classes=K)")
            return None
        if y is None:
            raise ValueError(f"y: this conditional VAE (num_classes={self.num_classes}) needs "
                             f"labels, (N,) integers in 0..{self.num_classes - 1}")
        labels = check_labels("y", y, n, self.num_classes, self.backend)
        one_hot = np.zeros((n, self.num_classes), dtype=self.backend.numpy_dtype)
        one_hot[np.arange(n), labels] = 1.0
        return self.backend.asarray(one_hot)

    def _with_labels(self, h, one_hot):
        """[h, one_hot] along the features (h unchanged for an unconditional model): h is
        (S N, w), S blocks of the N examples, and one_hot (N, K) is repeated for each."""
        if one_hot is None:
            return h
        xp = self.backend.xp
        s = h.shape[0] // one_hot.shape[0]
        return xp.concat([h, repeat_over_samples(xp, one_hot, s)], axis=1)

    def _encoder_output(self, x, one_hot, train: bool = False):
        """(mu, logvar), (N, d) each, for a checked batch x (N, c); ``train`` keeps what
        the encoder's backward needs."""
        h = self._with_labels(x - self.input_shift, one_hot)
        h = self.encoder.forward(h) if train else self.encoder(h)
        d = self.latent_dim
        return h[:, :d], h[:, d:]

    def _decoder_backward(self, dout):
        """d loss / d z rows (S N, d) from d loss / d decoder output (S N, outputs); the
        label columns of a conditional decoder's input are data and take no gradient."""
        return self.decoder.backward(dout)[:, :self.latent_dim]

    # ----------------------------------------------------------------------------------
    # Inference

    def encode(self, x, check_finite: bool = True, y=None):
        """q(z | x) (q(z | x, y) for a conditional model): (mu, logvar), each (N, d)."""
        x = check_array("x", x, self.backend, (None, self.input_dim), check_finite)
        return self._encoder_output(x, self._one_hot(y, x.shape[0]))

    def decoder_outputs(self, z, y=None):
        """Raw decoder outputs for latents z (M, d) (and labels y (M,) for a conditional
        model): (M, c * outputs_per_pixel)."""
        return self.decoder(self._with_labels(z, self._one_hot(y, z.shape[0])))

    def decode(self, z, check_finite: bool = True, y=None):
        """The mean of p(x | z) (p(x | z, y)) for z (M, d): (M, c) (pixel probabilities for
        Bernoulli)."""
        z = check_array("z", z, self.backend, (None, self.latent_dim), check_finite)
        return self.likelihood.mean(self.backend.xp, self.decoder_outputs(z, y))

    def reconstruct(self, x, check_finite: bool = True, y=None):
        """Decoder mean at the posterior mean, z = mu(x): (N, c). Deterministic."""
        mu, _ = self.encode(x, check_finite, y=y)
        return self.decode(mu, check_finite=False, y=y)

    def sample(self, n: int, rng, mean: bool = True, y=None):
        """n draws z ~ N(0, I) decoded: the decoder mean, or (mean=False) a true sample of
        p(x | z) (Gaussian noise for Gaussian decoders, Bernoulli pixels for Bernoulli).
        A conditional model decodes with labels y (n,). Returns (n, c)."""
        n = check_int("n", n, 1)
        check_rng("rng", rng, self.backend)
        out = self.decoder_outputs(rng.normal((n, self.latent_dim)), y)
        if mean:
            return self.likelihood.mean(self.backend.xp, out)
        return self.likelihood.sample(self.backend.xp, out, rng)

    def log_likelihood(self, x, num_samples: int, rng, chunk_size: int | None = None,
                       check_finite: bool = True, y=None):
        """Importance-sampled estimate of ln p(x), per example, in nats: (N,).

            ln p(x) ~ logsumexp_k [ ln p(x | z_k) + ln p(z_k) - ln q(z_k | x) ] - ln K

        with z_k ~ q(z | x), K = ``num_samples``. The K samples are processed
        ``chunk_size`` at a time with a running logsumexp, so memory is bounded by the
        chunk, not by K (default: :func:`log_likelihood_chunk_size`). A conditional model
        scores ln p(x | y) with labels ``y`` (N,).
        """
        num_samples = check_int("num_samples", num_samples, 1)
        check_rng("rng", rng, self.backend)
        xp = self.backend.xp
        x = check_array("x", x, self.backend, (None, self.input_dim), check_finite)
        n = x.shape[0]
        if chunk_size is None:
            chunk_size = log_likelihood_chunk_size(self, n, num_samples)
        chunk_size = check_int("chunk_size", chunk_size, 1)
        one_hot = self._one_hot(y, n)
        mu, logvar = self._encoder_output(x, one_hot)
        running_max = xp.full((n,), -math.inf, dtype=self.backend.dtype)
        running_sum = xp.zeros((n,), dtype=self.backend.dtype)
        for start in range(0, num_samples, chunk_size):
            eps = rng.normal((min(chunk_size, num_samples - start), n, self.latent_dim))
            log_w = self._log_weights(x, mu, logvar, eps, one_hot)
            # Running logsumexp over chunks: rescale the old sum to the new maximum. A
            # maximum still at -inf (every weight zero so far) shifts by 0 instead, so
            # that -inf - -inf never makes a NaN: the sum stays 0 and its log -inf.
            new_max = xp.maximum(running_max, xp.max(log_w, axis=0))
            shift = xp.where(xp.isfinite(new_max), new_max, 0.0)
            running_sum = running_sum * xp.exp(running_max - shift) \
                + xp.sum(xp.exp(log_w - shift), axis=0)
            running_max = new_max
        shift = xp.where(xp.isfinite(running_max), running_max, 0.0)
        return xp.log(running_sum) + shift - math.log(num_samples)

    def log_importance_weights(self, x, eps, y=None):
        """ln w_k = ln p(x|z_k) + ln p(z_k) - ln q(z_k|x) for given noise eps (K, N, d),
        the weights :meth:`log_likelihood` averages. Returns (K, N)."""
        x = check_array("x", x, self.backend, (None, self.input_dim))
        eps = check_array("eps", eps, self.backend, (None, x.shape[0], self.latent_dim))
        one_hot = self._one_hot(y, x.shape[0])
        mu, logvar = self._encoder_output(x, one_hot)
        return self._log_weights(x, mu, logvar, eps, one_hot)

    def _log_weights(self, x, mu, logvar, eps, one_hot):
        """ln w (K, N) at z = mu + exp(logvar / 2) eps for eps (K, N, d):
        ``objectives.iwae_log_weights``, the one expression of ln w."""
        xp = self.backend.xp
        k, n, d = eps.shape
        z = reparameterize(mu, logvar, eps)
        out = self.decoder(self._with_labels(xp.reshape(z, (k * n, d)), one_hot))
        nll = self.likelihood.nll(repeat_over_samples(xp, x, k), out)[0]
        return iwae_log_weights(xp.reshape(nll, (k, n)), z, logvar, eps)

    # ----------------------------------------------------------------------------------
    # Training: the objective and its gradient

    def loss(self, x, rng=None, eps=None, check_finite: bool = True, y=None) -> ELBOTerms:
        """The negative ELBO of batch x (N, c), averaged over the N examples (nats); with
        ``objective="iwae"`` the negative importance-weighted bound (k = S samples).

        The noise comes from ``eps`` (S, N, d) when given, else from ``rng`` (an
        ``RNG`` from ``backend.rng(seed)``). Keeps what :meth:`backward` needs.

        ``check_finite`` (default True) checks x and eps for NaN and inf, the Bernoulli
        decoder's targets for the range [0, 1], and the loss itself, raising
        FloatingPointError when it is not finite (an overflowing logvar, say) rather than
        letting a step write NaN into every parameter. Each check reads a number back
        from the device: training loops that checked their data once turn them off.

        A conditional model (``num_classes``) needs the labels ``y`` (N,) of the batch.
        """
        x = check_array("x", x, self.backend, (None, self.input_dim), check_finite)
        if check_finite and self.likelihood.name == "bernoulli":
            # Outside [0, 1] the "likelihood" is no probability and recon can go negative.
            check_range("x", x, self.backend, 0.0, 1.0, " (the bernoulli decoder needs "
                        "targets in [0, 1]; use a gaussian decoder for other data)")
        shape = (self.samples, x.shape[0], self.latent_dim)
        one_hot = self._one_hot(y, x.shape[0])
        if eps is None:
            if rng is None:
                raise ValueError("rng: expected an RNG (backend.rng(seed)) or eps, got neither")
            check_rng("rng", rng, self.backend)
            eps = rng.normal(shape)
        else:
            eps = check_array("eps", eps, self.backend, shape, check_finite)
        self._step = None                          # a failed loss leaves nothing to backward
        mu, logvar = self._encoder_output(x, one_hot, train=True)
        terms, step = self._objective.forward(
            x, mu, logvar, eps, lambda z: self.decoder.forward(self._with_labels(z, one_hot)))
        if check_finite:
            self._check_loss(terms, logvar)
        self._step = step
        return terms

    def _check_loss(self, terms: ELBOTerms, logvar) -> None:
        values = self.backend.to_numpy(self.backend.xp.stack([terms.kl, terms.recon]))
        kl, recon = (float(v) for v in values)
        if math.isfinite(kl) and math.isfinite(recon):
            return
        largest = float(self.backend.to_numpy(self.backend.xp.max(logvar)))
        raise FloatingPointError(
            f"VAE.loss: the loss is not finite (KL {kl}, reconstruction {recon}; the "
            f"largest encoder logvar is {largest:g}, and exp() overflows above "
            f"{math.log(np.finfo(self.backend.numpy_dtype).max):.0f}); training has diverged: "
            f"lower the learning rate or clip the gradient norm")

    def backward(self) -> None:
        """Write d loss / d parameter into ``self.parameters.grads`` (all of them), from
        what the last :meth:`loss` kept; once per loss."""
        step = self._step
        if step is None:
            raise RuntimeError("VAE.backward called before VAE.loss (or twice for one loss)")
        self._step = None
        dmu, dlogvar = self._objective.backward(step, self._decoder_backward)
        # x needs no gradient: skip the encoder's first dx, its largest backward product.
        self.encoder.backward(self.backend.xp.concat([dmu, dlogvar], axis=1), input_grad=False)

    # ----------------------------------------------------------------------------------
    # Parameters

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.parameters.state_dict()

    def load_state_dict(self, arrays) -> None:
        self.parameters.load_state_dict(arrays)

    @property
    def num_parameters(self) -> int:
        return self.parameters.size
