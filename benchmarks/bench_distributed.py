"""Data-parallel throughput with 1 and 2 MPI ranks, and the allreduce of the gradient buffer.

    python benchmarks/bench_distributed.py              # launches mpiexec -n 1 and -n 2 itself
    python benchmarks/bench_distributed.py --ranks 1 2 4 --batches 64 256 --steps 40

Each rank runs with one BLAS thread (OPENBLAS_NUM_THREADS=1, also OMP/MKL/numba). The
step is the trainer's distributed step on the starting configuration (784-512-512-64,
Bernoulli, NumPy float32, 1.43 M parameters): the rank's shard of a global batch of
MNIST-like pixels, loss and backward, the shard weight, one Allreduce of the flat
gradient buffer, three loss terms summed, one Adam step. Printed per (ranks, global
batch): the median step time, images per second, the median time of the gradient
Allreduce inside the step, and a separate timing of the Allreduce alone (float32, the
1.43 M-parameter buffer) with the ranks otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()


def one_thread_env() -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1]), env.get("PYTHONPATH", "")])
    return env


def rank_main(batches: list[int], steps: int, warmup: int) -> None:
    """Run inside mpiexec: time each global batch, then the bare allreduce; rank 0 prints
    one JSON line per measurement."""
    from vae_np import VAE, Adam, get_backend
    from vae_np.distributed import shard_bounds, world

    comm = world("numpy")
    backend = get_backend("numpy", "float32")
    comm.attach(backend)
    xp = backend.xp
    model = VAE(784, hidden=(512, 512), latent_dim=64, backend=backend, seed=0)
    opt = Adam(model.parameters, lr=1e-3)
    grad = model.parameters.grad
    data_rng = np.random.default_rng(0)
    for batch in batches:
        if batch % comm.size:
            continue
        x = backend.asarray((data_rng.random((batch, 784)) < 0.13).astype(np.float32))
        noise = backend.rng(1)
        lo, hi = shard_bounds(batch, comm.size, comm.rank)
        step_times, reduce_times = [], []
        for i in range(warmup + steps):
            comm.barrier()
            t0 = time.perf_counter()
            eps = noise.normal((1, batch, 64))
            t = model.loss(x[lo:hi], eps=eps[:, lo:hi], check_finite=False)
            model.backward()
            grad *= (hi - lo) / batch
            local = xp.stack([t.loss, t.kl, t.recon]) * ((hi - lo) / batch)
            t1 = time.perf_counter()
            comm.allreduce_sum(grad)
            comm.allreduce_sum(local)
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            if i >= warmup:
                step_times.append(t3 - t0)
                reduce_times.append(t2 - t1)
        # the slowest rank sets the pace: take each step's maximum over ranks
        step = np.max(comm.allgather(step_times), axis=0)
        reduce = np.max(comm.allgather(reduce_times), axis=0)
        if comm.is_root:
            print(json.dumps({"kind": "step", "ranks": comm.size, "batch": batch,
                              "step_ms": 1e3 * float(np.median(step)),
                              "images_per_s": batch / float(np.median(step)),
                              "allreduce_in_step_ms": 1e3 * float(np.median(reduce)),
                              "parameters": model.num_parameters}), flush=True)
    buffer = np.ones(model.num_parameters, dtype=np.float32)
    times = []
    for i in range(warmup + 4 * steps):
        comm.barrier()
        t0 = time.perf_counter()
        comm.allreduce_sum(buffer)
        times.append(time.perf_counter() - t0)
    times = np.max(comm.allgather(times[warmup:]), axis=0)
    if comm.is_root:
        print(json.dumps({"kind": "allreduce", "ranks": comm.size,
                          "bytes": int(buffer.nbytes),
                          "allreduce_ms": 1e3 * float(np.median(times)),
                          "allreduce_min_ms": 1e3 * float(np.min(times))}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_main:
        rank_main(args.batches, args.steps, args.warmup)
        return
    beside = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(beside) if beside.exists() else shutil.which("mpiexec")
    if mpiexec is None:
        sys.exit('bench_distributed.py: no mpiexec; pip install -e ".[mpi]"')
    rows = []
    for ranks in args.ranks:
        cmd = [mpiexec, "-n", str(ranks), sys.executable, str(HERE), "--rank-main",
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batches", *map(str, args.batches)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=one_thread_env())
        if done.returncode:
            sys.exit(f"bench_distributed.py: {' '.join(cmd)} failed:\n{done.stderr}")
        rows += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    print(f"{'ranks':>5} {'global batch':>12} {'step ms':>8} {'images/s':>9} "
          f"{'allreduce in step ms':>21}")
    for r in rows:
        if r["kind"] == "step":
            print(f"{r['ranks']:>5} {r['batch']:>12} {r['step_ms']:>8.2f} "
                  f"{r['images_per_s']:>9.0f} {r['allreduce_in_step_ms']:>21.2f}")
    for r in rows:
        if r["kind"] == "allreduce":
            print(f"allreduce alone, {r['ranks']} rank(s), {r['bytes'] / 1e6:.2f} MB float32: "
                  f"median {r['allreduce_ms']:.2f} ms (min {r['allreduce_min_ms']:.2f} ms)")


if __name__ == "__main__":
    main()
