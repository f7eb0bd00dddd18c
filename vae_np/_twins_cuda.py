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
    # First moments below m_floor (optim.Adam), second moments below tiny (the smallest normal
    # number) become +0; NaN compares false and stays.
    "adam": ("T g, T b1, T c1, T b2, T c2, T step_size, T inv_sqrt_correction2, T eps, "
             "T m_floor, T tiny", "T p, T m, T v", """
        T mi = b1 * m + c1 * g;
        T vi = b2 * v + c2 * (g * g);
        if (fabs(mi) < m_floor) mi = (T)0;
        if (vi < tiny) vi = (T)0;
        m = mi;
        v = vi;
        p = p - step_size * mi / (sqrt(vi) * inv_sqrt_correction2 + eps);
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
    "adam": ("b1", "c1", "b2", "c2", "step_size", "inv_sqrt_correction2", "eps", "m_floor",
             "tiny"),
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


def bernoulli_nll(x, logits, reduction="none", grad_scale=1.0):
    if not (reduction == "none" and _served(x, logits) and logits.ndim == 2
            and x.shape == logits.shape and type(grad_scale) in (int, float)):
        return NotImplemented
    term, grad = kernel("bernoulli")(x, logits)
    if grad_scale != 1:
        grad *= grad_scale                      # the reference's multiply, on a fresh array
    return _cupy().sum(term, axis=1), grad


# ------------------------------------------------------------------------------------------
# optim


def adam_update(p, g, m, v, t, lr, beta1, beta2, eps):
    if not (_served(p, g, m, v) and p.ndim == 1 and p.shape == g.shape == m.shape == v.shape):
        return NotImplemented
    dt = p.dtype.type
    tiny, step_size = float(np.finfo(dt).tiny), lr / (1.0 - beta1 ** t)
    kernel("adam")(g, dt(beta1), dt(1.0 - beta1), dt(beta2), dt(1.0 - beta2),
                   dt(step_size), dt(1.0 / math.sqrt(1.0 - beta2 ** t)), dt(eps),
                   dt(tiny / min(step_size, 1.0)), dt(tiny), p, m, v)
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


# ---- convolution twins (vae_np/conv.py) ---------------------------------------------------
# The same im2col / col2im as the CPU twins, in the same (C kh kw, N Ho Wo) layout: each
# product of the math is ONE cuBLAS matrix product; the gathers around it are one kernel
# each (im2col reads the zero padding without a padded copy, col2im sums the offsets
# (i, j) in the reference's order, one thread per pixel: no atomics, the same bits every
# run), and max-pool is one pass each way. CONV_SOURCE is one translation unit with T typedef'd to float or double in front
# (CONV_CTYPES); tests/test_conv_cuda.py compiles it with NVRTC, without a GPU.

CONV_OPTIONS = ("--fmad=false",)
CONV_CTYPES = {"float32": "float", "float64": "double"}
CONV_KERNELS = ("vae_np_im2col", "vae_np_col2im", "vae_np_maxpool_forward",
                "vae_np_maxpool_backward", "vae_np_maxpool_route")
CONV_SOURCE = r"""
#define GRID_STRIDE_LOOP(i, total) \
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (total); \
       i += (long long)blockDim.x * gridDim.x)

// cols[(c, i, j), (n, p, q)] = x[n, c, sh p + i - ph, sw q + j - pw], 0 outside the image.
extern "C" __global__ void vae_np_im2col(
    const T *x, T *cols, long long N, long long C, long long H, long long W,
    long long kh, long long kw, long long sh, long long sw, long long ph, long long pw,
    long long Ho, long long Wo) {
  GRID_STRIDE_LOOP(idx, N * Ho * Wo * C * kh * kw) {
    long long t = idx;
    const long long q = t % Wo; t /= Wo;
    const long long p = t % Ho; t /= Ho;
    const long long n = t % N; t /= N;
    const long long j = t % kw; t /= kw;
    const long long i = t % kh;
    const long long c = t / kh;
    const long long y = sh * p + i - ph, xx = sw * q + j - pw;
    cols[idx] = (y >= 0 && y < H && xx >= 0 && xx < W) ? x[((n * C + c) * H + y) * W + xx]
                                                       : (T)0;
  }
}

// dx[n, c, y, x] = sum over (i, j), row-major from 0, of dcols[(c, i, j), (n, p, q)] with
// y + ph = sh p + i, x + pw = sw q + j (0 <= p < Ho, 0 <= q < Wo).
extern "C" __global__ void vae_np_col2im(
    const T *dcols, T *dx, long long N, long long C, long long H, long long W,
    long long kh, long long kw, long long sh, long long sw, long long ph, long long pw,
    long long Ho, long long Wo) {
  GRID_STRIDE_LOOP(idx, N * C * H * W) {
    long long t = idx;
    const long long xx = t % W; t /= W;
    const long long y = t % H; t /= H;
    const long long c = t % C;
    const long long n = t / C;
    T total = (T)0;
    for (long long i = 0; i < kh; ++i) {
      const long long a = y + ph - i;
      if (a < 0 || a % sh != 0 || a / sh >= Ho) continue;
      for (long long j = 0; j < kw; ++j) {
        const long long b = xx + pw - j;
        if (b < 0 || b % sw != 0 || b / sw >= Wo) continue;
        total += dcols[((((c * kh + i) * kw + j) * N + n) * Ho + a / sh) * Wo + b / sw];
      }
    }
    dx[idx] = total;
  }
}

// The first maximum of window (p, q) in row-major order (a NaN wins from where it stands,
// as numpy.max and argmax): its flat offset i k + j.
__device__ long long vae_np_first_max(const T *x, long long base, long long W, long long k) {
  T best = x[base];
  long long at = 0;
  for (long long i = 0; i < k; ++i)
    for (long long j = 0; j < k; ++j) {
      const T v = x[base + i * W + j];
      if (v > best || (v != v && best == best)) { best = v; at = i * k + j; }
    }
  return at;
}

// out = the window's maximum, first = its offset i k + j (argmax's int64).
extern "C" __global__ void vae_np_maxpool_forward(
    const T *x, T *out, long long *first, long long N, long long C, long long H, long long W,
    long long k) {
  const long long Ho = H / k, Wo = W / k;
  GRID_STRIDE_LOOP(idx, N * C * Ho * Wo) {
    const long long q = idx % Wo, p = (idx / Wo) % Ho, nc = idx / (Ho * Wo);
    const long long base = (nc * H + k * p) * W + k * q;
    const long long at = vae_np_first_max(x, base, W, k);
    out[idx] = x[base + (at / k) * W + at % k];
    first[idx] = at;
  }
}

// Each window of dx is written whole: dout at its first maximum, 0 elsewhere.
extern "C" __global__ void vae_np_maxpool_backward(
    const T *dout, const T *x, T *dx, long long N, long long C, long long H, long long W,
    long long k) {
  const long long Ho = H / k, Wo = W / k;
  GRID_STRIDE_LOOP(idx, N * C * Ho * Wo) {
    const long long q = idx % Wo, p = (idx / Wo) % Ho, nc = idx / (Ho * Wo);
    const long long base = (nc * H + k * p) * W + k * q;
    const long long at = vae_np_first_max(x, base, W, k);
    for (long long r = 0; r < k * k; ++r)
      dx[base + (r / k) * W + r % k] = (r == at) ? dout[idx] : (T)0;
  }
}

// The same, from the offsets the forward kernel recorded (no rescan of x).
extern "C" __global__ void vae_np_maxpool_route(
    const T *dout, const long long *first, T *dx, long long N, long long C, long long H,
    long long W, long long k) {
  const long long Ho = H / k, Wo = W / k;
  GRID_STRIDE_LOOP(idx, N * C * Ho * Wo) {
    const long long q = idx % Wo, p = (idx / Wo) % Ho, nc = idx / (Ho * Wo);
    const long long base = (nc * H + k * p) * W + k * q;
    const long long at = first[idx];
    for (long long r = 0; r < k * k; ++r)
      dx[base + (r / k) * W + r % k] = (r == at) ? dout[idx] : (T)0;
  }
}
"""

_conv_modules: dict = {}


def _conv_kernel(cupy, dtype, name: str):
    """Kernel ``name`` of CONV_SOURCE for ``dtype`` (compiled once per dtype, cached)."""
    key = str(dtype)
    module = _conv_modules.get(key)
    if module is None:
        code = f"typedef {CONV_CTYPES[key]} T;\n{CONV_SOURCE}"
        module = _conv_modules[key] = cupy.RawModule(code=code, options=CONV_OPTIONS)
    return module.get_function(name)


def _launch(kernel, total: int, *args) -> None:
    import numpy as np

    if total > 0:
        threads = 256
        blocks = min((total + threads - 1) // threads, 1 << 20)   # grid-stride beyond
        kernel((blocks,), (threads,), tuple(np.int64(a) if isinstance(a, int) else a
                                            for a in args))


def _conv_cupy(*arrays):
    """The cupy module when every array is a C-contiguous CuPy float array of one dtype,
    else None (the reference runs)."""
    if not all(type(a).__module__.startswith("cupy") for a in arrays):
        return None
    import cupy

    if str(arrays[0].dtype) not in CONV_CTYPES or any(a.dtype != arrays[0].dtype for a in arrays):
        return None
    return cupy


def _im2col_cuda(cupy, x, kh, kw, stride, padding):
    x = cupy.ascontiguousarray(x)
    n, c, h, w = x.shape
    rows = (h + 2 * padding[0] - kh) // stride[0] + 1
    cols = (w + 2 * padding[1] - kw) // stride[1] + 1
    columns = cupy.empty((c * kh * kw, n * rows * cols), dtype=x.dtype)
    _launch(_conv_kernel(cupy, x.dtype, "vae_np_im2col"), columns.size, x, columns,
            n, c, h, w, kh, kw, *stride, *padding, rows, cols)
    return columns, rows, cols


def conv2d_forward(x, weight, bias, stride, padding):
    cupy = _conv_cupy(x, weight, bias)
    if cupy is None:
        return NotImplemented
    o, _, kh, kw = weight.shape
    columns, rows, cols = _im2col_cuda(cupy, x, kh, kw, stride, padding)
    n = x.shape[0]
    product = cupy.matmul(weight.reshape(o, -1), columns)            # cuBLAS: (O, N Ho Wo)
    out = cupy.empty((n, o, rows, cols), dtype=x.dtype)
    cupy.add(product.reshape(o, n, rows, cols).transpose(1, 0, 2, 3), bias.reshape(o, 1, 1),
             out=out)
    return out


def conv2d_backward(dout, x, weight, stride, padding, input_grad=True):
    cupy = _conv_cupy(dout, x, weight)
    if cupy is None:
        return NotImplemented
    o, c, kh, kw = weight.shape
    n, _, rows, cols = dout.shape
    columns, _, _ = _im2col_cuda(cupy, x, kh, kw, stride, padding)
    dbias = cupy.sum(dout, axis=(0, 2, 3))
    grad_rows = cupy.ascontiguousarray(dout.transpose(1, 0, 2, 3)).reshape(o, n * rows * cols)
    dweight = cupy.matmul(grad_rows, columns.T).reshape(weight.shape)
    if not input_grad:
        return None, dweight, dbias
    dcols = cupy.matmul(weight.reshape(o, -1).T, grad_rows)          # (C kh kw, N Ho Wo)
    dx = cupy.empty(x.shape, dtype=x.dtype)
    _launch(_conv_kernel(cupy, x.dtype, "vae_np_col2im"), dx.size, dcols, dx,
            n, c, x.shape[2], x.shape[3], kh, kw, *stride, *padding, rows, cols)
    return dx, dweight, dbias


def maxpool2d_forward(x, kernel, with_index=False):
    cupy = _conv_cupy(x)
    if cupy is None or x.ndim != 4 or x.shape[2] % kernel or x.shape[3] % kernel:
        return NotImplemented
    x = cupy.ascontiguousarray(x)
    n, c, h, w = x.shape
    out = cupy.empty((n, c, h // kernel, w // kernel), dtype=x.dtype)
    first = cupy.empty(out.shape, dtype="int64")                 # argmax's dtype
    _launch(_conv_kernel(cupy, x.dtype, "vae_np_maxpool_forward"), out.size, x, out, first,
            n, c, h, w, int(kernel))
    return (out, first) if with_index else out


def maxpool2d_backward(dout, x, kernel, first=None):
    cupy = _conv_cupy(dout, x)
    if cupy is None or x.ndim != 4 or tuple(dout.shape) != (
            x.shape[0], x.shape[1], x.shape[2] // kernel, x.shape[3] // kernel):
        return NotImplemented
    n, c, h, w = x.shape
    dx = cupy.empty(x.shape, dtype=x.dtype)
    dout = cupy.ascontiguousarray(dout)
    if first is None:
        x = cupy.ascontiguousarray(x)
        _launch(_conv_kernel(cupy, x.dtype, "vae_np_maxpool_backward"), dout.size, dout, x,
                dx, n, c, h, w, int(kernel))
        return dx
    if not (type(first) is type(dout) and str(first.dtype) == "int64" and tuple(first.shape) == tuple(dout.shape)):
        return NotImplemented
    first = cupy.ascontiguousarray(first)
    _launch(_conv_kernel(cupy, x.dtype, "vae_np_maxpool_route"), dout.size, dout, first, dx,
            n, c, h, w, int(kernel))
    return dx


TWINS.update({
    "conv.conv2d_forward": conv2d_forward,
    "conv.conv2d_backward": conv2d_backward,
    "conv.maxpool2d_forward": maxpool2d_forward,
    "conv.maxpool2d_backward": maxpool2d_backward,
})
