"""The CuPy backend on a GPU: each fused kernel against NumPy within a few ulps, the whole
step against NumPy for every decoder and dtype, the fused kernels against CuPy's reference
path, no host synchronisation inside a step, the RNG's bits, resume bit for bit, a GPU
checkpoint on the CPU, and GPU memory given back after training.

Skipped as a whole where CuPy is missing or cannot use a GPU (the reason is the backend's
own one-line message), so the CPU suite stays green; on a machine with one, run
``pytest -m gpu`` (``benchmarks/gpu_check.sh`` does, with everything else to check there).
Only public entry points are used: ``VAE.loss``/``backward``, ``Adam``, ``Trainer``, the
backend (``get_backend``, ``_twins_cuda.kernel``, ``use_fast_paths``, ``rng``).

Tolerances. CuPy float64 against NumPy float64: cuBLAS sums in another order than OpenBLAS
and CUDA's exp/tanh/log1p differ from NumPy's by an ulp or two, so values agree to about
1e-15 relative; gradients (sums of many such terms, some near zero) are compared with rtol
1e-9 and an absolute floor of 1e-12 times the largest gradient. The fused kernels against
CuPy's own ufuncs: the same operations in the same order (compiled without FMA
contraction), differing only where CUDA's inlined math functions round differently, so
rtol 1e-10 in float64. float32 against float64: rtol 1e-3. Kernels made only of correctly
rounded operations (+, -, *, /, sqrt, comparisons: Adam, bias+ReLU, ReLU backward) match
NumPy bit for bit; those calling exp, expm1, log1p or tanh within 8 ulps of the operands'
scale (CUDA's and NumPy's functions are each within 1-2 ulps, and a few roundings follow).
"""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")

from vae_np import VAE, Adam, use_fast_paths  # noqa: E402
from vae_np._twins_cuda import SOURCES, kernel  # noqa: E402
from vae_np.backend import cuda_available, cuda_unavailable_reason, get_backend  # noqa: E402

pytestmark = pytest.mark.gpu

if not cuda_available():
    pytest.skip(f"no usable GPU: {cuda_unavailable_reason()}", allow_module_level=True)

DECODERS = ("bernoulli", "gaussian", "gaussian-fixed")
DTYPES = ("float32", "float64")


# ------------------------------------------------------------------------------------------
# Each fused kernel against NumPy


def _ulps(got, want, ulps, scale=None, what=""):
    """|got - want| <= ulps * spacing(max(|want|, scale)), elementwise; NaN and infinities
    exactly where NumPy has them."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    special = ~np.isfinite(want)
    assert np.array_equal(got[special], want[special], equal_nan=True) and \
        np.all(np.isfinite(got[~special])), f"{what}: NaN or infinities in different places"
    magnitude = np.abs(want) if scale is None else np.maximum(np.abs(want), scale)
    with np.errstate(invalid="ignore"):
        tolerance = ulps * np.spacing(magnitude.astype(want.dtype))
        err = np.where(special, 0, np.abs(got.astype(np.float64) - want.astype(np.float64)))
    tolerance = np.where(special, 0, tolerance)
    worst = np.unravel_index(np.argmax(err - tolerance), err.shape)
    assert np.all(err <= tolerance), (
        f"{what}: {int(np.sum(err > tolerance))} entries beyond {ulps} ulps; worst at "
        f"{worst}: got {got[worst]!r}, want {want[worst]!r}")


def _adam_case(rng, dt):
    n = 4099
    g = rng.standard_normal(n).astype(dt)
    g[:4] = [0, np.finfo(dt).tiny / 4, np.nan, -np.finfo(dt).tiny / 2]
    c = {k: dt(v) for k, v in dict(b1=0.9, c1=1 - 0.9, b2=0.999, c2=1 - 0.999,
                                   d1=1 - 0.9 ** 3, d2=1 - 0.999 ** 3, lr=1e-3, eps=1e-8,
                                   tiny=np.finfo(dt).tiny).items()}
    values = dict(g=g, **c, p=rng.standard_normal(n).astype(dt),
                  m=(rng.standard_normal(n) * 1e-3).astype(dt),
                  v=(rng.random(n) * 1e-6).astype(dt))

    def reference(a):
        mi = a["b1"] * a["m"] + a["c1"] * a["g"]
        vi = a["b2"] * a["v"] + a["c2"] * (a["g"] * a["g"])
        mi = np.where(np.abs(mi) < a["tiny"], dt(0), mi)
        vi = np.where(vi < a["tiny"], dt(0), vi)
        p = a["p"] - a["lr"] * (mi / a["d1"]) / (np.sqrt(vi / a["d2"]) + a["eps"])
        return {"p": p, "m": mi, "v": vi}, {}

    return values, reference, 0


def _bias_relu_case(rng, dt):
    y = rng.standard_normal((33, 65)).astype(dt)
    y[0, :3] = [np.nan, -0.0, 0.0]
    values = dict(b=rng.standard_normal(65).astype(dt), y=y)

    def reference(a):
        s = a["y"] + a["b"]
        return {"y": np.where((s > 0) | np.isnan(s), s, dt(0))}, {}

    return values, reference, 0


def _relu_backward_case(rng, dt):
    out = np.maximum(rng.standard_normal((31, 17)), 0).astype(dt)
    values = dict(out=out, dout=rng.standard_normal((31, 17)).astype(dt),
                  dx=np.zeros((31, 17), dt))
    return values, lambda a: ({"dx": np.where(a["out"] > 0, a["dout"], dt(0))}, {}), 0


def _reparameterize_case(rng, dt):
    mu, logvar = (rng.standard_normal((16, 8)) * s for s in (1.0, 2.0))
    eps = rng.standard_normal((3, 16, 8))
    values = dict(mu=mu.astype(dt), logvar=logvar.astype(dt), eps=eps.astype(dt),
                  z=np.zeros((3, 16, 8), dt))

    def reference(a):
        std_eps = np.exp(dt(0.5) * a["logvar"]) * a["eps"]
        return {"z": a["mu"] + std_eps}, {"z": np.abs(a["mu"]) + np.abs(std_eps)}

    return values, reference, 8


def _bernoulli_case(rng, dt):
    l = (rng.standard_normal((8, 257)) * 6).astype(dt)
    l[0, :4] = [0, 40, -40, 1e-30]
    values = dict(x=(rng.random((8, 257)) < 0.3).astype(dt), l=l,
                  term=np.zeros((8, 257), dt), grad=np.zeros((8, 257), dt))

    def reference(a):
        x, l = a["x"], a["l"]
        sp = np.maximum(l, dt(0)) + np.log1p(np.exp(-np.abs(l)))
        grad = (dt(0.5) + dt(0.5) * np.tanh(dt(0.5) * l)) - x
        return ({"term": sp - x * l, "grad": grad},
                {"term": np.maximum(sp, np.abs(x * l)), "grad": np.ones_like(l)})

    return values, reference, 8


def _kl_case(rng, dt):
    values = dict(mu=rng.standard_normal((16, 8)).astype(dt),
                  logvar=(rng.standard_normal((16, 8)) * 3).astype(dt),
                  term=np.zeros((16, 8), dt), dlogvar=np.zeros((16, 8), dt))

    def reference(a):
        vm1 = np.expm1(a["logvar"])
        return ({"term": (vm1 - a["logvar"]) + a["mu"] * a["mu"], "dlogvar": dt(0.5) * vm1},
                {"term": np.abs(vm1) + np.abs(a["logvar"]) + a["mu"] * a["mu"]})

    return values, reference, 8


def _iwae_log_w(rng, dt, s=5, n=9):
    """(S, N) log-weights with an all -inf column and a column with some -inf."""
    log_w = (rng.standard_normal((s, n)) * 30 - 200).astype(dt)
    log_w[:, 0] = -np.inf
    log_w[:2, 1] = -np.inf
    return log_w


def _iwae_shifted_exp_case(rng, dt):
    log_w = _iwae_log_w(rng, dt)
    values = dict(log_w=log_w, peak=np.max(log_w, axis=0, keepdims=True),
                  e=np.zeros_like(log_w))

    def reference(a):
        shift = np.where(np.isfinite(a["peak"]), a["peak"], dt(0))
        return {"e": np.exp(a["log_w"] - shift)}, {}

    return values, reference, 8


def _iwae_log_total_case(rng, dt):
    total = (rng.random((1, 9)) * 4 + 1).astype(dt)
    total[0, 0] = 0
    peak = (rng.standard_normal((1, 9)) * 30 - 200).astype(dt)
    peak[0, 0] = -np.inf
    values = dict(total=total, peak=peak, lse=np.zeros_like(total))

    def reference(a):
        with np.errstate(divide="ignore"):
            log_total = np.log(a["total"])
        shift = np.where(np.isfinite(a["peak"]), a["peak"], dt(0))
        return ({"lse": log_total + shift},
                {"lse": np.where(np.isfinite(log_total), np.abs(log_total), 0) + np.abs(shift)})

    return values, reference, 8


def _iwae_normalize_case(rng, dt):
    e = rng.random((5, 9)).astype(dt)
    e[:, 0] = 0
    total = np.sum(e, axis=0, keepdims=True)
    values = dict(e=e, total=total, w=np.zeros_like(e))

    def reference(a):
        return {"w": a["e"] / np.where(a["total"] > 0, a["total"], dt(1))}, {}

    return values, reference, 0


def _iwae_prior_grad_case(rng, dt):
    values = dict(dz=rng.standard_normal((5, 9, 4)).astype(dt),
                  a=rng.random((5, 9, 1)).astype(dt),
                  z=rng.standard_normal((5, 9, 4)).astype(dt),
                  out=np.zeros((5, 9, 4), dt))
    return values, lambda a: ({"out": a["dz"] + a["a"] * a["z"]}, {}), 0


#: kernel -> (inputs and outputs as host arrays / scalars, NumPy reference, ulps)
KERNEL_CASES = {"adam": _adam_case, "bias_relu": _bias_relu_case,
                "relu_backward": _relu_backward_case, "reparameterize": _reparameterize_case,
                "bernoulli": _bernoulli_case, "kl": _kl_case,
                "iwae_shifted_exp": _iwae_shifted_exp_case,
                "iwae_log_total": _iwae_log_total_case,
                "iwae_normalize": _iwae_normalize_case,
                "iwae_prior_grad": _iwae_prior_grad_case}


def _names(spec):
    return [part.split()[-1] for part in spec.split(",") if part.strip()]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_each_fused_kernel_matches_numpy(name, dtype):
    if name not in KERNEL_CASES:
        pytest.fail(f"kernel {name!r} of _twins_cuda.SOURCES has no NumPy reference in "
                    f"tests/test_gpu.py (KERNEL_CASES): add one")
    dt = np.dtype(dtype).type
    values, reference, ulps = KERNEL_CASES[name](np.random.default_rng(0), dt)
    ins, outs = _names(SOURCES[name][0]), _names(SOURCES[name][1])
    assert sorted(values) == sorted(ins + outs), (
        f"SOURCES[{name!r}] now takes {ins} -> {outs}: update its case in KERNEL_CASES")
    want, scales = reference({k: np.copy(v) for k, v in values.items()})
    backend = get_backend("cupy", dtype)
    device = {k: (v if np.ndim(v) == 0 else backend.asarray(v)) for k, v in values.items()}
    kernel(name)(*[device[k] for k in ins + outs])
    for out in outs:
        got = backend.to_numpy(device[out])
        expected = np.asarray(want[out]).astype(dtype)
        if ulps == 0:
            bits = np.uint32 if dtype == "float32" else np.uint64
            same = np.array_equal(got.view(bits), expected.view(bits))
            assert same or np.array_equal(got, expected, equal_nan=True), (
                f"{name}.{out}: not bit-identical to NumPy "
                f"({int(np.sum(got != expected))} entries differ)")
        else:
            _ulps(got, expected, ulps, scales.get(out), what=f"{name}.{out}")


# ------------------------------------------------------------------------------------------
# The whole step against NumPy, and the fused kernels against CuPy's reference path


def run(backend_name, dtype, decoder="bernoulli", samples=1, steps=3, fast=True,
        batch=16, input_dim=784, hidden=(128, 64), latent_dim=8):
    """Loss terms, gradients and final parameters (host arrays) of ``steps`` Adam steps on
    fixed data and noise drawn on the host, identical for every backend."""
    backend = get_backend(backend_name, dtype)
    data = np.random.default_rng(0)
    with use_fast_paths(fast):
        model = VAE(input_dim, hidden, latent_dim, decoder=decoder, samples=samples,
                    backend=backend, seed=1)
        opt = Adam(model.parameters, lr=1e-3)
        losses, grads = [], []
        for _ in range(steps):
            x = data.random((batch, input_dim))
            if decoder == "bernoulli":
                x = (x < 0.4).astype(np.float64)
            eps = data.standard_normal((samples, batch, latent_dim))
            terms = model.loss(backend.asarray(x), eps=backend.asarray(eps), check_finite=False)
            model.backward()
            opt.step()
            losses.append([backend.to_float(t) for t in (terms.loss, terms.kl, terms.recon)])
            grads.append(backend.to_numpy(model.parameters.grad).astype(np.float64))
        params = backend.to_numpy(model.parameters.data).astype(np.float64)
    return np.array(losses), grads, params


def assert_close(a, b, rtol, grad_floor, param_atol):
    """Losses to ``rtol``; gradients to ``rtol`` with an absolute floor of ``grad_floor``
    times the largest gradient (entries that cancel to near zero carry only absolute
    round-off); parameters to ``rtol`` with ``param_atol`` (Adam's step lr m/sqrt(v) is at
    most lr, so gradient round-off moves a parameter by a tiny fraction of lr)."""
    (la, ga, pa), (lb, gb, pb) = a, b
    np.testing.assert_allclose(la, lb, rtol=rtol)
    for step, (x, y) in enumerate(zip(ga, gb)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=grad_floor * np.max(np.abs(y)),
                                   err_msg=f"gradient, step {step}")
    np.testing.assert_allclose(pa, pb, rtol=rtol, atol=param_atol)


@pytest.mark.parametrize("samples", (1, 3))
@pytest.mark.parametrize("decoder", DECODERS)
def test_cupy_float64_step_matches_numpy_float64(decoder, samples):
    assert_close(run("cupy", "float64", decoder, samples), run("numpy", "float64", decoder, samples),
                 rtol=1e-9, grad_floor=1e-12, param_atol=1e-10)


@pytest.mark.parametrize("decoder", DECODERS)
def test_cupy_float32_step_is_close_to_numpy_float64(decoder):
    assert_close(run("cupy", "float32", decoder), run("numpy", "float64", decoder),
                 rtol=1e-3, grad_floor=1e-4, param_atol=1e-5)


@pytest.mark.parametrize("samples", (1, 3))
@pytest.mark.parametrize("decoder", DECODERS)
def test_fused_kernels_match_the_cupy_reference(decoder, samples):
    assert_close(run("cupy", "float64", decoder, samples, fast=True),
                 run("cupy", "float64", decoder, samples, fast=False),
                 rtol=1e-10, grad_floor=1e-13, param_atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_on_the_gpu_is_bit_identical_to_numpy(dtype):
    """Adam's kernel uses only correctly rounded operations, compiled without FMA
    contraction: the same bits as NumPy's reference update, step after step, through the
    public optimizer (gradients set by hand)."""
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(10_007).astype(dtype) for _ in range(3)]
    state = {}
    for name, fast in (("cupy", True), ("numpy", False)):
        backend = get_backend(name, dtype)
        with use_fast_paths(fast):
            model = VAE(100, (50,), 2, backend=backend, seed=3)  # 10,504 parameters
            size = model.parameters.grad.shape[0]
            opt = Adam(model.parameters, lr=1e-3)
            for g in grads:
                model.parameters.grad[...] = backend.asarray(np.resize(g, size))
                opt.step()
        state[name] = [backend.to_numpy(model.parameters.data)] + [
            np.asarray(v) for _, v in sorted(opt.state_dict().items())]
    for a, b in zip(state["cupy"], state["numpy"]):
        assert np.array_equal(a, b)


# ------------------------------------------------------------------------------------------
# Random numbers


def test_one_reseeded_philox_generator_gives_the_bits_of_fresh_ones():
    """RNG keeps one cuRAND generator and re-seeds it per draw; the bits must be those of
    a new generator per draw (the design before), so runs and checkpoints are unchanged."""
    philox = cupy.cuda.curand.CURAND_RNG_PSEUDO_PHILOX4_32_10
    for dtype in DTYPES:
        backend = get_backend("cupy", dtype)
        rng = backend.rng(123)
        seq = np.random.SeedSequence(123)
        for call, (kind, shape) in enumerate([("normal", (7, 3)), ("uniform", (5,)),
                                              ("normal", (1, 32, 64)), ("normal", (3,)),
                                              ("uniform", (1000,)), ("normal", (2, 2))]):
            got = getattr(rng, kind)(shape)
            key = int(np.random.SeedSequence(seq.entropy, spawn_key=(call,))
                      .generate_state(1, np.uint64)[0])
            fresh = cupy.random.RandomState(key, method=philox)
            want = (fresh.standard_normal(shape, dtype=dtype) if kind == "normal"
                    else fresh.random_sample(shape, dtype=dtype))
            assert np.array_equal(cupy.asnumpy(got), cupy.asnumpy(want)), (dtype, call, kind)


# ------------------------------------------------------------------------------------------
# No host synchronisation inside a step

_SPIN = r"""
extern "C" __global__ void vae_np_spin(unsigned long long ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)); } while (now - start < ns);
}
"""


def _model_and_step(decoder="bernoulli", dtype="float32"):
    backend = get_backend("cupy", dtype)
    model = VAE(784, (256, 256), 16, decoder=decoder, backend=backend, seed=0)
    opt = Adam(model.parameters, lr=1e-3)
    rng = backend.rng(0)
    x = backend.asarray((np.random.default_rng(0).random((32, 784)) < 0.3).astype(np.float32))

    def step():
        model.loss(x, rng=rng, check_finite=False)
        model.backward()
        opt.step()

    for _ in range(2):  # compile the kernels, fill the memory pool, make the handles
        step()
    cupy.cuda.Device().synchronize()
    return backend, model, step


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decoder", DECODERS)
def test_step_does_not_synchronise_with_the_host(decoder, dtype, monkeypatch):
    """A kernel that spins for a second goes first on the stream; then three whole
    steps (noise drawn with cuRAND, matrix products with cuBLAS, the fused kernels, Adam)
    are queued. Any synchronisation or device-to-host copy inside them, in our code, CuPy,
    cuRAND or cuBLAS, would wait for the spinning kernel: the host must get through the
    steps long before it ends, and the stream must still be busy afterwards. The host
    transfer entry points of CuPy and of the backend must not even be called."""
    backend, model, step = _model_and_step(decoder, dtype)
    spin = cupy.RawKernel(_SPIN, "vae_np_spin")

    def forbidden(*args, **kwargs):
        raise AssertionError("host read inside a training step")

    monkeypatch.setattr(cupy, "asnumpy", forbidden)
    monkeypatch.setattr(type(backend), "to_numpy", forbidden)
    monkeypatch.setattr(type(backend), "to_float", forbidden)
    stream = cupy.cuda.get_current_stream()
    spin_seconds = 1.0
    spin((1,), (1,), (np.uint64(int(spin_seconds * 1e9)),))
    start = time.perf_counter()
    for _ in range(3):
        step()
    host_seconds = time.perf_counter() - start
    busy = not stream.done
    stream.synchronize()
    assert busy and host_seconds < spin_seconds / 2, (
        f"the host waited for the GPU inside a step (3 steps took {host_seconds:.2f} s on the "
        f"host behind a {spin_seconds:.0f} s kernel; stream still busy: {busy})")


def test_step_without_noise_draws_captures_into_a_cuda_graph():
    """The strongest check for what it covers: a stream capturing a CUDA graph refuses
    any synchronisation or device-to-host copy, so if loss (with given noise), backward
    and the Adam step capture, they contain none. (cuRAND refuses capture, hence the
    given noise; the spinning-kernel test above covers the draws.)"""
    backend, model, _ = _model_and_step()
    opt = Adam(model.parameters, lr=1e-3)
    x = backend.asarray((np.random.default_rng(1).random((32, 784)) < 0.3).astype(np.float32))
    eps = backend.asarray(np.random.default_rng(2).standard_normal((1, 32, 16)))
    stream = cupy.cuda.Stream(non_blocking=True)
    if not hasattr(stream, "begin_capture"):
        pytest.skip("this CuPy cannot capture CUDA graphs")
    with stream:
        for _ in range(2):  # warm up on this stream: handles, kernels, pool blocks
            model.loss(x, eps=eps, check_finite=False)
            model.backward()
            opt.step()
        stream.synchronize()
        stream.begin_capture(mode=cupy.cuda.runtime.streamCaptureModeRelaxed)
        try:
            model.loss(x, eps=eps, check_finite=False)
            model.backward()
            opt.step()
        finally:
            graph = stream.end_capture()
        graph.launch()
        stream.synchronize()


# ------------------------------------------------------------------------------------------
# Training on the GPU: resume bit for bit, the checkpoint on the CPU, memory given back


def _dataset():
    from helpers import synthetic_dataset

    return synthetic_dataset(96, 32)


def _trainer(out_dir, epochs, dtype="float32", **changes):
    from helpers import tiny_config
    from vae_np.train import Trainer

    config = tiny_config(hidden=(32,), latent_dim=4, batch_size=16, epochs=epochs,
                         eval_samples=8, eval_batch_size=16, backend="cupy", dtype=dtype,
                         **changes)
    return Trainer(config, _dataset(), out_dir, log=None, progress=False, pictures=False)


def _state(trainer):
    return ({k: np.asarray(v) for k, v in trainer.model.state_dict().items()},
            {k: np.asarray(v) for k, v in trainer.optimizer.state_dict().items()})


@pytest.mark.parametrize("dtype", DTYPES)
def test_resume_on_the_gpu_is_bit_for_bit(tmp_path, dtype):
    from vae_np.train import Trainer

    straight = _trainer(tmp_path / "straight", 3, dtype)
    straight.fit()
    first = _trainer(tmp_path / "resumed", 1, dtype)
    first.fit()
    resumed = Trainer.resume(tmp_path / "resumed", _dataset(), overrides={"epochs": 3},
                             log=None, progress=False, pictures=False)
    resumed.fit()
    (pa, oa), (pb, ob) = _state(straight), _state(resumed)
    assert pa.keys() == pb.keys() and oa.keys() == ob.keys()
    for name in pa:
        assert np.array_equal(pa[name], pb[name]), name
    for name in oa:
        assert np.array_equal(oa[name], ob[name]), name
    keys = ("train_loss", "train_kl", "train_recon", "test_loss", "test_kl", "test_recon")
    assert [[e[k] for k in keys] for e in straight.history] == \
        [[e[k] for k in keys] for e in resumed.history]


def test_a_gpu_checkpoint_loads_on_the_cpu(tmp_path):
    """The checkpoint holds host arrays: a NumPy model built from its config loads them
    bit for bit and computes the same loss (to float32 round-off) on the same batch."""
    from vae_np.checkpoint import load_checkpoint

    trainer = _trainer(tmp_path, 1, "float32")
    trainer.fit()
    arrays, meta = load_checkpoint(trainer.checkpoint_path)
    params = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("model/")}
    config = meta["config"]
    cpu = VAE(784, tuple(config["hidden"]), config["latent_dim"], decoder=config["decoder"],
              backend=get_backend("numpy", config["dtype"]), seed=99)
    cpu.load_state_dict(params)
    gpu_state = trainer.model.state_dict()
    for name, value in cpu.state_dict().items():
        assert np.array_equal(np.asarray(value), np.asarray(gpu_state[name])), name
    rng = np.random.default_rng(5)
    x = (rng.random((16, 784)) < 0.3).astype(np.float32)
    eps = rng.standard_normal((1, 16, config["latent_dim"])).astype(np.float32)
    gpu, host = trainer.backend, cpu.backend
    want = gpu.to_float(trainer.model.loss(gpu.asarray(x), eps=gpu.asarray(eps)).loss)
    got = host.to_float(cpu.loss(host.asarray(x), eps=host.asarray(eps)).loss)
    assert got == pytest.approx(want, rel=1e-4)


def test_training_gives_its_gpu_memory_back(tmp_path):
    """After a run and its trainer are gone, the memory pool holds no more than before:
    nothing of the run (data, model, optimizer, caches of per-batch terms) stays alive."""
    pool = cupy.get_default_memory_pool()
    _trainer(tmp_path / "warm", 1).fit()  # kernels, handles, one-time allocations
    gc.collect()
    before = pool.used_bytes()
    for run in range(2):
        trainer = _trainer(tmp_path / f"run{run}", 2)
        trainer.fit()
        assert pool.used_bytes() > before
        del trainer
        gc.collect()
        assert pool.used_bytes() <= before + (1 << 16), (
            f"run {run}: {pool.used_bytes() - before} bytes still in use after the trainer "
            f"is gone")
    pool.free_all_blocks()
    assert pool.total_bytes() <= before + (1 << 20)
