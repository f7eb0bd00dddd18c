"""Would the step be faster with every activation laid out (features, batch)?

    python benchmarks/bench_layout.py                     # float32, 2 threads
    python benchmarks/bench_layout.py --batches 20,32 --rounds 11

vae_np stores an activation as (batch, features), C-ordered, as its docs write the math
(y = x W + b, dW = x^T dout, dx = dout W^T). OpenBLAS is faster on the step's products at
small batches when their results are laid out the other way, (features, batch): the
column-vector convention y^T = W^T x^T, dW = x^T (dy^T)^T, dx^T = W dy^T. This script
measures the question before anyone rewrites the library for it, in two parts:

1. The step's products alone (bench_gemm's six Linears: forward, weight gradient, input
   gradient), in both layouts, into fresh outputs, best of interleaved blocks.
2. A whole step of the starting configuration (784-512-512-2x64 encoder, 64-512-512-784
   decoder, Bernoulli, Adam) written twice in plain NumPy ops, once per layout, with
   vae_np's compiled Adam pass on one flat buffer. Both start from the same weights and
   give the same gradients (checked before timing, ``layout_gradient_gap``, tested); the two
   are timed in interleaved rounds. This prototype is not vae_np's step: its elementwise
   ops are NumPy's, unfused, so its own times are longer, and its ratio says what the
   layout alone buys.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemm import LAYERS, STEP_PRODUCTS, interleaved_best, numpy_matmul  # noqa: E402
from bench_step import (batch_sizes, note_forced_blas_kernel, paired_ratio,  # noqa: E402
                        set_threads, time_interleaved)  # (bench_step puts the checkout on the path)

from vae_np.optim import adam_update  # noqa: E402

ENCODER, DECODER, LATENT = (784, 512, 512, 128), (64, 512, 512, 784), 64
SETTLE_SECONDS = 0.25   # bench_step's pause before each block: OpenBLAS's worker asleep


def product_cases(batch: int, rng: np.random.Generator) -> dict:
    """{(layout, product): (matmul, (a, b, out shape))} for the six Linears."""
    cases = {}
    for fan_in, fan_out in LAYERS:
        x = rng.standard_normal((batch, fan_in), dtype=np.float32)
        w = rng.standard_normal((fan_in, fan_out), dtype=np.float32)
        dout = rng.standard_normal((batch, fan_out), dtype=np.float32)
        x_t, dout_t = np.ascontiguousarray(x.T), np.ascontiguousarray(dout.T)
        layer = (fan_in, fan_out)
        for key, operands in {
            ("batch-major", "forward"): (x, w, (batch, fan_out)),
            ("batch-major", "weight grad"): (x.T, dout, (fan_in, fan_out)),
            ("batch-major", "input grad"): (dout, w.T, (batch, fan_in)),
            ("feature-major", "forward"): (w.T, x_t, (fan_out, batch)),
            ("feature-major", "weight grad"): (x_t, dout_t.T, (fan_in, fan_out)),
            ("feature-major", "input grad"): (w, dout_t, (fan_in, batch)),
        }.items():
            cases[(*key, layer)] = (numpy_matmul, operands)
    return cases


def make_state(seed: int = 0) -> dict:
    """Weights (He-initialised, zero biases) and Adam's moments in flat float32 buffers,
    with (fan_in, fan_out) / (fan_out,) views in the order W1 b1 W2 b2 W3 b3 V1 c1 ..."""
    rng = np.random.default_rng(seed)
    shapes = []
    for sizes in (ENCODER, DECODER):
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            shapes += [(fan_in, fan_out), (fan_out,)]
    size = sum(int(np.prod(shape)) for shape in shapes)
    state = {name: np.zeros(size, np.float32) for name in ("data", "grad", "m", "v")}
    state["params"], state["grads"], state["t"], offset = [], [], 0, 0
    for shape in shapes:
        n = int(np.prod(shape))
        state["params"].append(state["data"][offset:offset + n].reshape(shape))
        state["grads"].append(state["grad"][offset:offset + n].reshape(shape))
        if len(shape) == 2:
            state["params"][-1][...] = rng.standard_normal(shape) * np.sqrt(2.0 / shape[0])
        offset += n
    return state


def adam(state: dict) -> None:
    state["t"] += 1
    adam_update(state["data"], state["grad"], state["m"], state["v"], state["t"],
                1e-3, 0.9, 0.999, 1e-8)


def step_batch_major(state: dict, x: np.ndarray, eps: np.ndarray) -> None:
    """One step with (batch, features) activations: x (N, 784), eps (N, 64)."""
    W1, b1, W2, b2, W3, b3, V1, c1, V2, c2, V3, c3 = state["params"]
    G = state["grads"]
    h1 = np.maximum(x @ W1 + b1, 0)
    h2 = np.maximum(h1 @ W2 + b2, 0)
    head = h2 @ W3 + b3
    mu, logvar = head[:, :LATENT], head[:, LATENT:]
    std = np.exp(0.5 * logvar)
    z = mu + std * eps
    g1 = np.maximum(z @ V1 + c1, 0)
    g2 = np.maximum(g1 @ V2 + c2, 0)
    logits = g2 @ V3 + c3
    d = 1.0 / (1.0 + np.exp(-logits)) - x                   # dL/dlogits, Bernoulli
    for activation, weight, dw, db, relu in ((g2, V3, G[10], G[11], True),
                                             (g1, V2, G[8], G[9], True),
                                             (z, V1, G[6], G[7], False)):
        np.matmul(activation.T, d, out=dw)
        db[...] = d.sum(axis=0)
        d = d @ weight.T
        if relu:
            d *= activation > 0
    dhead = np.concatenate([d + mu, d * eps * 0.5 * std + 0.5 * (std * std - 1)], axis=1)
    d = dhead
    for activation, weight, dw, db in ((h2, W3, G[4], G[5]), (h1, W2, G[2], G[3]),
                                       (x, W1, G[0], G[1])):
        np.matmul(activation.T, d, out=dw)
        db[...] = d.sum(axis=0)
        if activation is not x:
            d = (d @ weight.T) * (activation > 0)
    adam(state)


def step_feature_major(state: dict, x_t: np.ndarray, eps_t: np.ndarray) -> None:
    """The same step with (features, batch) activations: x_t (784, N), eps_t (64, N)."""
    W1, b1, W2, b2, W3, b3, V1, c1, V2, c2, V3, c3 = state["params"]
    G = state["grads"]
    h1 = np.maximum(W1.T @ x_t + b1[:, None], 0)
    h2 = np.maximum(W2.T @ h1 + b2[:, None], 0)
    head = W3.T @ h2 + b3[:, None]
    mu, logvar = head[:LATENT], head[LATENT:]
    std = np.exp(0.5 * logvar)
    z = mu + std * eps_t
    g1 = np.maximum(V1.T @ z + c1[:, None], 0)
    g2 = np.maximum(V2.T @ g1 + c2[:, None], 0)
    logits = V3.T @ g2 + c3[:, None]
    d = 1.0 / (1.0 + np.exp(-logits)) - x_t
    for activation, weight, dw, db, relu in ((g2, V3, G[10], G[11], True),
                                             (g1, V2, G[8], G[9], True),
                                             (z, V1, G[6], G[7], False)):
        np.matmul(activation, d.T, out=dw)
        db[...] = d.sum(axis=1)
        d = weight @ d
        if relu:
            d *= activation > 0
    d = np.concatenate([d + mu, d * eps_t * 0.5 * std + 0.5 * (std * std - 1)], axis=0)
    for activation, weight, dw, db in ((h2, W3, G[4], G[5]), (h1, W2, G[2], G[3]),
                                       (x_t, W1, G[0], G[1])):
        np.matmul(activation, d.T, out=dw)
        db[...] = d.sum(axis=1)
        if activation is not x_t:
            d = (weight @ d) * (activation > 0)
    adam(state)


def layout_gradient_gap(batch: int, seed: int = 1) -> float:
    """max |g_batch-major - g_feature-major| / max |g| over all parameters' gradients of
    one step of each layout from the same weights, data and noise: float32 rounding only
    (a few 1e-7) when both are right, order 1 for a wrong transpose, mask or term."""
    rng = np.random.default_rng(seed)
    x = (rng.random((batch, ENCODER[0])) < 0.3).astype(np.float32)
    eps = rng.standard_normal((batch, LATENT)).astype(np.float32)
    a, b = make_state(), make_state()
    step_batch_major(a, x, eps)
    step_feature_major(b, np.ascontiguousarray(x.T), np.ascontiguousarray(eps.T))
    return float(np.max(np.abs(a["grad"] - b["grad"])) / np.max(np.abs(a["grad"])))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batches", type=batch_sizes, default="20,32,128,512")
    p.add_argument("--rounds", type=int, default=11, help="interleaved rounds of the step")
    p.add_argument("--block-seconds", type=float, default=0.25,
                   help="seconds of steps timed in each side's block")
    args = p.parse_args(argv)
    keep = set_threads(args.threads)  # noqa: F841  (the limits hold while it lives)
    note_forced_blas_kernel()
    print(f"{args.threads} threads; float32; ms; ratio = feature-major / batch-major")
    rng = np.random.default_rng(0)
    for batch in args.batches:
        best = interleaved_best(product_cases(batch, rng), blocks=7)
        total = {layout: {product: 0.0 for product in STEP_PRODUCTS}
                 for layout in ("batch-major", "feature-major")}
        for (layout, product, _), ms in best.items():
            total[layout][product] += ms
        sums = {layout: sum(parts.values()) for layout, parts in total.items()}
        print(f"batch {batch:3d}  products: " + "  ".join(
            f"{layout} " + " + ".join(f"{ms:.3f}" for ms in total[layout].values())
            + f" = {sums[layout]:.3f}" for layout in total)
            + f"  ratio {sums['feature-major'] / sums['batch-major']:.2f}")
        gap = layout_gradient_gap(batch)
        x = (rng.random((batch, ENCODER[0])) < 0.3).astype(np.float32)
        eps = rng.standard_normal((batch, LATENT)).astype(np.float32)
        sides = {"batch-major": (make_state(), step_batch_major, (x, eps)),
                 "feature-major": (make_state(), step_feature_major,
                                   (np.ascontiguousarray(x.T), np.ascontiguousarray(eps.T)))}
        samples: dict = {}
        ms = time_interleaved(
            {name: functools.partial(step, state, *data) for name, (state, step, data) in sides.items()},
            {name: (lambda: None) for name in sides}, args.rounds, args.block_seconds,
            SETTLE_SECONDS, samples)
        ratio, low, high = paired_ratio(samples["feature-major"], samples["batch-major"])
        print(f"batch {batch:3d}  prototype step: batch-major {ms['batch-major']:.3f}, "
              f"feature-major {ms['feature-major']:.3f}, ratio median {ratio:.3f} "
              f"(rounds {low:.3f}-{high:.3f}); the layouts' gradients differ by "
              f"{gap:.1e} of the largest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
