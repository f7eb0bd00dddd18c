"""Backward passes to write yourself. Each one is checked by vae_np's own gradient checker.

Replace every line marked ``TODO`` with your code (NumPy only), then run, from the
repository root,

    python examples/exercises/check.py                    # every exercise
    python examples/exercises/check.py kl_grad            # just one
    python examples/exercises/check.py --train            # then train a small VAE with yours

The checker compares each gradient you return with central differences of the library's
own forward pass, entry by entry, and lists the entries that disagree. As given, every
function returns zeros (or skips the bias correction), so every check fails: that is the
starting point. The chapters derive each answer; examples/exercises/README.md says where,
and which library function is the solution.

Shapes: N examples, S samples per example, d latent dimensions, D_in and D_out layer
widths. Every gradient has the shape of the array it is the gradient of.
"""

import numpy as np


# ----------------------------------------------------------------------------------------
# 1. Linear layer (docs/03-layers.md, "Linear")


def linear_backward(x, W, b, dout):
    """Backward of y = x @ W + b.

    Args:
        x: (N, D_in) the layer's input; W: (D_in, D_out); b: (D_out,).
        dout: (N, D_out), dL/dy.
    Returns:
        (dx, dW, db): dL/dx (N, D_in), dL/dW (D_in, D_out), dL/db (D_out,).
    """
    dx = np.zeros_like(x)   # TODO
    dW = np.zeros_like(W)   # TODO
    db = np.zeros_like(b)   # TODO
    return dx, dW, db


# ----------------------------------------------------------------------------------------
# 2. Sigmoid layer (docs/03-layers.md, "Element-wise activations")


def sigmoid_backward(y, dout):
    """Backward of y = sigmoid(x) = 1 / (1 + exp(-x)), element-wise.

    Args:
        y: (N, D) the layer's *output* (what its forward keeps); dout: (N, D), dL/dy.
    Returns:
        dL/dx: (N, D).
    """
    dx = np.zeros_like(y)   # TODO
    return dx


# ----------------------------------------------------------------------------------------
# 3. Bernoulli likelihood with logits (docs/04-losses.md, "Bernoulli")


def bernoulli_nll_grad(x, logits):
    """Gradient of the Bernoulli negative log-likelihood with logits,

        nll = sum_{n,i} softplus(l_ni) - x_ni l_ni,

    with respect to the logits l.

    Args:
        x: (N, c) targets in [0, 1]; logits: (N, c).
    Returns:
        d nll / d logits: (N, c).
    """
    dlogits = np.zeros_like(logits)   # TODO
    return dlogits


# ----------------------------------------------------------------------------------------
# 4. KL divergence to the prior (docs/04-losses.md, "KL to the standard normal")


def kl_grad(mu, logvar):
    """Gradients of KL = 1/2 sum_{n,i} ( exp(logvar_ni) - logvar_ni - 1 + mu_ni^2 ).

    Args:
        mu, logvar: (N, d).
    Returns:
        (dmu, dlogvar): (N, d) each.
    """
    dmu = np.zeros_like(mu)           # TODO
    dlogvar = np.zeros_like(logvar)   # TODO
    return dmu, dlogvar


# ----------------------------------------------------------------------------------------
# 5. Reparameterisation (docs/02-reparameterization.md, "The two derivatives")


def reparameterize(mu, logvar, eps):
    """GIVEN (the forward; nothing to do): z = mu + exp(logvar / 2) * eps.

    mu, logvar: (N, d); eps: (S, N, d) standard normal noise. Returns z: (S, N, d).
    The checker tests it too (its samples must have mean mu and variance exp(logvar)):
    see "Try breaking this" in examples/exercises/README.md.
    """
    return mu + np.exp(0.5 * logvar) * eps


def reparameterize_backward(dz, logvar, eps):
    """Backward of :func:`reparameterize`: every sample s of example n used the same
    mu_n and logvar_n.

    Args:
        dz: (S, N, d), dL/dz; logvar: (N, d); eps: (S, N, d), the noise the forward used.
    Returns:
        (dmu, dlogvar): (N, d) each.
    """
    dmu = np.zeros_like(logvar)       # TODO
    dlogvar = np.zeros_like(logvar)   # TODO
    return dmu, dlogvar


# ----------------------------------------------------------------------------------------
# 6. Adam's bias correction (docs/06-adam.md, "Why the bias correction")


def adam_step(theta, g, m, v, t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
    """One Adam step (Kingma and Ba, Algorithm 1) at step t = 1, 2, ...

    Args:
        theta: parameters; g: their gradient; m, v: the moments after step t - 1
            (zeros before the first step); all arrays of one shape.
    Returns:
        (theta, m, v) after step t, as new arrays.
    """
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m   # TODO: the bias correction of m
    v_hat = v   # TODO: the bias correction of v
    theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
    return theta, m, v


# ----------------------------------------------------------------------------------------
# 7. Convolution (docs/10-convolution.md, "Conv2d backward" and "col2im")


def conv2d_backward(x, W, b, dout, stride, padding):
    """Backward of the cross-correlation y = conv2d(x; W, b) with zero padding:

        y[n, o, p, q] = b[o] + sum_{c, i, j} W[o, c, i, j] xpad[n, c, s p + i, s q + j]

    Args:
        x: (N, C, H, W) input; W: (O, C, k, k) weights; b: (O,) bias;
        dout: (N, O, Ho, Wo) = dL/dy; stride s and padding p: integers (the same for rows
        and columns); xpad is x with p zeros on every side.
    Returns:
        (dx, dW, db), the shapes of x, W and b. Hint: pad x, then loop over the kernel
        offsets (i, j): the slice xpad[:, :, i:i + s*(Ho-1) + 1:s, j:j + s*(Wo-1) + 1:s] is
        what W[:, :, i, j] multiplies; dx is the interior of a padded gradient.
    """
    dx = np.zeros_like(x)   # TODO
    dW = np.zeros_like(W)   # TODO
    db = np.zeros_like(b)   # TODO
    return dx, dW, db


# ----------------------------------------------------------------------------------------
# 8. Max-pool (docs/10-convolution.md, "Max-pool: routing")


def maxpool2d_backward(x, dout, k):
    """Backward of y[n, c, p, q] = max over the k x k window x[n, c, k p:k p + k, k q:k q + k]
    (windows do not overlap; H and W are multiples of k).

    Args:
        x: (N, C, H, W) input; dout: (N, C, H / k, W / k) = dL/dy; k: the window size.
    Returns:
        dx (N, C, H, W): each dout entry goes to its window's maximum, 0 elsewhere. (The
        checker's windows have one clear maximum; on a tie the library picks the first in
        row-major order.)
    """
    dx = np.zeros_like(x)   # TODO
    return dx
