"""The package's structure, read from its source: imports run one way and no module touches
another object's private state.

Layers, ground floor up (a module may import only from strictly lower layers):

    0  _numba_kernels, _cuda_kernels,     compiled kernels and the fast twins: leaves,
       _twins_cpu, _twins_cuda, _version  importing nothing (_version: the package's version)
    1  backend, ops, validation           the array library (which loads the kernels),
                                          stable primitives, the input checks
    2  layers, losses, parameters         the math (each op's reference; twins on floor 0)
    3  likelihoods, optim, conv           conv: image layers on layers.Layer
    4  objectives, networks               the ELBO and the importance-weighted bound;
                                          Sequential, the convolutional encoder/decoder
    5  model
    6  gradcheck, distributed             checks any of the above; data parallelism over MPI
    7  everything else (training, self-check, saving: a model's files; interop: ONNX,
                                          safetensors, PyTorch; cli_args: the argparse types
                                          and flags both commands use, no trainer, no MPI)
    8  train_cli                          vae-np train (examples/train_mnist.py), on train
    9  cli                                the vae-np command, built on the floors below
   10  __main__                           python -m vae_np, which runs cli

``data``, ``checkpoint`` and ``plotting`` sit apart: they import nothing from the package
but the backend, the input checks (``validation``) and each other's public names. A module not named here is on the top
floor; a name here that no longer exists fails the test, so the map follows renames.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vae_np"

LAYERS = {
    "_numba_kernels": 0, "_cuda_kernels": 0, "_twins_cpu": 0, "_twins_cuda": 0, "_version": 0,
    "backend": 1, "ops": 1, "validation": 1,
    "layers": 2, "losses": 2, "parameters": 2,
    "likelihoods": 3, "optim": 3, "conv": 3,
    "objectives": 4, "networks": 4,
    "model": 5,
    "gradcheck": 6, "distributed": 6,
    "saving": 7, "interop": 7, "cli_args": 7,
    "train_cli": 8, "cli": 9, "__main__": 10,
}
TOP = 7
# Modules that import nothing from the package but these and each other.
APART = ("data", "checkpoint", "plotting")
APART_MAY_IMPORT = ("backend", "validation")


def module_name(path: Path) -> str:
    """'vae_np/train/loop.py' -> 'train.loop'; a package's __init__ is the package."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def top_level(name: str) -> str:
    return name.split(".")[0]


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))
            if module_name(p) != ""}


def imports_of(path: Path) -> set[str]:
    """Package modules that ``path`` imports, anywhere in the file (lazy imports in
    functions included), as dotted names relative to the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module_name(path).split(".")
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("vae_np."):
                    found.add(alias.name[len("vae_np."):])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("vae_np"):
                    base = node.module[len("vae_np."):] if node.module != "vae_np" else ""
                else:
                    continue
            else:
                anchor = here if is_package else here[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            if base:
                found.add(base)
            # "from .pkg import sub" may name a submodule
            for alias in node.names:
                candidate = f"{base}.{alias.name}" if base else alias.name
                if (PACKAGE / Path(*candidate.split("."))).with_suffix(".py").exists() or \
                        (PACKAGE / Path(*candidate.split(".")) / "__init__.py").exists():
                    found.add(candidate)
    return found


def layer_of(name: str) -> int:
    return LAYERS.get(top_level(name), TOP)


MODULES = package_modules()


def test_the_layer_map_names_existing_modules():
    """A renamed module must be renamed here too, or it silently lands on the top floor."""
    present = {top_level(n) for n in MODULES}
    assert set(LAYERS) <= present and set(APART) <= present


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_one_way(name):
    mine = top_level(name)
    for other in imports_of(MODULES[name]):
        theirs = top_level(other)
        if theirs == mine:
            continue                       # inside one package (train.*, data.*)
        if mine in APART:
            assert theirs in APART_MAY_IMPORT or theirs in APART, \
                f"{name} imports {other}: data, checkpoint and plotting import only the " \
                f"backend, validation and each other"
            continue
        if theirs in APART:
            assert layer_of(name) >= TOP, f"{name} (layer {layer_of(name)}) imports {other}"
            continue
        assert layer_of(other) < layer_of(name), (
            f"{name} (layer {layer_of(name)}) imports {other} (layer {layer_of(other)}): "
            f"imports must point down (see this file's docstring)")


def test_leaves_import_nothing():
    for leaf in ("_numba_kernels", "_cuda_kernels", "_version", "validation"):
        assert imports_of(MODULES[leaf]) == set(), leaf


def test_no_import_cycles():
    graph = {name: {o for o in imports_of(path) if o in MODULES and o != name}
             for name, path in MODULES.items()}
    # a package's __init__ re-exporting its own submodules is not a cycle of concerns
    for name in graph:
        graph[name] = {o for o in graph[name] if not o.startswith(name + ".")}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, node, nxt]))
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def private_accesses(path: Path) -> list[str]:
    """``obj._name`` where ``obj`` is not ``self``/``cls`` (nor a class's own name inside
    it), and ``from x import _name`` across modules: reaching into another's private state."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    class_names = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not (node.attr.startswith("__") and node.attr.endswith("__")):
            owner = node.value
            if isinstance(owner, ast.Name) and (owner.id in ("self", "cls")
                                                or owner.id in class_names):
                continue
            if isinstance(owner, ast.Name) and (owner.id, node.attr) == ("os", "_exit"):
                continue  # public despite its name: exit now, without cleanup handlers
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module is not None or \
                isinstance(node, ast.ImportFrom) and node.level:
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    # a private module is fine to import (the kernels); its private names not
                    target = (node.module or "") + "." + alias.name
                    is_module = (PACKAGE / Path(*target.strip(".").split("."))).with_suffix(
                        ".py").exists() or (PACKAGE / (alias.name + ".py")).exists()
                    if not is_module:
                        found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
    return found


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_touches_another_objects_private_state(name):
    assert private_accesses(MODULES[name]) == [], name


def test_the_private_access_check_sees_a_violation(tmp_path):
    """Self-test: the checker flags the pattern this issue removed (a module writing a
    model's private cache) and passes its owner's own use."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f(model):\n    model._cache = None\n\n"
                   "class A:\n    def g(self):\n        self._x = 1\n", encoding="utf-8")
    assert private_accesses(bad) == ["line 2: ._cache"]
