"""The learning material runs and says what the docs quote.

- examples/draw_graph.py draws a PNG whose every function name imports, from shapes recorded
  in a real training step, and those shapes are the ones docs/05-whole-model.md tabulates;
- examples/worked_example.py prints the numbers docs/05-whole-model.md quotes;
- examples/exercises/: each stub fails its check as given and passes with the library's own
  code; the breaks of its README are caught (or missed) as it says; the command line runs;
- examples/walkthrough.ipynb runs, every code cell in order.

Everything here takes seconds.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"


def load(path: Path, name: str):
    """Import a script as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def resolve(dotted: str):
    """The object ``vae_np.a.b.C.d`` names (longest importable module, then attributes)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def section(page: Path, heading: str) -> str:
    text = page.read_text(encoding="utf-8")
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


@pytest.fixture(scope="module")
def graph():
    return load(EXAMPLES / "draw_graph.py", "draw_graph")


@pytest.fixture(scope="module")
def shapes(graph):
    return graph.trace_shapes()


# --------------------------------------------------------------------------------------
# The graph


def test_graph_figure_is_a_png_naming_real_functions(graph, shapes, tmp_path):
    out = tmp_path / "graph.png"
    drawn = graph.draw(shapes, out)
    width, height = png_size(out)
    assert width > 1000 and height > 1000
    from PIL import Image

    with Image.open(out) as image:
        image.load()
        assert image.format == "PNG"
    names = set(drawn) | set(graph.FUNCTIONS)
    assert set(drawn) == set(graph.FUNCTIONS), "FUNCTIONS must list what the figure draws"
    for name in sorted(names):
        assert callable(resolve(name)), name
    # the committed figure is this drawing (same size) and the pages show it
    committed = DOCS / "images" / "vae_graph.png"
    assert png_size(committed) == (width, height)
    for page in ("05-whole-model.md", "README.md"):
        assert "images/vae_graph.png)" in (DOCS / page).read_text(encoding="utf-8"), page


def test_graph_shapes_come_from_the_model(shapes):
    S, N, d, c = shapes["S"], shapes["N"], shapes["d"], shapes["c"]
    assert (S, N, d, c) == (3, 32, 64, 784)
    assert shapes["h"] == (N, 2 * d) and shapes["mu"] == shapes["logvar"] == (N, d)
    assert shapes["eps"] == shapes["z"] == shapes["dL/dz"] == (S, N, d)
    assert shapes["z rows"] == shapes["dL/dz rows"] == (S * N, d)
    assert shapes["logits"] == shapes["targets"] == shapes["dL/dlogits in"] == (S * N, c)
    assert shapes["nll"] == (S * N,) and shapes["kl"] == (N,)
    assert shapes["dL/dmu"] == shapes["dL/dlogvar"] == shapes["dKL/dmu"] == (N, d)
    assert shapes["dL/dh"] == (N, 2 * d)


def test_shape_table_matches_a_real_backward_pass(shapes):
    table = section(DOCS / "05-whole-model.md", "The backward pass in shapes")
    rows = [line for line in table.splitlines() if re.match(r"\| \(\d\) \|", line)]
    last = [row.strip().strip("|").split("|")[-1].strip() for row in rows]

    def fmt(shape):
        return f"{shape[0]} × {shape[1]}" if len(shape) == 2 else str(tuple(shape))

    expected = [fmt(shapes[k]) for k in (
        "dL/dlogits in", "dL/dW decoder output", "dL/dz rows", "dL/dz", "dL/dmu", "dL/dmu",
        "dL/dh", "dL/dW encoder output")]
    assert last == expected


# --------------------------------------------------------------------------------------
# The worked example

NUMBER = re.compile(r"[-+]?\d+\.?\d*(?:e[-+]?\d+)?")


def run_worked_example() -> tuple[int, str]:
    module = load(EXAMPLES / "worked_example.py", "worked_example")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = module.main()
    return status, out.getvalue()


def same_text_and_numbers(quoted: str, fresh: str) -> list[str]:
    """Lines that differ in their words, or in a number by more than rounding in the last
    printed digit (8 decimals) allows; round-off-sized numbers (the |diff| column) only
    need to stay round-off-sized."""
    problems = []
    quoted_lines, fresh_lines = quoted.strip("\n").splitlines(), fresh.strip("\n").splitlines()
    if len(quoted_lines) != len(fresh_lines):
        return [f"{len(quoted_lines)} lines quoted, {len(fresh_lines)} printed"]
    for q, f in zip(quoted_lines, fresh_lines):
        if NUMBER.sub("#", q).split() != NUMBER.sub("#", f).split():
            problems.append(f"quoted: {q}\nprinted: {f}")
            continue
        for a, b in zip(NUMBER.findall(q), NUMBER.findall(f)):
            a, b = float(a), float(b)
            if abs(a - b) > 2e-8 + 1e-9 * abs(a) and not (abs(a) < 1e-7 and abs(b) < 1e-7):
                problems.append(f"{a} quoted, {b} printed, in: {f}")
    return problems


def test_worked_example_output_is_quoted_in_the_docs():
    status, printed = run_worked_example()
    assert status == 0, printed                # every chain-rule number agrees
    text = (DOCS / "05-whole-model.md").read_text(encoding="utf-8")
    quoted = re.search(r"<!-- worked-example-output: begin -->\n```text\n(.*?)\n```\n"
                       r"<!-- worked-example-output: end -->", text, re.S)
    assert quoted, "docs/05-whole-model.md lost the quoted output of examples/worked_example.py"
    problems = same_text_and_numbers(quoted[1], printed)
    assert not problems, "\n".join(problems)


def test_worked_example_checks_every_backward_number():
    module = load(EXAMPLES / "worked_example.py", "worked_example")
    values = module.forward()
    rows = module.backward(values)
    keys = {key for _, _, key, _ in rows}
    # every parameter, every intermediate node, and both paths into mu and logvar
    assert {"We0", "be0", "We1[mu]", "We1[lv]", "be1[mu]", "be1[lv]",
            "Wd0", "bd0", "Wd1", "bd1"} <= keys
    assert {"mu (z path)", "mu (KL path)", "lv (z path)", "lv (KL path)", "mu", "lv", "z",
            "l", "h1", "a1", "h2", "a2"} <= keys
    for name, _, key, value in rows:
        assert abs(value - module.central_difference(key)) < 1e-7, name
    # the comparison would see a wrong rule: drop the 1/2 of the z path
    wrong = values["sigma"] * module.EPS * module.central_difference("z")
    assert abs(wrong - module.central_difference("lv (z path)")) > 1e-2


def test_same_text_and_numbers_catches_drift():
    quoted = "  mu     = We1[mu] h1 + be1[mu]               0.70000000\n  |diff| 9.0e-11"
    assert same_text_and_numbers(quoted, quoted.replace("9.0e-11", "3.1e-11")) == []
    assert same_text_and_numbers(quoted, quoted.replace("0.70000000", "0.70000003"))
    assert same_text_and_numbers(quoted, quoted.replace("h1 +", "h1 -"))


# --------------------------------------------------------------------------------------
# The exercises


@pytest.fixture(scope="module")
def checker():
    sys.path.insert(0, str(EXAMPLES / "exercises"))
    try:
        yield load(EXAMPLES / "exercises" / "check.py", "exercises_check")
    finally:
        sys.path.remove(str(EXAMPLES / "exercises"))


@pytest.mark.parametrize("name", ["linear_backward", "sigmoid_backward", "bernoulli_nll_grad",
                                  "kl_grad", "reparameterize", "reparameterize_backward",
                                  "adam_step", "conv2d_backward", "maxpool2d_backward"])
def test_each_stub_fails_as_given_and_the_library_passes(checker, name):
    assert name in checker.EXERCISES
    stubs = checker.load_yours()
    given = checker.check(name, getattr(stubs, name))
    library = checker.check(name, checker.LIBRARY[name])
    assert library.passed, library.text
    if name == "reparameterize":               # the given forward, not an exercise
        assert given.passed, given.text
    else:
        assert not given.passed, given.text
        assert "NOT YET" in given.text
    # the solution is the library function the checker names
    solution = checker.WHERE[name][1]
    resolve(solution)
    assert (ROOT / checker.WHERE[name][0].split("#")[0]).is_file()


def test_the_checker_names_the_wrong_entries(checker):
    def linear_backward(x, W, b, dout):     # right, except one entry of dW
        dW = x.T @ dout
        dW[1, 2] += 0.5
        return dout @ W.T, dW, dout.sum(axis=0)

    result = checker.check("linear_backward", linear_backward)
    assert not result.passed
    assert "dL/dW: 1 of 15 entries wrong" in result.text
    assert re.search(r"\[1, 2\]  yours .* central difference", result.text)
    assert "dL/dx:" not in result.text and "dL/db:" not in result.text

    bad_shape = checker.check("kl_grad", lambda mu, logvar: (mu.T, logvar))
    assert not bad_shape.passed and "dmu has shape (4, 3), expected (3, 4)" in bad_shape.text
    crash = checker.check("adam_step", lambda *a, **k: 1 / 0)
    assert not crash.passed and "ZeroDivisionError" in crash.text


def test_the_breaks_are_caught_or_missed_as_the_readme_says(checker):
    def no_half(dz, logvar, eps):
        return dz.sum(axis=0), (dz * eps).sum(axis=0) * np.exp(0.5 * logvar)

    def no_one_minus_y(y, dout):
        return dout * y

    def exp_forward(mu, logvar, eps):
        return mu + np.exp(logvar) * eps

    def exp_backward(dz, logvar, eps):
        return dz.sum(axis=0), (dz * eps).sum(axis=0) * np.exp(logvar)

    def rows(text):
        return {line.split()[0]: line.split() for line in text.splitlines()
                if re.search(r"\s(yes|NO)$", line)}

    half = checker.check("reparameterize_backward", no_half)
    assert rows(half.text)["mu"][-1] == "yes" and rows(half.text)["logvar"][-1] == "NO"
    assert float(rows(half.text)["logvar"][-4]) == pytest.approx(1 / 3, abs=1e-3)
    sig = checker.check("sigmoid_backward", no_one_minus_y)
    assert not sig.passed and float(rows(sig.text)["x"][-4]) > 0.1
    # exp(logvar) with its exact derivative: the gradient check passes, the forward fails
    consistent = checker.check("reparameterize_backward", exp_backward, forward=exp_forward)
    assert consistent.passed, consistent.text
    assert not checker.check("reparameterize", exp_forward).passed
    assert not checker.check("reparameterize_backward", exp_backward).passed


def test_plugged_in_answers_reach_the_training_run(checker):
    """The library's answers, plugged in, give the library's run to the last bit; a broken
    one changes it (so the plug reaches the code that trains)."""
    kwargs = dict(epochs=1, train_size=100, test_size=20)
    library = checker.train({}, **kwargs)
    assert checker.train(dict(checker.LIBRARY), **kwargs) == library
    broken = checker.train({"reparameterize_backward": lambda dz, lv, eps: (
        dz.sum(axis=0), (dz * eps).sum(axis=0) * np.exp(0.5 * lv))}, **kwargs)
    assert broken["history"] != library["history"]
    # nothing stays patched
    from vae_np import objectives

    assert objectives.reparameterize_backward is checker.LIBRARY["reparameterize_backward"]


def run_checker(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("MPLBACKEND", "Agg")
    return subprocess.run([sys.executable, str(EXAMPLES / "exercises" / "check.py"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_check_cli_runs_the_checks_and_a_short_training_run(tmp_path):
    as_given = run_checker(cwd=tmp_path)
    assert as_given.returncode == 1, as_given.stderr
    assert "1 of 9 exercises pass" in as_given.stdout       # only the given forward
    library = run_checker("--library", "kl_grad", "reparameterize_backward", "--train",
                          "--epochs", "1", "--train-size", "100", "--test-size", "20", cwd=tmp_path)
    assert library.returncode == 0, library.stdout + library.stderr
    assert "2 of 2 exercises pass" in library.stdout
    table = library.stdout[library.stdout.index("training run:"):]
    for line in table.splitlines()[2:-1]:
        left, right = line.split()[-2:]
        assert left == right, line                           # the library's answers: same run
    unknown = run_checker("no_such_exercise", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown exercise" in unknown.stderr


# --------------------------------------------------------------------------------------
# The notebook


@pytest.mark.slow
def test_walkthrough_notebook_runs(monkeypatch):
    """Every code cell of examples/walkthrough.ipynb, in order, in one namespace (what
    "Run all" does), with matplotlib drawing off screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(EXAMPLES)                  # as if opened from examples/
    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    notebook = json.loads((EXAMPLES / "walkthrough.ipynb").read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 8
    namespace: dict = {"__name__": "__main__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for cell in cells:
            assert not cell.get("outputs"), "commit the notebook without outputs"
            source = "".join(cell["source"])
            assert not re.search(r"^\s*[%!]", source, re.M), "no IPython magics: cells are exec'd"
            exec(compile(source, f"walkthrough.ipynb:{cell['id']}", "exec"), namespace)
    plt.close("all")
    history = namespace["history"]
    assert history[-1] < history[0] - 100        # training lowered the test loss
    assert namespace["report"].passed            # the trained model's gradients check
    assert "K = 100" in out.getvalue()
    for cell in notebook["cells"]:               # its links point at files that exist
        if cell["cell_type"] == "markdown":
            for target in re.findall(r"\]\(([^)#]+)", "".join(cell["source"])):
                assert (EXAMPLES / target).exists(), target
