"""benchmarks/peers.py times the same step as vae_np's: the JAX and PyTorch peers' losses
and gradients at the same weights and noise are vae_np's (float64), so their columns
compare like with like."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from vae_np import VAE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers  # noqa: E402

pytestmark = pytest.mark.slow   # importing JAX or PyTorch alone takes seconds


def vae_np_loss_and_gradients(activation):
    """A small float64 model with its biases off zero (so ReLU's kink is not hit), a batch,
    noise, and vae_np's loss and gradients there: (config, state, x, eps, loss, grads)."""
    config = {"input_dim": 12, "hidden": (7, 5), "latent_dim": 3, "activation": activation}
    model = VAE(12, config["hidden"], config["latent_dim"], activation=activation,
                backend="numpy", dtype="float64", seed=3)
    rng = np.random.default_rng(0)
    state = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    x = (rng.random((4, 12)) < 0.4).astype(np.float64)
    eps = rng.standard_normal((4, 3))
    terms = model.loss(x, eps=eps[None])
    model.backward()
    grads = {name: model.parameters.grad[off:off + int(np.prod(model.parameters.shapes[name]))]
             .reshape(model.parameters.shapes[name])
             for name, off in model.parameters.offsets.items()}
    return config, state, x, eps, float(terms.loss), grads


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_jax_loss_and_gradient_are_vae_nps(activation):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    config, state, x, eps, loss_ours, grads = vae_np_loss_and_gradients(activation)

    params = [(jnp.asarray(W), jnp.asarray(b)) for W, b in peers._weights(state)]
    loss, jgrads = jax.value_and_grad(
        lambda p: peers.jax_loss(jnp, p, jnp.asarray(x), jnp.asarray(eps), config))(params)
    # float64 round-off of a few hundred operations: 1e-12 relative leaves a wide margin
    # while any wrong term (a missing 1/N, a swapped activation) is off by far more
    assert float(loss) == pytest.approx(loss_ours, rel=1e-12)
    flat = [g for pair in jgrads for g in pair]
    for (name, ours), theirs in zip(grads.items(), flat):
        np.testing.assert_allclose(np.asarray(theirs), ours, rtol=1e-9, atol=1e-12,
                                   err_msg=name)


def test_jax_conv_networks_compute_vae_nps_gradients():
    """bench_conv's jax.jit column does network_pair's work: the same parameter gradients
    as vae_np's conv networks for the same upstream gradients (float64)."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    from vae_np.backend import get_backend
    from vae_np.networks import conv_networks
    backend, rng = get_backend("numpy", "float64"), np.random.default_rng(1)
    latent = 3
    enc, dec = conv_networks((8, 8), latent, 1, backend, rng, channels=(2, 3), hidden=(6,))
    for layer in [*enc.layers, *dec.layers]:
        if "b" in layer.params:   # zero biases put a dead patch's successor on ReLU's kink,
            layer.params["b"][...] = 0.1 * rng.standard_normal(layer.params["b"].shape)
            # where JAX's maximum gives half a slope and vae_np's ReLU none
    x = rng.uniform(size=(4, 64))
    g_out, g_h = rng.standard_normal((4, 64)), rng.standard_normal((4, 2 * latent))
    h = enc.forward(x)
    dec.forward(h[:, :latent])
    dh = g_h.copy()
    dh[:, :latent] += dec.backward(g_out)
    enc.backward(dh, input_grad=False)
    ours = [layer.grads[k] for net in (enc, dec) for layer in net.layers
            if "W" in layer.params for k in ("W", "b")]
    grad, params = peers.jax_conv_gradients(jax, enc, dec, latent, g_out, g_h)
    theirs = [g for net in grad(params, jax.numpy.asarray(x)) for pair in net for g in pair]
    assert len(theirs) == len(ours) == 16      # 2 convs and 2 Linears a network, W and b each
    for name, (t, o) in enumerate(zip(theirs, ours)):
        # float64 sums of a few hundred terms in another order: 1e-10 is far above their
        # round-off and far below any wrong term
        np.testing.assert_allclose(np.asarray(t), o, rtol=1e-10, atol=1e-12, err_msg=str(name))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_torch_loss_and_gradient_are_vae_nps(activation):
    torch = pytest.importorskip("torch")
    config, state, x, eps, loss_ours, grads = vae_np_loss_and_gradients(activation)
    peer = peers.TorchVAE(torch, "cpu", "float64", config, state)
    loss = peer.loss_fn(torch.as_tensor(x), torch.as_tensor(eps))
    loss.backward()
    # the same tolerances as JAX's: float64 round-off against terms that are off by far more
    assert loss.item() == pytest.approx(loss_ours, rel=1e-12)
    theirs = [g for lin in peer.linears for g in (lin.weight.grad.T, lin.bias.grad)]
    for (name, ours), g in zip(grads.items(), theirs):
        np.testing.assert_allclose(g.numpy(), ours, rtol=1e-9, atol=1e-12, err_msg=name)
    # the test set's sum is the batch mean times its images, without a gradient
    torch.manual_seed(0)
    mean = peer.loss_fn(torch.as_tensor(x)).item()
    torch.manual_seed(0)
    total = peer.test_loss_sum(torch.as_tensor(x))
    assert not total.requires_grad and float(total) == pytest.approx(4 * mean, rel=1e-12)
