"""Check an installation of vae_np on one backend: ``python -m vae_np.selfcheck``.

    python -m vae_np.selfcheck                    # the CPU (NumPy), about ten seconds
    python -m vae_np.selfcheck --backend cupy     # the GPU
    python -m vae_np.selfcheck --quick            # smaller and shorter (a few seconds)

It prints the versions that decide what runs (Python, NumPy and its BLAS, numba, CuPy,
the CUDA runtime, driver and NVRTC, the GPU and its memory), then checks, on the chosen
backend:

1. gradients: a float64 element-wise and a directional finite-difference check of a small
   VAE (two samples per image) for every decoder (``vae_np.gradcheck``), biases
   randomised first so that no ReLU sits on its kink; and of a small convolutional VAE
   (8x8 images, ``architecture="conv"``), every entry, for every decoder;
2. fast path against reference: loss and every gradient of one step with the fast
   paths on and off (``use_fast_paths(False)``), float32 and float64, every decoder:
   identical bits on NumPy, within a tolerance on CuPy (CUDA's exp, log1p and tanh
   round differently from NumPy's, by an ulp or two);
3. transfers: host -> backend -> host, bit for bit (NaN, infinities, -0, subnormals,
   non-contiguous), and a model's parameters through state_dict/load_state_dict;
4. training: 30 Adam steps on synthetic digits, noise from the backend's RNG; the loss
   must fall;
5. speed: training steps per second of the starting configuration (784-512-512, latent
   64, float32), a figure to compare with benchmarks/README.md, not a pass/fail check.

It ends with one line, ``selfcheck: OK`` or ``selfcheck: FAILED (what failed)``, and exits
with 0 or 1 (2 for a bad flag). A backend that cannot run here (no CuPy, no GPU, a
missing CUDA library) is one FAILED line naming the reason and what to install.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import traceback
from typing import Callable

import numpy as np

DECODERS = ("bernoulli", "gaussian", "gaussian-fixed")
STEP_CONFIG = {"hidden": (512, 512), "latent_dim": 64}  # the starting configuration


# ------------------------------------------------------------------------------------------
# Versions


def _try(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as exc:  # a version we cannot read is reported, never fatal
        text = " ".join(str(exc).split()) or type(exc).__name__
        return f"unavailable ({text[:160]})"


def _blas() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        threadpool_info = None
    if threadpool_info is not None:
        found = [f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} threads)"
                 for i in threadpool_info() if i.get("user_api") == "blas"]
        if found:
            return ", ".join(found)
    try:
        config = np.show_config(mode="dicts")  # NumPy >= 1.25
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')} (from numpy.show_config)"
    except Exception:
        return "unknown (install threadpoolctl to see it)"


def _cuda_version(number: int) -> str:
    return f"{number // 1000}.{number % 1000 // 10}" if number else "none"


def version_lines(backend_name: str) -> list[tuple[str, str]]:
    """(what, version) pairs; the CUDA ones only when CuPy is importable."""
    lines = [("Python", f"{sys.version.split()[0]} ({platform.platform()})"),
             ("NumPy", np.__version__), ("BLAS", _blas())]
    try:
        import numba
        lines.append(("numba", numba.__version__))
    except ImportError:
        lines.append(("numba", "not installed (the CPU fast paths run as NumPy loops)"))
    try:
        import cupy
    except ImportError:
        lines.append(("CuPy", "not installed"))
        return lines
    except Exception as exc:
        lines.append(("CuPy", f"fails to import ({' '.join(str(exc).split())[:160]})"))
        return lines
    runtime = cupy.cuda.runtime
    lines.append(("CuPy", cupy.__version__))
    lines.append(("CUDA runtime", _try(lambda: _cuda_version(runtime.runtimeGetVersion()))))
    lines.append(("CUDA driver", _try(lambda: _cuda_version(runtime.driverGetVersion()))))
    lines.append(("NVRTC", _try(lambda: "%d.%d" % cupy.cuda.nvrtc.getVersion())))

    def devices() -> str:
        count = runtime.getDeviceCount()
        out = []
        for index in range(count):
            props = runtime.getDeviceProperties(index)
            name = props["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            out.append(f"{index}: {name}, compute capability {props['major']}.{props['minor']}, "
                       f"{props['totalGlobalMem'] / 2**30:.1f} GiB")
        if count:
            with cupy.cuda.Device(0):
                free, total = runtime.memGetInfo()
            out.append(f"device 0 free: {free / 2**30:.1f} of {total / 2**30:.1f} GiB")
        return "; ".join(out) if out else "none"

    lines.append(("GPU", _try(devices)))
    return lines


# ------------------------------------------------------------------------------------------
# The checks. Each returns a one-line summary and raises CheckFailed (or anything) on failure.


class CheckFailed(AssertionError):
    """A check ran and its result is wrong (as opposed to an error while running it)."""


def _fast_paths(on: bool):
    from .backend import use_fast_paths
    return use_fast_paths(on)


def _host_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _randomise_biases(model, rng: np.random.Generator, scale: float = 0.5) -> None:
    """Biases off zero, so that no ReLU pre-activation sits exactly on its kink (see
    vae_np.gradcheck's docstring)."""
    backend = model.backend
    for name, value in model.parameters.values.items():
        if name.endswith(".b"):
            value[...] = backend.asarray(rng.normal(0.0, scale, tuple(value.shape)))


def _data(decoder: str, n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.random((n, dim))
    return (x < 0.3).astype(np.float64) if decoder == "bernoulli" else x


def check_gradients(backend_name: str, decoder: str, quick: bool,
                    architecture: str = "mlp") -> str:
    from .backend import get_backend
    from .gradcheck import check_vae, check_vae_directional
    from .model import VAE

    backend = get_backend(backend_name, "float64")
    rng = _host_rng(1)
    if architecture == "conv":
        # Every entry: in a network this small a whole channel can be dead for the four
        # images, and a sample of its entries alone would compare round-off with 0.
        model = VAE(architecture="conv", image_shape=(8, 8), channels=(2, 3), hidden=(5,),
                    latent_dim=3, decoder=decoder, samples=2, backend=backend, seed=2)
        entries = None
    else:
        model = VAE(input_dim=12, hidden=(8,), latent_dim=3, decoder=decoder, samples=2,
                    backend=backend, seed=2)
        entries = 6 if quick else 20
    _randomise_biases(model, rng)
    x = backend.asarray(_data(decoder, 4, model.input_dim, rng))
    eps = backend.asarray(rng.standard_normal((2, 4, 3)))
    report = check_vae(model, x, eps, max_entries=entries)
    directional = check_vae_directional(model, x, eps)
    summary = (f"element-wise {report.max_rel_error:.1e} ({sum(r.entries for r in report.rows)} "
               f"entries), directional {directional.rel_error:.1e} "
               f"(tolerance {report.tolerance:.0e})")
    if not report.passed:
        worst = report.worst()
        raise CheckFailed(f"{summary}; worst: {worst.name}{list(worst.worst_index)} analytic "
                          f"{worst.analytic_at_worst:.6e}, numerical {worst.numerical_at_worst:.6e}")
    if not directional.passed:
        raise CheckFailed(f"{summary}; directional analytic {directional.analytic:.6e}, "
                          f"numerical {directional.numerical:.6e}")
    return summary


def _one_step(model, x, eps, fast: bool):
    backend = model.backend
    with _fast_paths(fast):
        terms = model.loss(x, eps=eps)
        model.backward()
    losses = np.array([backend.to_float(t) for t in (terms.loss, terms.kl, terms.recon)])
    return losses, backend.to_numpy(model.parameters.grad).copy()


def check_fast_against_reference(backend_name: str, decoder: str, quick: bool) -> str:
    from .backend import fast_paths_enabled, get_backend
    from .model import VAE

    worst = []
    for dtype in ("float32", "float64"):
        backend = get_backend(backend_name, dtype)
        rng = _host_rng(3)
        samples = 1 if dtype == "float32" else 2
        model = VAE(input_dim=784, hidden=(64,) if quick else (128, 64), latent_dim=8,
                    decoder=decoder, samples=samples, backend=backend, seed=4)
        _randomise_biases(model, rng, 0.1)
        x = backend.asarray(_data(decoder, 16, 784, rng))
        eps = backend.asarray(rng.standard_normal((samples, 16, 8)))
        with _fast_paths(False):
            if fast_paths_enabled(backend):
                raise CheckFailed("use_fast_paths(False) does not switch the fast paths off")
        fast_loss, fast_grad = _one_step(model, x, eps, True)
        ref_loss, ref_grad = _one_step(model, x, eps, False)
        if backend.name == "numpy":
            if not (np.array_equal(fast_loss, ref_loss) and np.array_equal(fast_grad, ref_grad)):
                bad = int(np.sum(fast_grad != ref_grad))
                raise CheckFailed(f"{dtype}: the fast path differs from the reference on NumPy "
                                  f"(losses {fast_loss} vs {ref_loss}, {bad} gradient entries "
                                  f"differ); they must be identical")
            worst.append(f"{dtype} identical")
            continue
        # CuPy: the fused kernels' exp/log1p/tanh against CuPy's ufuncs, a few ulps apart;
        # gradient entries that cancel to near zero carry only absolute round-off.
        rtol = 1e-10 if dtype == "float64" else 1e-4
        scale = float(np.max(np.abs(ref_grad))) or 1.0
        atol = rtol * scale
        loss_err = float(np.max(np.abs(fast_loss - ref_loss) / np.abs(ref_loss)))
        grad_err = float(np.max(np.abs(fast_grad - ref_grad))) / scale
        if not (np.allclose(fast_loss, ref_loss, rtol=rtol, atol=0)
                and np.allclose(fast_grad, ref_grad, rtol=rtol, atol=atol)):
            raise CheckFailed(f"{dtype}: fast path against reference: loss rel. error "
                              f"{loss_err:.1e}, gradient error {grad_err:.1e} of the largest "
                              f"(tolerance {rtol:.0e})")
        worst.append(f"{dtype} loss {loss_err:.0e}, gradients {grad_err:.0e}")
    return "; ".join(worst)


def check_transfers(backend_name: str, quick: bool) -> str:
    from .backend import get_backend
    from .model import VAE

    for dtype, uint in (("float32", np.uint32), ("float64", np.uint64)):
        backend = get_backend(backend_name, dtype)
        info = np.finfo(dtype)
        host = _host_rng(5).standard_normal((37, 29)).astype(dtype)
        host.flat[:7] = [np.nan, np.inf, -np.inf, -0.0, info.smallest_subnormal, info.max,
                         info.tiny]
        for label, source in (("contiguous", host), ("transposed", host.T)):
            back = backend.to_numpy(backend.asarray(source))
            if back.dtype != np.dtype(dtype) or back.shape != source.shape or not np.array_equal(
                    np.ascontiguousarray(back).view(uint), np.ascontiguousarray(source).view(uint)):
                raise CheckFailed(f"{dtype} {label}: host -> {backend.name} -> host changed bits")
        model = VAE(input_dim=20, hidden=(8,), latent_dim=2, backend=backend, seed=6)
        other = VAE(input_dim=20, hidden=(8,), latent_dim=2, backend=backend, seed=7)
        state = model.state_dict()
        other.load_state_dict(state)
        again = other.state_dict()
        if not all(np.array_equal(state[k].view(uint), again[k].view(uint)) for k in state):
            raise CheckFailed(f"{dtype}: parameters changed through state_dict/load_state_dict")
    return "float32 and float64, bit for bit (NaN, inf, -0, subnormals, transposed, parameters)"


def _digits(n: int, rng: np.random.Generator) -> np.ndarray:
    """n synthetic 'digits': ten random binary prototypes with pixel noise."""
    prototypes = rng.random((10, 784)) < 0.2
    noise = rng.random((n, 784)) < 0.05
    return (prototypes[rng.integers(0, 10, n)] ^ noise).astype(np.float64)


def check_training(backend_name: str, quick: bool, steps: int = 30) -> str:
    from .backend import get_backend
    from .model import VAE
    from .optim import Adam

    backend = get_backend(backend_name, "float32")
    model = VAE(input_dim=784, hidden=(128,), latent_dim=16, backend=backend, seed=8)
    opt = Adam(model.parameters, lr=3e-3)
    rng = backend.rng(9)
    data = backend.asarray(_digits(512, _host_rng(10)))
    losses = []
    for step in range(steps):
        start = (step * 64) % 512
        terms = model.loss(data[start:start + 64], rng=rng, check_finite=False)
        model.backward()
        opt.step()
        losses.append(terms.loss)  # stays on the device: read back once, at the end
    values = np.array([backend.to_float(v) for v in losses])
    first, last = float(values[:5].mean()), float(values[-5:].mean())
    summary = f"{steps} Adam steps, loss {first:.1f} -> {last:.1f} nats/image (means of 5 steps)"
    if not np.all(np.isfinite(values)):
        raise CheckFailed(f"{summary}: non-finite loss at step {int(np.argmin(np.isfinite(values)))}")
    if not last < 0.9 * first:
        raise CheckFailed(f"{summary}: the loss did not fall by 10 %")
    return summary


def step_throughput(backend_name: str, quick: bool) -> str:
    from .backend import get_backend
    from .model import VAE
    from .optim import Adam

    backend = get_backend(backend_name, "float32")
    model = VAE(input_dim=784, backend=backend, seed=11, **STEP_CONFIG)
    opt = Adam(model.parameters, lr=1e-3)
    rng = backend.rng(12)
    out = []
    for batch in ((32,) if quick else (32, 128, 512)):
        x = backend.asarray(_digits(batch, _host_rng(batch)))

        def step():
            model.loss(x, rng=rng, check_finite=False)
            model.backward()
            opt.step()

        for _ in range(2):  # warm up: kernels compiled, memory pool filled
            step()
        backend.synchronize()
        budget = 0.1 if quick else 0.5
        count, start = 0, time.perf_counter()
        while True:
            step()
            count += 1
            if count >= 3 and time.perf_counter() - start > budget:
                break
        backend.synchronize()
        ms = (time.perf_counter() - start) / count * 1e3
        out.append(f"batch {batch}: {ms:.2f} ms/step ({batch / ms * 1e3:,.0f} images/s)")
    return "784-512-512, latent 64, float32, " + "; ".join(out)


# ------------------------------------------------------------------------------------------
# Running


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vae_np.selfcheck",
        description="Print versions and check gradients, fast paths, transfers and training "
                    "on one backend; the last line is 'selfcheck: OK' or 'selfcheck: FAILED "
                    "(...)', and the exit status says the same (0 / 1).")
    p.add_argument("--backend", choices=("numpy", "cupy", "auto"), default="numpy",
                   help="where to check: numpy (the CPU), cupy (an NVIDIA GPU) or auto "
                        "(cupy when usable) (default: numpy)")
    p.add_argument("--quick", action="store_true",
                   help="smaller checks and a shorter timing (a few seconds on a CPU)")
    p.add_argument("--traceback", action="store_true",
                   help="print the traceback of a check that raises, not only its message")
    return p


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, CheckFailed):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run(backend_name: str, quick: bool = False, show_traceback: bool = False,
        write: Callable[[str], None] = print) -> list[str]:
    """Print the versions and run every check; returns the names of the failed ones."""
    from .backend import BackendUnavailableError, get_backend

    write(f"vae_np selfcheck: backend {backend_name}{', quick' if quick else ''}")
    for what, version in version_lines(backend_name):
        write(f"  {what + ':':<14}{version}")
    try:
        backend = get_backend(backend_name)
    except BackendUnavailableError as exc:
        return [" ".join(str(exc).split())]
    write(f"  {'checking on:':<14}{backend.name}")
    checks = [(f"gradients {d}", lambda d=d: check_gradients(backend.name, d, quick))
              for d in DECODERS]
    checks += [(f"gradients conv {d}",
                lambda d=d: check_gradients(backend.name, d, quick, "conv")) for d in DECODERS]
    checks += [(f"fast path {d}", lambda d=d: check_fast_against_reference(backend.name, d, quick))
               for d in DECODERS]
    checks += [("transfers", lambda: check_transfers(backend.name, quick)),
               ("training", lambda: check_training(backend.name, quick)),
               ("step speed", lambda: step_throughput(backend.name, quick))]
    failed = []
    for name, check in checks:
        start = time.perf_counter()
        try:
            summary = check()
        except Exception as exc:
            failed.append(name)
            write(f"  FAILED {name}: {_one_line(exc)}")
            if show_traceback:
                write(traceback.format_exc().rstrip())
        else:
            write(f"  ok     {name}: {summary} [{time.perf_counter() - start:.2f} s]")
    return failed


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        failed = run(args.backend, args.quick, args.traceback,
                     write=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("selfcheck: FAILED (interrupted)", flush=True)
        return 130
    except Exception as exc:  # a bug of the self-check itself: still one line, no traceback
        print(f"selfcheck: FAILED (the self-check itself: {_one_line(exc)})", flush=True)
        return 1
    if failed:
        print(f"selfcheck: FAILED ({'; '.join(failed)})", flush=True)
        return 1
    print("selfcheck: OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
