"""The peers vae_np's training step is timed against, each the same model and step:
PyTorch eager (default and fused Adam), torch.compile, and a whole step under ``jax.jit``.

The same model everywhere: Linear layers with the configuration's activation between them
(ReLU, or tanh for the Burda configuration), ``x - input_shift`` into the encoder, whose
last layer gives [mu, logvar]; one reparameterised sample; the Bernoulli loss with logits
plus the closed-form KL, summed over pixels and latent units and averaged over the batch;
Adam (lr 1e-3, betas 0.9 / 0.999, eps 1e-8). Every peer starts from vae_np's own weights
(``init_from``: a ``VAE.state_dict()``, W stored in x out), so the initialisation scheme
is the same too. Each builder returns ``(step, sync)``: ``step()`` runs one training step,
``sync()`` waits until the device has finished it (``block_until_ready`` for JAX), so a
clock read after ``sync()`` times finished work.

The builders wrap one class per framework, :class:`TorchVAE` and :class:`JaxVAE`, which
take a new batch each step and also score a test batch (the sum of its per-image -ELBO,
one sample): what bench_epoch.py needs to train and evaluate a whole epoch.
"""

from __future__ import annotations

import numpy as np

INPUT_DIM = 784


def layer_sizes(config: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(encoder sizes, decoder sizes) of a configuration: c -> hidden -> 2d, d -> c, with c
    the configuration's ``input_dim`` (default 784, MNIST's)."""
    hidden, d = tuple(config["hidden"]), config["latent_dim"]
    c = config.get("input_dim", INPUT_DIM)
    return (c, *hidden, 2 * d), (d, *reversed(hidden), c)


def _weights(init_from: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W, b) per Linear, encoder first, from a VAE state_dict (W is in x out)."""
    arrays = list(init_from.values())
    return list(zip(arrays[0::2], arrays[1::2]))


# ------------------------------------------------------------------------------------------
# PyTorch


class TorchVAE:
    """The model and Adam in PyTorch eager (``compile_step``: its forward and loss under
    ``torch.compile``; backward and Adam stay eager, as torch.compile leaves them).

    ``train_step(x)``: one step on the batch ``x`` (N, 784) tensor of 0/1 pixels; returns
    the loss tensor (no read-back). ``test_loss_sum(x)``: the sum over the rows of ``x``
    of the per-image -ELBO with one sample, under ``torch.no_grad()``, a 0-d tensor.
    ``loss_fn(x, eps=None)``: the batch's -ELBO at noise ``eps`` (N, d), or at noise from
    torch's global generator (``torch.manual_seed`` fixes it). ``linears``: the
    ``nn.Linear`` modules, encoder first (vae_np's order)."""

    def __init__(self, torch, device, dtype_name, config, init_from, fused_adam: bool = False,
                 compile_step: bool = False):
        nn = torch.nn
        self.torch, self.device, self.dtype = torch, device, getattr(torch, dtype_name)
        enc_sizes, dec_sizes = layer_sizes(config)
        activation = {"relu": nn.ReLU, "tanh": nn.Tanh}[config.get("activation", "relu")]

        def mlp(sizes):
            layers = []
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
                layers.append(nn.Linear(a, b))
                if i < len(sizes) - 2:
                    layers.append(activation())
            return nn.Sequential(*layers).to(device=device, dtype=self.dtype)

        enc, dec = mlp(enc_sizes), mlp(dec_sizes)
        self.linears = [m for m in (*enc, *dec) if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for lin, (W, b) in zip(self.linears, _weights(init_from)):
                lin.weight.copy_(torch.as_tensor(np.ascontiguousarray(W.T)))
                lin.bias.copy_(torch.as_tensor(b))
        self.optimizer = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3,
                                          fused=fused_adam)
        d, shift = config["latent_dim"], config.get("input_shift", 0.5)
        bce = nn.functional.binary_cross_entropy_with_logits

        def loss_fn(x, eps=None):
            n = x.shape[0]
            h = enc(x - shift)
            mu, logvar = h[:, :d], h[:, d:]
            z = mu + torch.exp(0.5 * logvar) * (torch.randn_like(mu) if eps is None else eps)
            logits = dec(z)
            recon = bce(logits, x, reduction="sum") / n
            kl = 0.5 * torch.sum(torch.exp(logvar) - logvar - 1.0 + mu * mu) / n
            return recon + kl

        self.loss_fn = torch.compile(loss_fn) if compile_step else loss_fn
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def train_step(self, x):
        loss = self.loss_fn(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def test_loss_sum(self, x):
        with self.torch.no_grad():
            return self.loss_fn(x) * x.shape[0]


def make_torch(torch, device, dtype_name, config, x_host, init_from, fused_adam: bool = False,
               compile_step: bool = False):
    """The step of :class:`TorchVAE` on the fixed batch ``x_host``."""
    peer = TorchVAE(torch, device, dtype_name, config, init_from, fused_adam, compile_step)
    x = torch.as_tensor(x_host, dtype=peer.dtype, device=device)
    return (lambda: peer.train_step(x)), peer.sync


# ------------------------------------------------------------------------------------------
# JAX


def jax_loss(jnp, params, x, eps, config):
    """The negative ELBO of a batch in JAX, at given noise ``eps`` (N, d): the function
    ``jax.grad`` differentiates (and tests/test_bench_peers.py compares with vae_np's)."""
    act = {"relu": lambda h: jnp.maximum(h, 0.0), "tanh": jnp.tanh}[
        config.get("activation", "relu")]
    n_enc = len(config["hidden"]) + 1
    d = config["latent_dim"]

    def mlp(layers, h):
        for i, (W, b) in enumerate(layers):
            h = h @ W + b
            if i < len(layers) - 1:
                h = act(h)
        return h

    h = mlp(params[:n_enc], x - config.get("input_shift", 0.5))
    mu, logvar = h[:, :d], h[:, d:]
    z = mu + jnp.exp(0.5 * logvar) * eps
    logits = mlp(params[n_enc:], z)
    # Bernoulli nll with logits l: softplus(l) - x l, the stable form
    recon = jnp.sum(jnp.logaddexp(0.0, logits) - x * logits)
    kl = 0.5 * jnp.sum(jnp.exp(logvar) - logvar - 1.0 + mu * mu)
    return (recon + kl) / x.shape[0]


class JaxVAE:
    """The whole step (noise, forward, backward, Adam) as one ``jax.jit`` function whose
    parameter and moment buffers are donated (updated in place, as vae_np's are).

    ``train_step(x)``: one step on the batch ``x`` (N, 784), a host or device array; with
    ``binarize`` ``x`` holds intensities and is drawn to 0/1 inside the jitted step
    (``jax.random.bernoulli``, from the step's key), else it holds 0/1 pixels already.
    ``test_loss_sum(x, key)``: the sum over the rows of ``x`` of the per-image -ELBO with
    one sample drawn from ``key``, jitted; a 0-d device array. ``reset()`` restores the
    initial weights, zero moments and the seed's key, keeping the compiled functions (one
    compilation per batch shape, then one instance serves every epoch). ``sync()`` waits
    for the parameters."""

    def __init__(self, jax, dtype_name, config, init_from, seed: int = 0,
                 binarize: bool = False):
        jnp = jax.numpy
        if dtype_name == "float64":
            jax.config.update("jax_enable_x64", True)
        self.jax, self.dtype = jax, getattr(jnp, dtype_name)
        self._init, self._seed = init_from, seed
        dtype, d = self.dtype, config["latent_dim"]
        lr, b1, b2, eps_adam = 1e-3, 0.9, 0.999, 1e-8
        grad_fn = jax.value_and_grad(lambda p, x, e: jax_loss(jnp, p, x, e, config))
        tree_map = jax.tree_util.tree_map

        def train_step(params, m, v, t, key, x):
            key, sub = jax.random.split(key)
            if binarize:
                sub, draw = jax.random.split(sub)
                x = jax.random.bernoulli(draw, x).astype(dtype)
            noise = jax.random.normal(sub, (x.shape[0], d), dtype)
            loss, grads = grad_fn(params, x, noise)
            t = t + 1
            m = tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
            v = tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
            # vae_np.optim.adam_update's form: the bias corrections as two scalars
            step_size, inv_sqrt_c2 = lr / (1 - b1 ** t), 1 / jnp.sqrt(1 - b2 ** t)
            params = tree_map(
                lambda p, m, v: p - step_size * m / (jnp.sqrt(v) * inv_sqrt_c2 + eps_adam),
                params, m, v)
            return params, m, v, t, key, loss

        def test_loss_sum(params, x, key):
            eps = jax.random.normal(key, (x.shape[0], d), dtype)
            return jax_loss(jnp, params, x, eps, config) * x.shape[0]

        self._step = jax.jit(train_step, donate_argnums=(0, 1, 2))
        self._test = jax.jit(test_loss_sum)
        self.reset()

    def reset(self) -> None:
        jax, jnp, dtype = self.jax, self.jax.numpy, self.dtype
        params = [(jnp.asarray(W, dtype), jnp.asarray(b, dtype)) for W, b in _weights(self._init)]
        zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, params)  # noqa: E731
        self.state = [params, zeros(), zeros(), jnp.asarray(0.0, dtype),
                      jax.random.PRNGKey(self._seed)]

    def train_step(self, x):
        *new, loss = self._step(*self.state, x)
        self.state[:] = new
        return loss

    def test_loss_sum(self, x, key):
        return self._test(self.state[0], x, key)

    def sync(self) -> None:
        self.jax.block_until_ready(self.state[0])


def make_jax(jax, dtype_name, config, x_host, init_from, seed: int = 0):
    """The step of :class:`JaxVAE` on the fixed batch ``x_host`` (0/1 pixels)."""
    peer = JaxVAE(jax, dtype_name, config, init_from, seed)
    x = jax.numpy.asarray(x_host, peer.dtype)
    return (lambda: peer.train_step(x)), peer.sync


# ------------------------------------------------------------------------------------------
# JAX: threads, and the convolutional networks (benchmarks/bench_conv.py)


def import_jax(threads: int):
    """``jax``, its CPU thread pool limited to ``threads`` where XLA allows it (one thread:
    Eigen's multi-threading off; the flags must be set before the first import), or None
    when JAX is not installed."""
    import os
    import sys
    if threads == 1 and "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (f"{flags} --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
    try:
        import jax
    except ImportError:
        return None
    return jax


def jax_conv_apply(jax, layers, params, h):
    """vae_np ``layers`` (a conv network's: Unflatten, Conv2d, ReLU, MaxPool2d, Flatten,
    Linear, Upsample; one channel group, channels first) run in JAX on ``h`` with
    ``params``, one (W, b) per Conv2d or Linear in order (W as vae_np stores it)."""
    jnp, lax = jax.numpy, jax.lax
    params = iter(params)
    for layer in layers:
        kind = type(layer).__name__
        if kind == "Unflatten":
            h = h.reshape((h.shape[0], *layer.shape))
        elif kind == "Flatten":
            h = h.reshape((h.shape[0], -1))
        elif kind == "Linear":
            W, b = next(params)
            h = h @ W + b
        elif kind == "Conv2d":
            W, b = next(params)
            (ph, pw) = layer.padding
            h = lax.conv_general_dilated(h, W, layer.stride, ((ph, ph), (pw, pw)),
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
            h = h + b[None, :, None, None]
        elif kind == "ReLU":
            h = jnp.maximum(h, 0.0)
        elif kind == "MaxPool2d":
            k = layer.kernel_size
            h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 1, k, k), (1, 1, k, k), "VALID")
        elif kind == "Upsample":
            f = layer.scale_factor
            h = jnp.repeat(jnp.repeat(h, f, axis=2), f, axis=3)
        else:
            raise ValueError(f"layers: no JAX twin for {kind}")
    return h


def jax_conv_gradients(jax, encoder, decoder, latent, g_out, g_h):
    """(grad, params): ``grad(params, x)`` under ``jax.jit`` runs the encoder, the decoder
    on the encoder's first ``latent`` outputs, and returns the gradients of every
    parameter for fixed upstream gradients ``g_out`` (decoder output) and ``g_h`` (encoder
    output), as nested lists of (dW, db); ``params`` are the networks' own weights."""
    jnp = jax.numpy

    def weights(net):
        return [(jnp.asarray(layer.params["W"]), jnp.asarray(layer.params["b"]))
                for layer in net.layers if "W" in layer.params]

    g_out, g_h = jnp.asarray(g_out), jnp.asarray(g_h)

    def objective(params, x):
        h = jax_conv_apply(jax, encoder.layers, params[0], x)
        out = jax_conv_apply(jax, decoder.layers, params[1], h[:, :latent])
        return jnp.sum(out * g_out) + jnp.sum(h * g_h)

    return jax.jit(jax.grad(objective)), [weights(encoder), weights(decoder)]


def make_jax_conv_networks(jax, encoder, decoder, latent, x, g_out, g_h):
    """bench_conv.network_pair's work under one ``jax.jit`` (:func:`jax_conv_gradients`)
    on ``x``. Returns ``(step, sync)``."""
    grad, params = jax_conv_gradients(jax, encoder, decoder, latent, g_out, g_h)
    x = jax.numpy.asarray(x)
    result = [None]

    def step():
        result[0] = grad(params, x)

    def sync():
        jax.block_until_ready(result[0])

    return step, sync
