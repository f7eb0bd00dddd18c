"""This checkout's training step against another revision's, in one process, interleaved.

    python benchmarks/bench_versions.py 7af2697            # before the "one model" refactor
    python benchmarks/bench_versions.py HEAD~3 --dtypes float32 --batches 32,512
    python benchmarks/bench_versions.py HEAD~1 --architecture conv --batches 32,128

The other revision's package is exported with ``git archive`` into a temporary folder under
another name (``vae_np_<rev>``; the package imports itself relatively, so it runs there
unchanged) and both are imported side by side: each round times a block of steps of each,
in alternating order, after a pause, so that a slow spell of a shared machine falls on both.
Prints the median ms/step of each, their ratio, and the median and quartiles of the
rounds' own ratios (the figures to decide by). The starting configuration (784-512-512,
latent 64, Bernoulli decoder, Adam), or with ``--architecture conv`` the starting example's
convolutional VAE (its defaults: channels 32 / 64, one dense layer of 512, latent 64); fresh
weights, one fixed binary batch.

``--clock cpu`` reads this thread's CPU time instead of the wall clock and runs BLAS on one
thread (threadpoolctl): on a machine that other jobs share, the time they take the core
away is then not counted (their pressure on caches and memory still is). ``--clock wall``
(the default) times the threads BLAS was given.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def export(rev: str, into: Path) -> str:
    """``vae_np`` at ``rev`` as the package ``vae_np_<rev>`` in ``into``; its name."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip()
    name = f"vae_np_{sha}"
    archive = subprocess.run(["git", "archive", rev, "vae_np"], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "vae_np").rename(into / name)
    return name


def make_step(pkg, batch: int, dtype: str, architecture: str = "mlp"):
    if architecture == "conv":
        model = pkg.VAE(784, latent_dim=64, architecture="conv", seed=0, dtype=dtype)
    else:
        model = pkg.VAE(784, (512, 512), 64, seed=0, dtype=dtype)
    opt = pkg.Adam(model.parameters)
    rng = model.backend.rng(1)
    x = model.backend.asarray(
        (np.random.default_rng(0).random((batch, 784)) < 0.3).astype(dtype))

    def step():
        model.loss(x, rng=rng, check_finite=False)
        model.backward()
        opt.step()

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="the other revision (a commit, tag or branch)")
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--batches", default="32,128,512")
    p.add_argument("--architecture", choices=("mlp", "conv"), default="mlp")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--block-seconds", type=float, default=0.25)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter; cpu: this thread's CPU time, BLAS on one thread")
    args = p.parse_args(argv)
    clock = time.perf_counter
    if args.clock == "cpu":
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            p.error("--clock cpu needs threadpoolctl (pip install -e \".[bench]\") to run "
                    "BLAS on the one thread it times")
        limits = threadpool_limits(limits=1)  # noqa: F841  (kept for the whole run)
        clock = time.thread_time
    sys.path.insert(0, str(REPO))
    import vae_np
    with tempfile.TemporaryDirectory() as tmp:
        other_name = export(args.rev, Path(tmp))
        sys.path.insert(0, tmp)
        other = importlib.import_module(other_name)
        print(f"this checkout ({Path(vae_np.__file__).parent}) against {args.rev} "
              f"({other_name}); {args.architecture} step, medians of {args.rounds} interleaved "
              f"rounds, {args.clock} clock")
        for dtype in args.dtypes.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                sides = {"other": make_step(other, batch, dtype, args.architecture),
                         "this": make_step(vae_np, batch, dtype, args.architecture)}
                for step in sides.values():
                    for _ in range(5):
                        step()           # compile, warm the caches
                start = time.perf_counter()
                sides["this"]()
                reps = max(5, int(args.block_seconds / (time.perf_counter() - start)))
                samples: dict[str, list[float]] = {name: [] for name in sides}
                for r in range(args.rounds):
                    for name in (("other", "this") if r % 2 == 0 else ("this", "other")):
                        time.sleep(0.25)     # let the other side's BLAS threads go idle
                        sides[name]()
                        start = clock()
                        for _ in range(reps):
                            sides[name]()
                        samples[name].append((clock() - start) / reps * 1e3)
                other_ms, this_ms = np.median(samples["other"]), np.median(samples["this"])
                # each round's own ratio, the two sides timed seconds apart: its median and
                # quartiles are what to decide by (the medians' ratio pairs rounds far apart)
                low, mid, high = np.percentile(np.divide(samples["this"], samples["other"]),
                                               [25, 50, 75])
                print(f"{dtype} batch {batch:3d}: {args.rev} {other_ms:6.2f} ms, this "
                      f"{this_ms:6.2f} ms, this / {args.rev} {this_ms / other_ms:.3f}; "
                      f"per round {mid:.3f} (quartiles {low:.3f}-{high:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
