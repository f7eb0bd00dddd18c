"""Fast paths for a training step: the reference arithmetic with fewer passes over memory.

The readable code in ``layers``, ``losses``, ``model`` and ``optim`` defines the math; the
gradient checks and learners read it. On a CPU, though, a step of that code spends much of
its time outside the matrix products (benchmarks/README.md has the profile): Adam's update
makes about fourteen passes and five temporaries over 1.4 M parameters, every bias add,
ReLU and loss term allocates a fresh array, and weight gradients are computed into a
temporary and then copied into the flat gradient buffer. This module removes that overhead:

- :func:`adam_update`: Adam in one pass over the flat buffers (numba, when installed),
  else in cache-sized chunks with two small scratch buffers (plain NumPy); one
  ``ElementwiseKernel`` on CuPy.
- :func:`mlp_forward` / :func:`mlp_backward`: bias and ReLU applied in place on the fresh
  matmul output; ``matmul(x.T, dout, out=grads["W"])`` writes each weight gradient straight
  into its view of the flat gradient buffer; ReLU's mask is applied in place (numba).
- :func:`vae_loss` / :func:`vae_backward`: ``VAE.loss`` and ``VAE.backward`` built from the
  above, with the Bernoulli loss tail in place (one fused kernel on CuPy, as are the
  reparameterisation and the KL term; two numba passes around NumPy's exp, log1p and tanh
  on the CPU, the second also scaling the gradient by 1 / (S N) and summing the decoder's
  output bias gradient). With numba, the latent tail is compiled too: reparameterisation
  and KL around NumPy's exp and expm1, and one pass from dz to the encoder's (N, 2d)
  output gradient (no dmu, dlogvar or concatenate temporaries).

Same bits. Every fast path performs the reference's IEEE operations in the same order on
the same dtype (Python-float constants are rounded to the array dtype once, exactly as
NumPy rounds a weak scalar), so on NumPy the results are identical to the last bit:
tests/test_fast_paths.py asserts exact equality for every decoder, in float32 and float64.
On CuPy the fused kernels are compiled with ``--fmad=false`` (no contraction into fused
multiply-adds), but CUDA's exp, tanh and log1p differ from NumPy's by a few ulps, so the
GPU tests compare with a tolerance. Nothing here reads a device value back to the host.

Where the fast paths run: ``enabled(backend)`` is true for the ``numpy`` and ``cupy``
backends unless switched off, with ``use_fast_paths(False)`` (a context manager) or the
environment variable ``VAE_NP_FAST_PATHS=0``; ``array_api_strict`` always runs the
reference. numba is optional (the ``fast`` extra); without it each numba kernel falls back
to NumPy operations that give the same bits, more slowly.
"""

from __future__ import annotations

import contextlib
import os
import struct

_enabled = os.environ.get("VAE_NP_FAST_PATHS", "1").strip().lower() not in ("0", "false", "no", "off")

FAST_BACKENDS = ("numpy", "cupy")


def enabled(backend) -> bool:
    """True when ``backend`` takes the fast paths (NumPy or CuPy, and not switched off)."""
    return _enabled and backend.name in FAST_BACKENDS


@contextlib.contextmanager
def use_fast_paths(on: bool = True):
    """Switch the fast paths on or off inside a ``with`` block (process-wide), e.g. to run
    the readable reference: ``with use_fast_paths(False): model.loss(x, eps=eps)``."""
    global _enabled
    previous, _enabled = _enabled, bool(on)
    try:
        yield
    finally:
        _enabled = previous


# ------------------------------------------------------------------------------------------
# Optional compiled CPU kernels (numba)

_NUMBA_UNLOADED = object()
_numba_module = _NUMBA_UNLOADED


def numba_kernels():
    """The compiled kernels module, or None when numba is not installed (imported lazily:
    numba takes a tenth of a second to import)."""
    global _numba_module
    if _numba_module is _NUMBA_UNLOADED:
        try:
            from . import _numba_kernels
        except ImportError:
            _numba_module = None
        else:
            _numba_module = _numba_kernels
    return _numba_module


# ------------------------------------------------------------------------------------------
# CuPy kernels, built on first use (CuPy compiles them with NVRTC and caches the binaries)

_cupy_kernels: dict = {}

# Every CuPy kernel is compiled without FMA contraction, so a * b + c rounds twice, as NumPy
# does; the transcendental functions are CUDA's own.
_CUPY_OPTIONS = ("--fmad=false",)

_CUPY_SOURCES = {
    # Adam, the reference's expression order (optim.Adam._update_reference).
    "adam": ("T g, T b1, T c1, T b2, T c2, T d1, T d2, T lr, T eps", "T p, T m, T v", """
        T mi = b1 * m + c1 * g;
        T vi = b2 * v + c2 * (g * g);
        m = mi;
        v = vi;
        p = p - lr * (mi / d1) / (sqrt(vi / d2) + eps);
    """),
    # y = max(y + b, 0) in place (NaN stays NaN, as with numpy.maximum).
    "bias_relu": ("T b", "T y", """
        T a = y + b;
        y = (a > (T)0 || a != a) ? a : (T)0;
    """),
    # ReLU backward in place: where(out > 0, dout, 0).
    "relu_backward": ("T out", "T dout", "dout = out > (T)0 ? dout : (T)0;"),
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
}


def _cupy_kernel(backend, name):
    kernel = _cupy_kernels.get(name)
    if kernel is None:
        in_params, out_params, body = _CUPY_SOURCES[name]
        kernel = backend.native.ElementwiseKernel(
            in_params, out_params, body, f"vae_np_{name}", options=_CUPY_OPTIONS)
        _cupy_kernels[name] = kernel
    return kernel


# ------------------------------------------------------------------------------------------
# Adam

# Elements per chunk of the NumPy fallback: six chunk-sized arrays (four operands, two
# scratch) stay in a 2 MiB L2 cache in float64 (1.5 MiB), so the fourteen passes of the
# reference read main memory once instead of fourteen times.
ADAM_CHUNK = 1 << 15


# Steps between the plain float32 kernel's looks for moments heading to subnormals (they
# take some 170 steps from 2^-100, where it looks, to 2^-126); looking costs about 20 % of
# the kernel, so it looks one step in WATCH_EVERY.
WATCH_EVERY = 16


def adam_update(backend, data, grad, m, v, lr, beta1, beta2, eps, t, state=None) -> bool:
    """Adam's step t in place on the flat buffers, as ``optim.Adam._update_reference``.

    ``state``: a dict the optimizer keeps between steps (the float32 kernel's record of
    which chunks hold moments near the subnormal range). Returns False (and does nothing)
    where no fast kernel exists, so the caller runs the reference.
    """
    if not enabled(backend):
        return False
    dt = backend.numpy_dtype.type
    # Round each Python-float constant to the array dtype once, as NumPy does when a
    # Python float meets an array (c1 = 1 - beta1 is formed in double first, as there).
    consts = (dt(beta1), dt(1.0 - beta1), dt(beta2), dt(1.0 - beta2),
              dt(1.0 - beta1 ** t), dt(1.0 - beta2 ** t), dt(lr), dt(eps))
    if backend.name == "cupy":
        _cupy_kernel(backend, "adam")(grad, *consts, data, m, v)
        return True
    compiled = numba_kernels()
    if compiled is not None and data.dtype == backend.native.float32 and state is not None:
        # float32 moments of dead units reach subnormals; this kernel gives the same bits
        # without subnormal arithmetic (_numba_kernels, "guarded against subnormal moments")
        chunks = -(-data.shape[0] // compiled.CHUNK)
        guard = state.get("subnormal_guard")
        if guard is None or guard.shape != (chunks,):
            guard = state["subnormal_guard"] = backend.native.zeros(chunks, dtype=bool)
        floor = adam_dead_p_floor(consts[6], consts[4], consts[7])
        compiled.adam_guarded(data, grad, m, v, *consts, floor, guard, (t - 1) % WATCH_EVERY == 0)
    elif compiled is not None:
        compiled.adam(data, grad, m, v, *consts)
    else:
        _adam_numpy_chunked(backend.native, data, grad, m, v, *consts)
    return True


def adam_dead_p_floor(lr, d1, eps) -> int:
    """The bits of the smallest float32 |p| that a dead lane of the guarded Adam keeps
    unchanged: with g = +-0 and |m| < 2^-100, |m_new| < 2^-100, so the update
    lr (m_new / d1) / (sqrt(v_hat) + eps) is below u = (lr (2^-100 / d1 + 2^-149) + 2^-149)
    / eps (the 2^-149 terms bound the roundings on the subnormal grid, the factor the
    relative ones), and |p| >= 2^26 u puts it below a quarter of p's last place: p - update
    rounds back to p. Returns the bits of +inf (no lane qualifies) when the floor is that
    high."""
    lr, d1, eps = float(lr), float(d1), float(eps)
    u = (lr * (2.0 ** -100 / d1 + 2.0 ** -149) + 2.0 ** -149) / eps * (1.0 + 2.0 ** -20)
    floor = u * 2.0 ** 26
    if not floor < 2.0 ** 127:
        return 0x7F800000
    return struct.unpack("<I", struct.pack("<f", floor))[0] + 1   # one float32 step above


def _adam_numpy_chunked(np, p, g, m, v, b1, c1, b2, c2, d1, d2, lr, eps):
    """The reference's fourteen operations, chunk by chunk, into two scratch buffers."""
    n = p.shape[0]
    size = min(n, ADAM_CHUNK)
    s1, s2 = np.empty(size, dtype=p.dtype), np.empty(size, dtype=p.dtype)
    for lo in range(0, n, size):
        hi = min(lo + size, n)
        pc, gc, mc, vc, t1, t2 = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], s1[:hi - lo], s2[:hi - lo]
        np.multiply(mc, b1, out=mc)           # m = beta1 m + (1 - beta1) g
        np.multiply(gc, c1, out=t1)
        np.add(mc, t1, out=mc)
        np.multiply(gc, gc, out=t1)           # v = beta2 v + (1 - beta2) g^2
        np.multiply(t1, c2, out=t1)
        np.multiply(vc, b2, out=vc)
        np.add(vc, t1, out=vc)
        np.divide(vc, d2, out=t1)             # sqrt(v_hat) + eps
        np.sqrt(t1, out=t1)
        np.add(t1, eps, out=t1)
        np.divide(mc, d1, out=t2)             # lr m_hat / (sqrt(v_hat) + eps)
        np.multiply(t2, lr, out=t2)
        np.divide(t2, t1, out=t2)
        np.subtract(pc, t2, out=pc)


# ------------------------------------------------------------------------------------------
# The MLP

def _layer_types():
    from .layers import Linear, ReLU  # here, not at the top: layers imports this module
    return Linear, ReLU


def mlp_forward(mlp, x, output_bias: bool = True):
    """``MLP.forward`` with the bias add and ReLU in place on each fresh matmul output.

    Keeps the same caches as the reference (a Linear its input, a ReLU its output), so
    the reference backward could follow it. ``output_bias=False`` returns the last
    Linear's output before its bias add, for a caller that adds it in its own sweep.
    """
    Linear, ReLU = _layer_types()
    backend = mlp.backend
    nx = backend.native
    layers = mlp.layers
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, Linear):
            layer.cache = x
            out = nx.matmul(x, layer.params["W"])        # fresh: ours to change in place
            relu = i + 1 < len(layers) and type(layers[i + 1]) is ReLU
            compiled = numba_kernels() if backend.name == "numpy" else None
            if relu and backend.name == "cupy":
                _cupy_kernel(backend, "bias_relu")(layer.params["b"], out)
            elif relu and compiled is not None:
                compiled.bias_relu(out, layer.params["b"])
            elif output_bias or i + 1 < len(layers):      # not the output's, if declined
                out += layer.params["b"]
                if relu:
                    nx.maximum(out, 0.0, out=out)
            if relu:
                layers[i + 1].cache = out
                i += 1
            x = out
        else:                                               # other activations: reference
            x = layer.forward(x)
        i += 1
    return x


def mlp_backward(mlp, dout, input_grad: bool = True, output_bias_grad: bool = True):
    """``MLP.backward``, writing dW and db straight into the flat gradient buffer and
    applying ReLU's mask in place on the fresh dx of the Linear after it. ``dout`` itself
    is only read. Returns None when ``input_grad`` is False (the first dx is skipped);
    ``output_bias_grad=False`` leaves the last Linear's db to the caller (already done)."""
    Linear, ReLU = _layer_types()
    backend = mlp.backend
    nx = backend.native
    compiled = numba_kernels() if backend.name == "numpy" else None
    bias_grad_done = not output_bias_grad
    for k in range(len(mlp.layers) - 1, -1, -1):
        layer = mlp.layers[k]
        if isinstance(layer, Linear):
            x = layer._cached()
            nx.matmul(x.T, dout, out=layer.grads["W"])
            if not bias_grad_done:
                nx.sum(dout, axis=0, out=layer.grads["b"])
            bias_grad_done = False
            if k == 0 and not input_grad:
                return None
            dout = nx.matmul(dout, layer.params["W"].T)     # fresh: ours to change in place
        elif type(layer) is ReLU and k + 1 < len(mlp.layers):
            below = mlp.layers[k - 1] if k > 0 else None
            if compiled is not None and isinstance(below, Linear) and dout.shape[1] >= 2 \
                    and dout.flags.c_contiguous:
                # the mask and the bias gradient of the Linear below in one pass
                compiled.relu_backward_bias_grad(layer._cached(), dout, below.grads["b"])
                bias_grad_done = True
            else:
                dout = relu_backward(backend, layer._cached(), dout)
        else:
            dout = layer.backward(dout)
    return dout


def relu_backward(backend, out, dout):
    """where(out > 0, dout, 0): in place on ``dout`` (which the caller owns) where a kernel
    exists; NumPy's own where() is slow here (about 4 ns an element, 20 times a multiply),
    but multiplying by the mask instead would give -0.0 for negative dout and keep NaN."""
    if backend.name == "cupy":
        _cupy_kernel(backend, "relu_backward")(out, dout)
        return dout
    compiled = numba_kernels()
    if compiled is not None:
        compiled.relu_backward(out, dout)
        return dout
    return backend.native.where(out > 0, dout, 0.0)


# ------------------------------------------------------------------------------------------
# Loss tails

# Elements per block of the Bernoulli tail: four such float64 arrays fit in a 2 MiB L2.
TAIL_BLOCK = 1 << 16


def bernoulli_nll(backend, x, logits, scale=None, bias_grad=None, bias=None):
    """``losses.bernoulli_nll(x, logits)`` (reduction "none") with three arrays instead of
    a dozen: (nll (M,), dlogits (M, c)).

    numba only (``_vae_loss_numba``): with ``bias`` (c,), the logits are ``logits + bias``
    (the decoder's last bias add, folded into the sweep); with ``scale`` (a dtype scalar)
    and ``bias_grad`` (c,), dlogits comes back multiplied by ``scale`` and ``bias_grad``
    receives its column sums: the first two steps of the decoder's backward, done while
    each block is in cache."""
    nx = backend.native
    if backend.name == "cupy":
        term, grad = _cupy_kernel(backend, "bernoulli")(x, logits)
        return nx.sum(term, axis=1), grad
    compiled = numba_kernels()
    if compiled is not None:
        # numba does the arithmetic, NumPy its own exp, log1p and tanh (whose last bits a
        # compiled loop would not reproduce), in blocks of rows that stay in the L2 cache
        # across the six passes. Rows are independent, so blocking changes no result; the
        # per-pixel terms live only in one block-sized scratch (only their row sums leave).
        # A zero bias and a scale of 1 change no bit of any output (x + 0 differs from x
        # only for x = -0.0, whose logit terms and gradient are those of +0.0).
        dt = backend.numpy_dtype.type
        h = dt(0.5)
        m, c = logits.shape
        bias = nx.zeros(c, dtype=logits.dtype) if bias is None else bias
        scale = dt(1) if scale is None else scale
        bias_grad = nx.zeros(c, dtype=logits.dtype) if bias_grad is None else bias_grad
        bias_grad[...] = 0                             # the column sums start from zero
        grad = nx.empty_like(logits)
        nll = nx.empty(m, dtype=logits.dtype)
        rows = max(1, min(m, TAIL_BLOCK // c))
        scratch = nx.empty((rows, c), dtype=logits.dtype)
        for lo in range(0, m, rows):
            block = slice(lo, lo + rows)
            lb, u = logits[block], grad[block]
            t = scratch[:lb.shape[0]]
            compiled.bernoulli_split(lb, bias, t, u, h)  # t = -|l|, u = l / 2
            nx.exp(t, out=t)
            nx.log1p(t, out=t)                         # t = log1p(exp(-|l|))
            nx.tanh(u, out=u)                          # u = tanh(l / 2)
            compiled.bernoulli_combine(x[block], lb, bias, t, u, h, scale, bias_grad)
            nx.sum(t, axis=1, out=nll[block])          # t = term, u = scaled grad
        return nll, grad
    # softplus(l) = max(l, 0) + log1p(exp(-|l|))                       (ops.softplus)
    t = nx.abs(logits)
    nx.negative(t, out=t)
    nx.exp(t, out=t)
    nx.log1p(t, out=t)
    term = nx.maximum(logits, 0.0)
    term += t
    # nll = sum_i softplus(l_i) - x_i l_i
    nx.multiply(x, logits, out=t)
    term -= t
    nll = nx.sum(term, axis=1)
    # d nll / d l = sigmoid(l) - x, sigmoid(l) = 0.5 + 0.5 tanh(l / 2)  (ops.sigmoid)
    grad = nx.multiply(logits, 0.5, out=term)
    nx.tanh(grad, out=grad)
    grad *= 0.5
    grad += 0.5
    grad -= x
    return nll, grad


def likelihood_nll(backend, likelihood, x, out):
    """``likelihood.nll(x, out)``, through the fast Bernoulli tail where it applies."""
    if likelihood.name == "bernoulli":
        return bernoulli_nll(backend, x, out)
    return likelihood.nll(x, out)


def kl_standard_normal(backend, mu, logvar):
    """``losses.kl_standard_normal(mu, logvar)``: one kernel on CuPy, the reference on NumPy
    (its arrays are (N, d), too small to matter)."""
    if backend.name == "cupy":
        term, dlogvar = _cupy_kernel(backend, "kl")(mu, logvar)
        return 0.5 * backend.native.sum(term, axis=1), mu, dlogvar
    from .losses import kl_standard_normal as reference
    return reference(mu, logvar)


def reparameterize(backend, mu, logvar, eps):
    """``model.reparameterize``: one kernel on CuPy, the reference on NumPy."""
    if backend.name == "cupy":
        return _cupy_kernel(backend, "reparameterize")(mu, logvar, eps)
    from .model import reparameterize as reference
    return reference(mu, logvar, eps)


# ------------------------------------------------------------------------------------------
# The VAE step

def vae_loss(model, x, eps):
    """``VAE.loss`` after its input checks (x and eps already backend arrays), with the
    fast MLP and loss tails. Leaves the cache for :func:`vae_backward`."""
    from .model import ELBOTerms
    backend = model.backend
    xp = backend.xp
    n, d, s = x.shape[0], model.latent_dim, model.samples
    h = mlp_forward(model.encoder, x - model.input_shift)
    mu, logvar = h[:, :d], h[:, d:]
    compiled = numba_kernels() if backend.name == "numpy" else None
    if compiled is not None:
        return _vae_loss_numba(model, compiled, x, eps, mu, logvar)
    z = reparameterize(backend, mu, logvar, eps)
    out = mlp_forward(model.decoder, xp.reshape(z, (s * n, d)))
    targets = x if s == 1 else xp.reshape(xp.broadcast_to(x, (s, *x.shape)), (s * n, -1))
    nll, dnll_dout = likelihood_nll(backend, model.likelihood, targets, out)
    kl, dkl_dmu, dkl_dlogvar = kl_standard_normal(backend, mu, logvar)
    recon = xp.mean(nll)
    kl_mean = xp.mean(kl)
    model._cache = (logvar, eps, dnll_dout, dkl_dmu, dkl_dlogvar, n)
    return ELBOTerms(loss=recon + model.beta * kl_mean, kl=kl_mean, recon=recon)


class _NumbaStepCache(tuple):
    """What the numba loss leaves for :func:`vae_backward`: (mu, std, eps, dkl_dlogvar,
    dnll_dout, output_bias_grad, n). ``dnll_dout`` is already scaled by 1 / (S N) and,
    when ``output_bias_grad`` is not None, summed into it: the reference backward cannot
    read this cache, so ``VAE.backward`` sends it here whatever the switch says."""


def _vae_loss_numba(model, compiled, x, eps, mu, logvar):
    """The NumPy + numba loss: the latent tail (reparameterisation, KL) in two small
    compiled passes around NumPy's exp and expm1, and for the Bernoulli decoder the
    gradient scale and output bias gradient folded into the likelihood's sweep."""
    from .model import ELBOTerms
    backend = model.backend
    nx = backend.native
    dt = backend.numpy_dtype.type
    n, d, s = x.shape[0], model.latent_dim, model.samples
    half = dt(0.5)
    std = nx.multiply(logvar, 0.5)                     # exp(0.5 logvar): reparameterize
    nx.exp(std, out=std)
    z = nx.empty((s, n, d), dtype=mu.dtype)
    compiled.reparameterize(mu, std, eps, z)           # z = mu + std eps
    targets = x if s == 1 else nx.broadcast_to(x, (s, *x.shape)).reshape(s * n, -1)
    scale = dt(1.0 / (s * n))                          # VAE.backward's 1 / (S N), rounded once
    if model.likelihood.name == "bernoulli":
        out = mlp_forward(model.decoder, z.reshape(s * n, d), output_bias=False)
        bias_grad = nx.empty(out.shape[1], dtype=out.dtype)
        nll, dnll_dout = bernoulli_nll(backend, targets, out, scale, bias_grad,
                                       bias=model.decoder.linears[-1].params["b"])
    else:
        out = mlp_forward(model.decoder, z.reshape(s * n, d))
        bias_grad = None
        nll, dnll_dout = model.likelihood.nll(targets, out)
        dnll_dout *= scale                             # fresh from nll(): ours to scale
    dkl_dlogvar = nx.expm1(logvar)                     # losses.kl_standard_normal
    term = nx.empty_like(dkl_dlogvar)
    compiled.kl_terms(mu, logvar, dkl_dlogvar, term, half)
    kl = nx.sum(term, axis=1)
    kl *= 0.5
    recon = nx.mean(nll)
    kl_mean = nx.mean(kl)
    model._cache = _NumbaStepCache((mu, std, eps, dkl_dlogvar, dnll_dout, bias_grad, n))
    return ELBOTerms(loss=recon + model.beta * kl_mean, kl=kl_mean, recon=recon)


def owns_cache(cache) -> bool:
    """True when ``cache`` was left by the numba loss, which only :func:`vae_backward`
    can read (e.g. fast paths switched off between ``loss`` and ``backward``)."""
    return isinstance(cache, _NumbaStepCache)


def vae_backward(model) -> None:
    """``VAE.backward`` with the fast MLP backward; the loss gradient is scaled in place
    (the loss made that array and nothing else holds it)."""
    if isinstance(model._cache, _NumbaStepCache):
        return _vae_backward_numba(model)
    from .model import reparameterize_backward
    xp = model.backend.xp
    logvar, eps, dnll_dout, dkl_dmu, dkl_dlogvar, n = model._cache
    s, d = model.samples, model.latent_dim
    dnll_dout *= 1.0 / (s * n)
    dz = mlp_backward(model.decoder, dnll_dout)
    dmu, dlogvar = reparameterize_backward(xp.reshape(dz, (s, n, d)), logvar, eps)
    dmu = dmu + (model.beta / n) * dkl_dmu
    dlogvar = dlogvar + (model.beta / n) * dkl_dlogvar
    mlp_backward(model.encoder, xp.concat([dmu, dlogvar], axis=1), input_grad=False)
    model._cache = None


def _vae_backward_numba(model) -> None:
    """The backward of :func:`_vae_loss_numba`: the decoder's output bias gradient comes
    from the loss's sweep, and dz becomes the encoder's (N, 2d) output gradient in one
    compiled pass (no dmu, dlogvar or concatenate temporaries)."""
    backend = model.backend
    nx = backend.native
    dt = backend.numpy_dtype.type
    compiled = numba_kernels()
    mu, std, eps, dkl_dlogvar, dnll_dout, bias_grad, n = model._cache
    s, d = model.samples, model.latent_dim
    if bias_grad is not None:
        model.decoder.linears[-1].grads["b"][...] = bias_grad
    dz = mlp_backward(model.decoder, dnll_dout, output_bias_grad=bias_grad is None)
    g = nx.empty((n, 2 * d), dtype=mu.dtype)
    compiled.latent_backward(dz.reshape(s, n, d), eps, mu, std, dkl_dlogvar,
                             dt(model.beta / n), dt(0.5), g)
    mlp_backward(model.encoder, g, input_grad=False)
    model._cache = None
