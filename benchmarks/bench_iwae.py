"""Time per training step of the importance-weighted bound (IWAE) for k = 5 and k = 50
against k = 1, side by side.

    python benchmarks/bench_iwae.py                  # both configurations (about a minute)
    python benchmarks/bench_iwae.py --quick          # a smoke run (seconds)
    python benchmarks/bench_iwae.py --configs burda --ks 1,5,50 --rounds 9

Configurations (NumPy, float32 unless ``--dtype``, Bernoulli decoder, Adam):

- ``starting``: the default model, 784-512-512 encoder, latent 64, ReLU, batch 32;
- ``burda``: Burda et al. (2015), one stochastic layer: 784-200-200-(2 x 50), decoder
  50-200-200-784, tanh, batch 20.

For each configuration and k it times whole steps (``loss`` with fresh noise from the
model's RNG, ``backward``, ``Adam.step``; ``check_finite=False``, as the trainer runs them)
of ``VAE(objective="iwae", samples=k)``, and, for k > 1, of the "vae" objective with
S = k samples (the same decoder work, without the importance weights), so the IWAE's own
bookkeeping shows as the difference. Every variant is timed in every round, in rotating
order, one block of steps each (about ``--block`` seconds, after one untimed step and a
short pause so that OpenBLAS's spinning threads from the previous variant are asleep); the
table gives the median over rounds, its spread (the lowest and highest round), the ratio
of medians to k = 1 of the same configuration, and what one epoch of 60,000 images costs
in steps alone. The data are a fixed batch of random binary images (a step's cost does not
depend on the pixels). Shared machines swing by tens of percent: read the ratios, which
are measured side by side, rather than the absolute times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    import vae_np
except ImportError:  # run from a source checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import vae_np

from vae_np import VAE, Adam
from vae_np.backend import get_backend

INPUT_DIM = 784
EPOCH_IMAGES = 60_000
CONFIGS = {
    "starting": {"hidden": (512, 512), "latent_dim": 64, "activation": "relu", "batch": 32},
    "burda": {"hidden": (200, 200), "latent_dim": 50, "activation": "tanh", "batch": 20},
}


def make_step(backend, config: dict, objective: str, k: int):
    """One training step of a fresh model (seed 0) on a fixed binary batch."""
    model = VAE(INPUT_DIM, config["hidden"], config["latent_dim"], samples=k,
                activation=config["activation"], objective=objective, backend=backend, seed=0)
    opt = Adam(model.parameters, lr=1e-3)
    rng = backend.rng(1)
    data = np.random.default_rng(0).random((config["batch"], INPUT_DIM)) < 0.3
    x = backend.asarray(data.astype(np.float64))

    def step():
        model.loss(x, rng=rng, check_finite=False)
        model.backward()
        opt.step()

    return step


def time_interleaved(steps: dict, rounds: int, block_seconds: float, settle: float,
                     sync) -> dict:
    """name -> list of ms/step, one per round (each round times every variant once, in an
    order rotated by one each round)."""
    reps = {}
    for name, step in steps.items():      # warm up, and size each block to ~block_seconds
        step()
        start = time.perf_counter()
        step()
        sync()
        reps[name] = max(2, round(block_seconds / max(time.perf_counter() - start, 1e-6)))
    times = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step = steps[name]
            time.sleep(settle)
            step()
            sync()
            start = time.perf_counter()
            for _ in range(reps[name]):
                step()
            sync()
            times[name].append(1e3 * (time.perf_counter() - start) / reps[name])
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--configs", default="starting,burda",
                        help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--ks", default="1,5,50", help="comma-separated k (must include 1)")
    parser.add_argument("--backend", default="numpy", choices=("numpy", "cupy"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--block", type=float, default=0.4, help="seconds per timed block")
    parser.add_argument("--settle", type=float, default=0.3,
                        help="pause before each block (lets BLAS threads go to sleep)")
    parser.add_argument("--no-vae", action="store_true",
                        help="skip the 'vae' objective with S = k samples")
    parser.add_argument("--threads", type=int, default=None,
                        help="limit BLAS to this many threads (threadpoolctl); default: "
                             "BLAS's own (all cores)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of short blocks")
    args = parser.parse_args(argv)
    keep = []
    if args.threads is not None:
        from threadpoolctl import threadpool_limits
        keep.append(threadpool_limits(limits=args.threads, user_api="blas"))
    if args.quick:
        args.rounds, args.block, args.settle = 3, 0.05, 0.05
    ks = [int(k) for k in args.ks.split(",")]
    if 1 not in ks:
        parser.error("--ks: must include 1 (the ratios are to k = 1)")
    configs = [c for c in args.configs.split(",")]
    for c in configs:
        if c not in CONFIGS:
            parser.error(f"--configs: unknown {c!r}; expected some of {', '.join(CONFIGS)}")

    backend = get_backend(args.backend, args.dtype)
    threads = "?"
    try:
        from threadpoolctl import threadpool_info
        threads = ",".join(str(i["num_threads"]) for i in threadpool_info()
                           if i.get("user_api") == "blas") or "?"
    except ImportError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"vae_np {vae_np.__version__}, {args.backend} {args.dtype}, BLAS threads {threads}, "
          f"{os.cpu_count()} CPUs, load average {load:.2f} at start; "
          f"{args.rounds} rounds, medians")
    header = (f"{'config':<9} {'objective':<9} {'k':>3} {'batch':>5} {'ms/step':>9} "
              f"{'(lowest-highest round)':>24} {'x k=1':>6} {'s/epoch of 60k':>15}")
    print(header)
    print("-" * len(header))
    for name in configs:
        config = CONFIGS[name]
        steps = {}
        for k in ks:
            steps[("iwae", k)] = make_step(backend, config, "iwae", k)
            if k > 1 and not args.no_vae:
                steps[("vae", k)] = make_step(backend, config, "vae", k)
        times = time_interleaved(steps, args.rounds, args.block, args.settle,
                                 backend.synchronize)
        base = statistics.median(times[("iwae", 1)])
        for (objective, k) in sorted(steps, key=lambda key: (key[1], key[0] != "iwae")):
            ms = times[(objective, k)]
            med = statistics.median(ms)
            epoch = med / 1e3 * EPOCH_IMAGES / config["batch"]
            spread = f"({min(ms):.2f}-{max(ms):.2f})"
            print(f"{name:<9} {objective:<9} {k:>3} {config['batch']:>5} {med:>9.2f} "
                  f"{spread:>24} {med / base:>6.2f} {epoch:>15.1f}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end" if hasattr(os, "getloadavg")
          else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
