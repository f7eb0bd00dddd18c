"""Time the convolutional layers and networks (vae_np.conv, vae_np.networks) against
PyTorch eager, forward + backward, float32, side by side in one process.

    python benchmarks/bench_conv.py                  # batches 32 and 128, 2 threads
    python benchmarks/bench_conv.py --quick          # a smoke run (seconds)
    python benchmarks/bench_conv.py --batches 32 --rounds 30 --threads 2

Rows: each layer of the starting example's convolutional encoder and decoder at MNIST size,
at the shapes where the networks run it (Conv2d 1->32 at 28x28, 32->64 at 14x14, 64->32 at
14x14, 32->1 at 28x28; MaxPool2d(2) on 32 channels at 28x28; Upsample(2) on 64 channels at
7x7), then the two networks together: encoder forward, decoder forward on the first d of
its outputs, both backward with fixed upstream gradients (no dx for the images: PyTorch's
images do not require grad either; PyTorch's and JAX's networks are built from vae_np's
layer list, so they run its order, each decoder ReLU before its Upsample). Not the VAE's
loss or Adam: those are the MLP's
(benchmarks/bench_step.py). Each round times vae_np then PyTorch on the same arrays
(interleaved, so both see the same machine); the table gives medians over rounds and the
ratio vae_np / PyTorch, the median of the rounds' own pairs (bench_step.paired_ratio).
BLAS and PyTorch are limited to ``--threads`` (and XLA to one thread with ``--threads 1``). With JAX installed the networks row also runs under ``jax.jit``
(``peers.make_jax_conv_networks``: the same layers, weights and upstream gradients).

Shared machines swing by tens of percent: read the ratios, measured side by side.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import vae_np  # noqa: F401
except ImportError:  # a source checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_step import batch_sizes, note_forced_blas_kernel, paired_ratio, set_threads  # noqa: E402
from peers import import_jax, make_jax_conv_networks  # noqa: E402

from vae_np.backend import get_backend  # noqa: E402
from vae_np.conv import Conv2d, MaxPool2d, Upsample  # noqa: E402
from vae_np.networks import conv_networks  # noqa: E402

LATENT = 16
LAYERS = {
    "conv 1->32 @28": ((1, 28, 28), "conv", (1, 32)),
    "conv 32->64 @14": ((32, 14, 14), "conv", (32, 64)),
    "conv 64->32 @14": ((64, 14, 14), "conv", (64, 32)),
    "conv 32->1 @28": ((32, 28, 28), "conv", (32, 1)),
    "maxpool 32 @28": ((32, 28, 28), "pool", None),
    "upsample 64 @7": ((64, 7, 7), "up", None),
}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def layer_pair(kind, shape, channels, batch, backend, torch):
    """(vae_np step, torch step): forward + backward of one layer on the same arrays."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *shape)).astype(np.float32)
    if kind == "conv":
        layer = Conv2d(*channels, 3, backend, rng, padding=1)
        ref = torch.nn.Conv2d(*channels, 3, padding=1)
        with torch.no_grad():
            ref.weight.copy_(torch.from_numpy(layer.params["W"]))
            ref.bias.copy_(torch.from_numpy(layer.params["b"]))
    elif kind == "pool":
        layer, ref = MaxPool2d(2, backend), torch.nn.MaxPool2d(2)
    else:
        layer, ref = Upsample(2, backend), torch.nn.Upsample(scale_factor=2, mode="nearest")
    dout = rng.standard_normal(layer.forward(x).shape).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    dt = torch.from_numpy(dout)

    def ours():
        layer.forward(x)
        layer.backward(dout)

    def theirs():
        xt.grad = None
        ref(xt).backward(dt)

    return ours, theirs


def _torch_networks(enc, dec, torch):
    """The same two networks in torch.nn (MNIST size, one channel), weights copied."""
    nn = torch.nn

    def build(net):
        modules = []
        for layer in net.layers:
            kind = type(layer).__name__
            if kind == "Conv2d":
                m = nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=1)
                with torch.no_grad():
                    m.weight.copy_(torch.from_numpy(layer.params["W"]))
                    m.bias.copy_(torch.from_numpy(layer.params["b"]))
            elif kind == "Linear":
                m = nn.Linear(layer.in_features, layer.out_features)
                with torch.no_grad():
                    m.weight.copy_(torch.from_numpy(layer.params["W"].T))
                    m.bias.copy_(torch.from_numpy(layer.params["b"]))
            elif kind == "Unflatten":
                m = nn.Unflatten(1, layer.shape)
            else:
                m = {"ReLU": nn.ReLU, "MaxPool2d": lambda: nn.MaxPool2d(2), "Flatten": nn.Flatten,
                     "Upsample": lambda: nn.Upsample(scale_factor=2, mode="nearest")}[kind]()
            modules.append(m)
        return nn.Sequential(*modules)

    return build(enc), build(dec)


def network_inputs(batch, backend):
    """(encoder, decoder, x, g_out, g_h): the MNIST-size networks, a batch of images, and
    the fixed upstream gradients of the decoder output and the encoder output, the same
    draws for every side."""
    rng = np.random.default_rng(0)
    enc, dec = conv_networks((28, 28), LATENT, 1, backend, rng)
    x = rng.uniform(size=(batch, 784)).astype(np.float32)
    g_out = rng.standard_normal((batch, 784)).astype(np.float32)
    g_h = rng.standard_normal((batch, 2 * LATENT)).astype(np.float32)
    return enc, dec, x, g_out, g_h


def network_pair(batch, backend, torch):
    enc, dec, x, g_out, g_h = network_inputs(batch, backend)
    tenc, tdec = _torch_networks(enc, dec, torch)
    xt, g_out_t, g_h_t = (torch.from_numpy(a) for a in (x, g_out, g_h))

    def ours():
        h = enc.forward(x)
        dec.forward(h[:, :LATENT])
        dz = dec.backward(g_out)
        dh = g_h.copy()
        dh[:, :LATENT] += dz
        enc.backward(dh, input_grad=False)

    def theirs():
        tenc.zero_grad(set_to_none=True)
        tdec.zero_grad(set_to_none=True)
        h = tenc(xt)
        out = tdec(h[:, :LATENT])
        ((out * g_out_t).sum() + (h * g_h_t).sum()).backward()

    return ours, theirs


def jax_network(batch, backend, jax):
    """The networks' work (network_pair's) in JAX under one jax.jit, on the same weights
    and arrays: (step, sync) from peers.make_jax_conv_networks."""
    enc, dec, x, g_out, g_h = network_inputs(batch, backend)
    return make_jax_conv_networks(jax, enc, dec, LATENT, x, g_out, g_h)


def measure(*sides, rounds: int, warmup: int = 3,
            settle_seconds: float = 0.0) -> tuple[list[float], list[list[float]]]:
    """(median seconds of each side's call, each side's seconds in every round), the sides
    timed in turn in every round (for bench_step.paired_ratio). With ``settle_seconds``,
    each timed call comes after that pause and one untimed call, so that the side before
    it has its threads asleep (bench_step.time_interleaved's reason: OpenBLAS's workers
    spin about 0.1 s after their last call, Intel OpenMP's, MKL's, 0.2 s, and a side timed
    beside them loses cores)."""
    for _ in range(warmup):
        for side in sides:
            side()
    times = [[] for _ in sides]
    for _ in range(rounds):
        for side, record in zip(sides, times):
            if settle_seconds:
                time.sleep(settle_seconds)
                side()
            record.append(_timed(side))
    return [statistics.median(t) for t in times], times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=batch_sizes, default="32,128",
                        help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per row")
    parser.add_argument("--threads", type=int, default=2, help="BLAS and PyTorch threads")
    parser.add_argument("--quick", action="store_true", help="batch 8, 3 rounds")
    parser.add_argument("--settle-seconds", type=float, default=0.25,
                        help="pause before each side's timed call, after which it runs once "
                             "untimed (0 with --quick)")
    parser.add_argument("--no-jax", action="store_true",
                        help="skip the jax.jit networks even if JAX is installed")
    args = parser.parse_args(argv)
    jax = None if args.no_jax else import_jax(args.threads)
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed: nothing to compare with "
              "(pip install torch --index-url https://download.pytorch.org/whl/cpu)")
        return 1
    batches = [8] if args.quick else args.batches
    rounds = 3 if args.quick else args.rounds
    settle = 0.0 if args.quick else args.settle_seconds
    keep = set_threads(args.threads)  # noqa: F841  (the limits hold while it lives)
    torch.set_num_threads(args.threads)
    backend = get_backend("numpy", "float32")
    note_forced_blas_kernel()
    print(f"vae_np (numpy, float32, fast paths) against PyTorch {torch.__version__} eager, "
          f"{args.threads} threads, median of {rounds} interleaved rounds, forward + backward")
    if jax is not None:
        print(f"and the networks under jax.jit (JAX {jax.__version__}; the row's jax ms and "
              f"vae_np / jax)")
    print(f"{'row':<22} {'batch':>5} {'vae_np ms':>10} {'torch ms':>10} {'ratio':>7}"
          + (f" {'jax ms':>8} {'/ jax':>6}" if jax is not None else ""))
    for batch in batches:
        rows = [(name, layer_pair(kind, shape, ch, batch, backend, torch))
                for name, (shape, kind, ch) in LAYERS.items()]
        rows.append(("encoder + decoder", network_pair(batch, backend, torch)))
        for name, (ours, theirs) in rows:
            if name == "encoder + decoder" and jax is not None:
                jax_step, jax_sync = jax_network(batch, backend, jax)

                def jax_side():
                    jax_step()
                    jax_sync()                   # the clock reads finished work
                (a, b, c), times = measure(ours, theirs, jax_side, rounds=rounds,
                                               settle_seconds=settle)
                print(f"{name:<22} {batch:>5} {a * 1e3:>10.2f} {b * 1e3:>10.2f} "
                      f"{paired_ratio(times[0], times[1])[0]:>7.2f} {c * 1e3:>8.2f} "
                      f"{paired_ratio(times[0], times[2])[0]:>6.2f}")
                continue
            (a, b), times = measure(ours, theirs, rounds=rounds, settle_seconds=settle)
            print(f"{name:<22} {batch:>5} {a * 1e3:>10.2f} {b * 1e3:>10.2f} "
                  f"{paired_ratio(times[0], times[1])[0]:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
