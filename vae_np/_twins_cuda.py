"""The CUDA twins of the ops (CuPy kernels), keyed by op name: see ``backend.fast_twin``.

A leaf: it imports nothing from the package; CuPy is imported by the twins themselves,
so this module loads (and its sources compile with NVRTC in the tests) without a GPU.
"""

from __future__ import annotations

#: op name ("module.qualname") -> twin taking the reference's arguments.
TWINS: dict = {}


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
                "vae_np_maxpool_backward")
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

extern "C" __global__ void vae_np_maxpool_forward(
    const T *x, T *out, long long N, long long C, long long H, long long W, long long k) {
  const long long Ho = H / k, Wo = W / k;
  GRID_STRIDE_LOOP(idx, N * C * Ho * Wo) {
    const long long q = idx % Wo, p = (idx / Wo) % Ho, nc = idx / (Ho * Wo);
    const long long base = (nc * H + k * p) * W + k * q;
    const long long at = vae_np_first_max(x, base, W, k);
    out[idx] = x[base + (at / k) * W + at % k];
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


def maxpool2d_forward(x, kernel):
    cupy = _conv_cupy(x)
    if cupy is None:
        return NotImplemented
    x = cupy.ascontiguousarray(x)
    n, c, h, w = x.shape
    out = cupy.empty((n, c, h // kernel, w // kernel), dtype=x.dtype)
    _launch(_conv_kernel(cupy, x.dtype, "vae_np_maxpool_forward"), out.size, x, out,
            n, c, h, w, int(kernel))
    return out


def maxpool2d_backward(dout, x, kernel):
    cupy = _conv_cupy(dout, x)
    if cupy is None:
        return NotImplemented
    dout, x = cupy.ascontiguousarray(dout), cupy.ascontiguousarray(x)
    n, c, h, w = x.shape
    dx = cupy.empty(x.shape, dtype=x.dtype)
    _launch(_conv_kernel(cupy, x.dtype, "vae_np_maxpool_backward"), dout.size, dout, x, dx,
            n, c, h, w, int(kernel))
    return dx


TWINS.update({
    "conv.conv2d_forward": conv2d_forward,
    "conv.conv2d_backward": conv2d_backward,
    "conv.maxpool2d_forward": maxpool2d_forward,
    "conv.maxpool2d_backward": maxpool2d_backward,
})
