"""The CUDA twins of the ops (CuPy kernels), keyed by op name: see ``backend.fast_twin``.

A leaf: it imports nothing from the package; CuPy is imported by the twins themselves,
so this module loads (and ``tests/test_cuda_sources.py`` compiles every source in
``SOURCES`` with NVRTC) on a machine without a GPU.

Each twin takes its reference's arguments and returns its results, or NotImplemented for
arguments it does not serve (anything but CuPy arrays of one float dtype in the shapes the
op documents; the reference then runs, and raises what bad arguments deserve). Every
kernel is compiled without FMA contraction (``--fmad=false``), so ``a * b + c`` rounds
twice, as NumPy does; the transcendental functions are CUDA's own (a few ulps from
NumPy's), so the GPU tests compare with a tolerance.
"""

from __future__ import annotations

import math

import numpy as np

OPTIONS = ("--fmad=false",)

#: name -> (input parameters, output parameters, body), as ``cupy.ElementwiseKernel`` takes
#: them; ``T`` is the floating type of the arrays (float or double).
SOURCES = {
    # Adam, the reference's expression order (optim.adam_update).
    # Moments below tiny (the smallest normal number) become +0; NaN compares false and stays.
    "adam": ("T g, T b1, T c1, T b2, T c2, T d1, T d2, T lr, T eps, T tiny", "T p, T m, T v", """
        T mi = b1 * m + c1 * g;
        T vi = b2 * v + c2 * (g * g);
        if (fabs(mi) < tiny) mi = (T)0;
        if (vi < tiny) vi = (T)0;
        m = mi;
        v = vi;
        p = p - lr * (mi / d1) / (sqrt(vi / d2) + eps);
    """),
    # y = max(y + b, 0) in place (NaN stays NaN, as with numpy.maximum).
    "bias_relu": ("T b", "T y", """
        T a = y + b;
        y = (a > (T)0 || a != a) ? a : (T)0;
    """),
    # ReLU backward: where(out > 0, dout, 0).
    "relu_backward": ("T out, T dout", "T dx", "dx = out > (T)0 ? dout : (T)0;"),
    # z = mu + exp(logvar / 2) eps, broadcast over the S samples.
    "reparameterize": ("T mu, T logvar, T eps", "T z", "z = mu + exp((T)0.5 * logvar) * eps;"),
    # Bernoulli tail: per-pixel softplus(l) - x l and its gradient sigmoid(l) - x
    # (losses.bernoulli_nll with ops.softplus / ops.sigmoid, operation for operation).
    "bernoulli": ("T x, T l", "T term, T grad", """
        T sp = max(l, (T)0) + log1p(exp(-fabs(l)));
        term = sp - x * l;
        grad = ((T)0.5 + (T)0.5 * tanh((T)0.5 * l)) - x;
    """),
    # KL(q || N(0, I)) per latent dimension and its log-variance gradient
    # (losses.kl_standard_normal; the mu gradient is mu itself).
    "kl": ("T mu, T logvar", "T term, T dlogvar", """
        T var_minus_one = expm1(logvar);
        term = (var_minus_one - logvar) + mu * mu;
        dlogvar = (T)0.5 * var_minus_one;
    """),
    # The importance-weighted bound (objectives.iwae_bound, after
    # ops.logsumexp_and_softmax): log_w (S, N) against its column maxima peak (1, N),
    # broadcast; an all -inf column is shifted by 0, so that exp gives 0 there instead of
    # the NaN of -inf - -inf.
    "iwae_shifted_exp": ("T log_w, T peak", "T e", """
        e = exp(log_w - (isfinite(peak) ? peak : (T)0));
    """),
    # ln sum_s e_s + shift (1, N): logsumexp of each column (-inf where the sum is 0).
    "iwae_log_total": ("T total, T peak", "T lse", """
        lse = log(total) + (isfinite(peak) ? peak : (T)0);
    """),
    # The normalised weights e / total (S, N); a zero (or NaN) total divides by 1 instead.
    "iwae_normalize": ("T e, T total", "T w", """
        w = e / (total > (T)0 ? total : (T)1);
    """),
    # d loss / d z of the IWAE loss (objectives.iwae_latent_backward): the decoder's dz
    # plus the prior's a z, a = w~ / N (S, N, 1) broadcast over the latent dimensions.
    "iwae_prior_grad": ("T dz, T a, T z", "T out", """
        out = dz + a * z;
    """),
}

#: name -> the inputs its twin passes as scalars (NumPy scalars of the array dtype), which
#: CuPy hands the kernel by value (``const T b1``) rather than as an array element
#: (``const T &g``). tests/test_cuda_sources.py reads it, to compile each kernel as it is
#: called; a kernel not listed takes arrays only.
SCALAR_INPUTS = {
    "adam": ("b1", "c1", "b2", "c2", "d1", "d2", "lr", "eps", "tiny"),
}

_compiled: dict = {}


def _cupy():
    import cupy

    return cupy


def kernel(name: str):
    """The ElementwiseKernel ``name`` of ``SOURCES`` (built once; CuPy compiles it with
    NVRTC at the first call and caches the binary on disk)."""
    compiled = _compiled.get(name)
    if compiled is None:
        in_params, out_params, body = SOURCES[name]
        compiled = _cupy().ElementwiseKernel(in_params, out_params, body, f"vae_np_{name}",
                                             options=OPTIONS)
        _compiled[name] = compiled
    return compiled


def _served(*arrays) -> bool:
    """All CuPy arrays of one float dtype (float32 or float64)."""
    cupy = _cupy()
    first = arrays[0]
    if not isinstance(first, cupy.ndarray) or first.dtype.char not in "fd":
        return False
    return all(isinstance(a, cupy.ndarray) and a.dtype == first.dtype for a in arrays[1:])


# ------------------------------------------------------------------------------------------
# layers


def linear_relu_forward(x, W, b):
    if not (_served(x, W, b) and x.ndim == 2 and W.ndim == 2 and b.shape == (W.shape[1],)
            and x.shape[1] == W.shape[0]):
        return NotImplemented
    out = _cupy().matmul(x, W)                  # fresh: ours to change in place
    kernel("bias_relu")(b, out)
    return out


def relu_backward(out, dout):
    if not (_served(out, dout) and out.shape == dout.shape):
        return NotImplemented
    return kernel("relu_backward")(out, dout)


def matmul_into(out, a, b):
    if not (_served(out, a, b) and a.ndim == 2 and b.ndim == 2 and out.flags.c_contiguous
            and out.shape == (a.shape[0], b.shape[1]) and a.shape[1] == b.shape[0]):
        return NotImplemented
    return _cupy().matmul(a, b, out=out)


# ------------------------------------------------------------------------------------------
# losses


def kl_standard_normal(mu, logvar, reduction="none"):
    if not (reduction == "none" and _served(mu, logvar) and mu.ndim == 2
            and mu.shape == logvar.shape):
        return NotImplemented
    term, dlogvar = kernel("kl")(mu, logvar)
    return 0.5 * _cupy().sum(term, axis=1), mu, dlogvar


def bernoulli_nll(x, logits, reduction="none"):
    if not (reduction == "none" and _served(x, logits) and logits.ndim == 2
            and x.shape == logits.shape):
        return NotImplemented
    term, grad = kernel("bernoulli")(x, logits)
    return _cupy().sum(term, axis=1), grad


# ------------------------------------------------------------------------------------------
# optim


def adam_update(p, g, m, v, t, lr, beta1, beta2, eps):
    if not (_served(p, g, m, v) and p.ndim == 1 and p.shape == g.shape == m.shape == v.shape):
        return NotImplemented
    dt = p.dtype.type
    kernel("adam")(g, dt(beta1), dt(1.0 - beta1), dt(beta2), dt(1.0 - beta2),
                   dt(1.0 - beta1 ** t), dt(1.0 - beta2 ** t), dt(lr), dt(eps),
                   dt(np.finfo(dt).tiny), p, m, v)
    return None


# ------------------------------------------------------------------------------------------
# objectives


def reparameterize(mu, logvar, eps):
    if not (_served(mu, logvar, eps) and mu.ndim == 2 and mu.shape == logvar.shape
            and eps.ndim == 3 and eps.shape[1:] == mu.shape):
        return NotImplemented
    return kernel("reparameterize")(mu, logvar, eps)


def iwae_bound(log_w):
    """Three small kernels around CuPy's max and sum over the samples, no host read."""
    if not (_served(log_w) and log_w.ndim == 2):
        return NotImplemented
    cupy = _cupy()
    peak = cupy.max(log_w, axis=0, keepdims=True)                   # (1, N)
    weights = kernel("iwae_shifted_exp")(log_w, peak)
    total = cupy.sum(weights, axis=0, keepdims=True)
    bound = kernel("iwae_log_total")(total, peak)
    bound -= math.log(log_w.shape[0])
    weights = kernel("iwae_normalize")(weights, total)
    return cupy.reshape(bound, (-1,)), weights


def iwae_latent_backward(dz, dloss_dnll, z, logvar, eps):
    if not (_served(dz, dloss_dnll, z, logvar, eps) and dz.ndim == 3
            and dz.shape == z.shape == eps.shape and dloss_dnll.shape == dz.shape[:2]
            and logvar.shape == dz.shape[1:]):
        return NotImplemented
    cupy = _cupy()
    total = kernel("iwae_prior_grad")(dz, dloss_dnll[:, :, None], z)
    dmu = cupy.sum(total, axis=0)
    dlogvar = cupy.sum(total * eps, axis=0) * (0.5 * cupy.exp(0.5 * logvar))
    half = cupy.sum(dloss_dnll, axis=0)
    half *= 0.5
    dlogvar -= half[:, None]
    return dmu, dlogvar


#: op name ("module.qualname") -> twin taking the reference's arguments.
TWINS: dict = {
    "layers.linear_relu_forward": linear_relu_forward,
    "layers.relu_backward": relu_backward,
    "layers.matmul_into": matmul_into,
    "losses.kl_standard_normal": kl_standard_normal,
    "losses.bernoulli_nll": bernoulli_nll,
    "optim.adam_update": adam_update,
    "objectives.reparameterize": reparameterize,
    "objectives.iwae_bound": iwae_bound,
    "objectives.iwae_latent_backward": iwae_latent_backward,
}
