"""CUDA sources of the fast paths (CuPy ElementwiseKernels), compiled on first use.

A leaf module: it imports nothing from the package, and CuPy only through the backend
object a caller passes. The Python that calls each kernel sits beside the math it
reproduces (``layers``, ``losses``, ``likelihoods``, ``model``, ``optim``); this file only
holds the sources, so that ``tests/test_cuda_sources.py`` can compile every one of them
with NVRTC on a machine without a GPU.

Every kernel is compiled without FMA contraction (``--fmad=false``), so ``a * b + c``
rounds twice, as NumPy does; the transcendental functions are CUDA's own (a few ulps from
NumPy's), so the GPU tests compare with a tolerance.
"""

from __future__ import annotations

OPTIONS = ("--fmad=false",)

#: name -> (input parameters, output parameters, body), as ``cupy.ElementwiseKernel`` takes
#: them; ``T`` is the floating type of the arrays (float or double).
SOURCES = {
    # Adam, the reference's expression order (optim.Adam._update_reference).
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
    # The importance-weighted bound (model.iwae_bound, after ops.logsumexp_and_softmax):
    # log_w (S, N) against its column maxima peak (1, N), broadcast; an all -inf column
    # is shifted by 0, so that exp gives 0 there instead of the NaN of -inf - -inf.
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
    # d loss / d z of the IWAE loss (model.iwae_latent_backward): the decoder's dz plus
    # the prior's a z, a = w~ / N (S, N, 1) broadcast over the latent dimensions.
    "iwae_prior_grad": ("T dz, T a, T z", "T out", """
        out = dz + a * z;
    """),
}

#: name -> the inputs its caller passes as scalars (NumPy scalars of the array dtype),
#: which CuPy hands the kernel by value (``const T b1``) rather than as an array element
#: (``const T &g``). Only tests/test_cuda_sources.py reads it, to compile each kernel as
#: it is called; a kernel not listed takes arrays only.
SCALAR_INPUTS = {
    "adam": ("b1", "c1", "b2", "c2", "d1", "d2", "lr", "eps", "tiny"),
}

_compiled: dict = {}


def kernel(backend, name: str):
    """The ElementwiseKernel ``name`` of ``SOURCES`` for a CuPy ``backend`` (built once;
    CuPy compiles it with NVRTC at the first call and caches the binary on disk)."""
    compiled = _compiled.get(name)
    if compiled is None:
        in_params, out_params, body = SOURCES[name]
        compiled = backend.native.ElementwiseKernel(
            in_params, out_params, body, f"vae_np_{name}", options=OPTIONS)
        _compiled[name] = compiled
    return compiled
