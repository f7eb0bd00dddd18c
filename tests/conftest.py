"""Shared fixtures for the vae_np test suite.

- Backend fixtures: ``backend_name`` runs a test once per CPU backend (NumPy and
  array-api-strict); ``backend`` is that backend in float64 (gradient checks need float64).
- The ``gpu`` marker: tests marked ``@pytest.mark.gpu`` are skipped unless CuPy can see a GPU.
- Hypothesis profiles: ``ci`` (the default) is derandomised and has no deadline, so a CI run
  is reproducible and not flaky on a slow machine; ``dev`` explores new random examples.
  Pick one with ``HYPOTHESIS_PROFILE=dev``.
- ``sigint``: SIGINT's disposition for one test, whatever the suite inherited (a suite
  started in the background with ``&`` inherits SIG_IGN); Python's default unless the test
  asks for another by indirect parametrisation.
- ``repository_untouched`` (session, autouse): the run fails if a test created, changed or
  deleted a file in the repository tree; tests write under their own tmp_path only. And
  ``no_user_mnist`` (session, autouse): MNIST's default folder is an empty temporary one.
- ``VAE_NP_BLAS`` is removed from the environment: the suite checks the default, NumPy's
  own BLAS, whose products the to-the-bit tests assume; tests/test_blas.py switches MKL
  on where it tests it.
- ``record_check``: gradient-check tests log their relative errors under a family name; the
  worst error per family is printed at the end of the run (the table the issue's closing
  note asks for). Deliberately wrong gradients are logged separately, to show the margin.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

os.environ.pop("VAE_NP_BLAS", None)     # before vae_np loads its CPU ops (see above)

try:
    import vae_np  # noqa: F401
except ImportError:  # a source checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_np.backend import cuda_available, get_backend, use_fast_paths

settings.register_profile(
    "ci", deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CPU_BACKENDS = ("numpy", "array_api_strict")


# ------------------------------------------------------------------------------------------
# Backends


@pytest.fixture(params=CPU_BACKENDS)
def backend_name(request) -> str:
    """Each CPU backend in turn."""
    return request.param


@pytest.fixture
def backend(backend_name):
    """The backend of ``backend_name`` in float64."""
    return get_backend(backend_name, "float64")


@pytest.fixture
def np64():
    return get_backend("numpy", "float64")


@pytest.fixture
def strict64():
    return get_backend("array_api_strict", "float64")


# ------------------------------------------------------------------------------------------
# Fast paths: on NumPy each op runs its fused variant unless switched off with
# vae_np.backend.use_fast_paths(False). Tests that take ``code_path`` run on both.


@pytest.fixture(params=["fast", "reference"])
def code_path(request):
    """"fast": what a user gets on NumPy (each op's fused variant); "reference": the
    readable reference code of every op, with the fast paths switched off."""
    if request.param == "fast":
        yield "fast"
    else:
        with use_fast_paths(False):
            yield "reference"


@pytest.fixture
def reference_path():
    """Run the test on the readable reference code (fast paths off)."""
    with use_fast_paths(False):
        yield


# ------------------------------------------------------------------------------------------
# Files outside the tests' temporary folders: the repository's, the user's MNIST

REPO = Path(__file__).resolve().parents[1]
# What a run may leave in the tree: bytecode and numba's compiled kernels (__pycache__/,
# *.nbi and *.nbc beside the module), pytest's and Hypothesis's caches, git, and what an
# install made before the run (*.egg-info/, the CI's virtual environment).
UNWATCHED_DIRS = {".git", "__pycache__", ".pytest_cache", ".hypothesis", ".ci-venv", ".venv"}


def repository_files() -> dict[str, tuple[int, int]]:
    """Path relative to the repository -> (size, mtime in ns) of every file in its tree,
    tracked or not, outside UNWATCHED_DIRS and *.egg-info/."""
    files = {}
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in UNWATCHED_DIRS and not d.endswith(".egg-info")]
        for name in names:
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:  # removed between the listing and the stat
                continue
            files[os.path.relpath(path, REPO)] = (st.st_size, st.st_mtime_ns)
    return files


@pytest.fixture(scope="session", autouse=True)
def repository_untouched():
    """Fail the run if any test created, changed or deleted a file in the repository tree
    (the default ``--out results`` of a command run from the repository root, above all:
    the quick start fills that folder). Every test writes under its tmp_path."""
    before = repository_files()
    yield
    after = repository_files()
    touched = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    if touched:
        more = len(touched) - 20
        shown = ", ".join(touched[:20]) + (f" and {more} more" if more > 0 else "")
        pytest.fail(f"the tests created, changed or deleted {len(touched)} file(s) in the "
                    f"repository {REPO} (tests must write under their tmp_path only): {shown}",
                    pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def no_user_mnist(tmp_path_factory):
    """MNIST's default folder (``$VAE_NP_DATA``, vae_np.data.default_data_dir) is an empty
    temporary one for the whole run, child processes included: a test neither reads the
    user's ~/.cache/vae_np/mnist (its result would depend on the machine) nor writes there."""
    saved = os.environ.get("VAE_NP_DATA")
    os.environ["VAE_NP_DATA"] = str(tmp_path_factory.mktemp("no-mnist-here"))
    yield
    if saved is None:
        del os.environ["VAE_NP_DATA"]
    else:
        os.environ["VAE_NP_DATA"] = saved


# ------------------------------------------------------------------------------------------
# SIGINT


@pytest.fixture
def sigint(request):
    """SIGINT's handler for the test: ``request.param`` if parametrised indirectly, else
    Python's ``default_int_handler`` (Ctrl-C raises KeyboardInterrupt). A test that sends
    SIGINT, to itself or to a child (a child inherits an ignored SIGINT), needs one known
    disposition: the suite inherits SIG_IGN when started in the background (``pytest &`` in
    a script). The inherited handler is put back afterwards."""
    inherited = signal.getsignal(signal.SIGINT)
    handler = getattr(request, "param", signal.default_int_handler)
    signal.signal(signal.SIGINT, handler)
    yield handler
    if inherited is not None:  # None: installed outside Python, which cannot be put back
        signal.signal(signal.SIGINT, inherited)


# ------------------------------------------------------------------------------------------
# The gpu marker


_CUDA = None


def _cuda() -> bool:
    global _CUDA
    if _CUDA is None:
        _CUDA = cuda_available()
    return _CUDA


# The fast loop (pytest -m "not slow") keeps one instance of each check and leaves these
# repeats of it to the full suite: the convolution's backward on array-api-strict (NumPy
# checks both code paths), the conv VAE's gradient check on 3-channel images and on the
# reference path (1-channel images on the fast path check every decoder and variant; each
# reference layer has its own checks in test_conv.py), the conv networks' gradients on
# array-api-strict. The full suite runs them all. Test -> the id fragments that mark one.
SLOW_REPEATS = {
    "tests/test_conv.py::test_conv_backward": ("[array_api_strict-",),
    "tests/test_conv_model.py::test_check_vae_passes_on_the_conv_vae": ("-3-", "[reference-"),
    "tests/test_networks.py::test_encoder_gradients": ("[array_api_strict-",),
    "tests/test_networks.py::test_decoder_gradients": ("[array_api_strict-",),
}


def pytest_collection_modifyitems(config, items):
    for item in items:  # before -m deselects: see SLOW_REPEATS
        fragments = SLOW_REPEATS.get(item.nodeid.split("[", 1)[0], ())
        if any(fragment in item.nodeid for fragment in fragments):
            item.add_marker(pytest.mark.slow)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and not _cuda():
        skip = pytest.mark.skip(reason="needs CuPy and a usable NVIDIA GPU")
        for item in gpu_items:
            item.add_marker(skip)


# ------------------------------------------------------------------------------------------
# Worst relative errors per family of checks

_CHECKS: dict[str, list[float]] = defaultdict(list)
_WRONG: dict[str, list[float]] = defaultdict(list)


@pytest.fixture
def record_check():
    """``record_check(family, rel_error, wrong=False)``: log one check's relative error.

    ``wrong=True`` marks a deliberately wrong gradient (its error must be large).
    """

    def record(family: str, rel_error: float, wrong: bool = False) -> None:
        (_WRONG if wrong else _CHECKS)[family].append(float(rel_error))

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _CHECKS and not _WRONG:
        return
    write = terminalreporter.write_line
    terminalreporter.section("gradient checks: worst relative errors (tolerance 1e-06)")
    write(f"{'family':<44} {'checks':>6} {'worst rel. error':>17}")
    for family in sorted(_CHECKS):
        errors = _CHECKS[family]
        write(f"{family:<44} {len(errors):>6} {max(errors):>17.2e}")
    if _WRONG:
        write("")
        write(f"{'deliberately wrong gradient':<44} {'checks':>6} {'smallest error':>17}")
        for family in sorted(_WRONG):
            errors = _WRONG[family]
            write(f"{family:<44} {len(errors):>6} {min(errors):>17.2e}")
