"""The documentation stays true to the code.

docs/*.md (and the top-level README.md and examples/exercises/README.md) name functions as
`vae_np.module.name` and tests as `tests/file.py::test_name`. This file checks that

- every such code reference resolves (import the longest module prefix, getattr the rest);
- every test reference names a test function (or ``Class::method``) that exists in that file,
  found by parsing it with ``ast`` (nothing is imported or run);
- every relative link and ``#anchor`` in docs/ points at a file and heading that exist, and every
  path in backticks (``examples/...py``, ``docs/...``) exists;
- every ``>>>`` example in docs/ still produces the output shown (doctest);
- the sections the library's docstrings cite ("docs/03-layers.md, section ...") exist;
- what the chapters say about the code's shape still holds (the lines of Adam's reference);
- GitHub math is well formed: ``$`` delimiters pair up on each line, math blocks are closed.

The checker is tested too: fed a fake page with bogus names, it must report each of them.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
READING_PATH = ["README.md", "01-objective.md", "02-reparameterization.md", "03-layers.md",
                "04-losses.md", "05-whole-model.md", "06-adam.md", "07-likelihood.md",
                "08-gradient-checking.md", "09-iwae.md", "10-convolution.md", "derivations.md"]

CODE_REF = re.compile(r"`(vae_np(?:\.[A-Za-z_]\w*)+)")
TEST_REF = re.compile(r"`(tests/[\w/.-]+\.py)((?:::[A-Za-z_]\w*)+)(?:\[[^\]`]*\])?`")
PATH_REF = re.compile(r"`((?:examples|docs|tests|vae_np|benchmarks)/[\w/.-]+\.(?:py|md|png|txt))`")
LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def doc_files() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


# Pages outside docs/ whose every reference, link and path is checked like a chapter's.
LEARNING_PAGES = [ROOT / "examples" / "exercises" / "README.md"]


def pages() -> list[Path]:
    """Every markdown page whose references are checked: docs/, the learning pages and the
    top-level README."""
    readme = ROOT / "README.md"
    return doc_files() + [p for p in LEARNING_PAGES if p.exists()] \
        + ([readme] if readme.exists() else [])


# --------------------------------------------------------------------------------------
# The checker


def resolve_code_ref(ref: str):
    """Return the object ``vae_np.a.b.C.d`` names; LookupError naming what is missing."""
    parts = ref.split(".")
    module, attrs = None, []
    for i in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        attrs = parts[i:]
        break
    if module is None:
        raise LookupError(f"{ref}: no importable module")
    obj = module
    for depth, attr in enumerate(attrs):
        if not hasattr(obj, attr):
            owner = ".".join(parts[:len(parts) - len(attrs) + depth])
            raise LookupError(f"{ref}: {owner} has no attribute {attr!r}")
        obj = getattr(obj, attr)
    return obj


@lru_cache(maxsize=None)
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def resolve_test_ref(path: str, names: list[str], root: Path = ROOT) -> None:
    """Check that ``path::names[0]::names[1]...`` is a test function (or class) in the file.
    Raises LookupError saying what is missing."""
    file = root / path
    if not file.is_file():
        raise LookupError(f"{path}: no such file")
    scope = _parse(file).body
    for depth, name in enumerate(names):
        found = next((node for node in scope
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and node.name == name), None)
        if found is None:
            where = "::".join([path, *names[:depth]])
            raise LookupError(f"{path}::{'::'.join(names)}: {where} defines no {name!r}")
        last = depth == len(names) - 1
        if last and not isinstance(found, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                and not (isinstance(found, ast.ClassDef) and name.startswith("Test")):
            raise LookupError(f"{path}::{'::'.join(names)}: {name!r} is not a test")
        if last and not name.startswith(("test", "Test")):
            raise LookupError(f"{path}::{'::'.join(names)}: {name!r} is not collected by "
                              f"pytest (name does not start with 'test')")
        if not last:
            if not isinstance(found, ast.ClassDef):
                raise LookupError(f"{path}::{'::'.join(names)}: {name!r} is not a class")
            scope = found.body


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading).strip().lower()
    text = "".join(ch for ch in text
                   if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in strip_code(path.read_text(encoding="utf-8")).splitlines():
        match = HEADING.match(line)
        if match:
            base = github_anchor(match[2])
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def strip_code(text: str) -> str:
    """Blank out fenced code blocks (keeping line numbers), so headings and links inside
    code are ignored. ```math blocks count as code here."""
    out, fence = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            out.append("")
        elif fence is not None and stripped.startswith(fence):
            fence = None
            out.append("")
        else:
            out.append("" if fence else line)
    return "\n".join(out)


def check_markdown(text: str, page: Path | None = None, root: Path = ROOT) -> list[str]:
    """Every problem in one markdown text: unresolved code and test references, and (when
    ``page`` is given) broken relative links, anchors and paths. Returns readable strings."""
    where = page.relative_to(root) if page is not None and page.is_relative_to(root) else "<text>"
    problems = []
    for ref in sorted(set(CODE_REF.findall(text))):
        try:
            resolve_code_ref(ref)
        except LookupError as exc:
            problems.append(f"{where}: `{ref}`: {exc}")
    for path, chain in sorted(set(TEST_REF.findall(text))):
        try:
            resolve_test_ref(path, chain.split("::")[1:], root)
        except LookupError as exc:
            problems.append(f"{where}: `{path}{chain}`: {exc}")
    if page is None:
        return problems
    for path in sorted(set(PATH_REF.findall(strip_code(text)))):
        if not (root / path).exists():
            problems.append(f"{where}: `{path}`: no such file")
    for link, image in LINK.findall(strip_code(text)):
        target = link or image
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        file = (page.parent / file_part).resolve() if file_part else page
        if not file.exists():
            problems.append(f"{where}: link {target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"{where}: link {target}: no heading with anchor #{anchor} "
                            f"in {file.name}")
    return problems


def math_problems(text: str, where: str) -> list[str]:
    """Unbalanced inline $ on a line, or an unclosed ```math block."""
    problems = []
    stripped = strip_code(text).splitlines()
    for number, line in enumerate(stripped, start=1):
        line = re.sub(r"`[^`]*`", "", line)             # inline code may hold a literal $
        if line.replace(r"\$", "").count("$") % 2:
            problems.append(f"{where}:{number}: unbalanced $ in: {line.strip()[:80]}")
    for number, line in enumerate(text.splitlines(), start=1):
        if re.search(r"[\x00-\x09\x0b-\x1f\x7f]", line):  # e.g. "\t" of "\tfrac" lost to
            problems.append(f"{where}:{number}: control character")  # a non-raw string
    fences = [line.strip() for line in text.splitlines() if line.strip().startswith("```")]
    if len(fences) % 2:
        problems.append(f"{where}: odd number of ``` fences (a block is not closed)")
    return problems


# --------------------------------------------------------------------------------------
# The docs


def test_reading_path_exists_and_is_linked_from_the_index():
    missing = [name for name in READING_PATH if not (DOCS / name).is_file()]
    assert not missing, f"docs missing: {missing}"
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    for name in READING_PATH[1:]:
        assert f"]({name})" in index, f"docs/README.md does not link {name}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_reference_link_and_path_resolves(page):
    problems = check_markdown(page.read_text(encoding="utf-8"), page)
    if page == ROOT / "README.md":  # the top-level README: code and test names only
        problems = [p for p in problems if "`vae_np." in p or "`tests/" in p]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", doc_files() + [p for p in LEARNING_PAGES if p.exists()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_math_is_well_formed(page):
    problems = math_problems(page.read_text(encoding="utf-8"), page.name)
    assert not problems, "\n".join(problems)


def test_chapters_name_code_and_tests():
    """Every numbered chapter names at least one function and one test in each section that
    has a display formula (the issue: every formula names its function and its test)."""
    problems = []
    for page in sorted(DOCS.glob("[0-9][0-9]-*.md")):
        text = page.read_text(encoding="utf-8")
        sections = re.split(r"^## ", text, flags=re.M)[1:]
        for section in sections:
            title = section.splitlines()[0]
            if "```math" not in section:
                continue
            if not CODE_REF.search(section):
                problems.append(f"{page.name} / {title}: no `vae_np.` reference")
            if not TEST_REF.search(section):
                problems.append(f"{page.name} / {title}: no `tests/...::test_` reference")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", [p for p in doc_files()
                                  if re.search(r"^\s*>>> ", p.read_text(encoding="utf-8"), re.M)],
                         ids=lambda p: p.name)
def test_doctests_in_docs(page):
    result = doctest.testfile(str(page), module_relative=False, verbose=False,
                              optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} doctest(s) in {page.name} failed (see output)"


def test_sections_cited_by_the_library_exist():
    """Docstrings say e.g. 'docs/03-layers.md, section "Linear"': those headings must exist."""
    cite = re.compile(r'docs/([\w.-]+\.md),\s*(?:section\s+)?"([^"]+)"')
    problems, cited = [], 0
    for source in sorted((ROOT / "vae_np").glob("*.py")):
        text = " ".join(source.read_text(encoding="utf-8").split())  # join wrapped lines
        for doc, section in cite.findall(text):
            cited += 1
            page = DOCS / doc
            if not page.is_file():
                problems.append(f"{source.name}: cites docs/{doc}, which does not exist")
            elif github_anchor(section) not in anchors(page):
                problems.append(f"{source.name}: cites section {section!r} of docs/{doc}, "
                                f"which has no such heading")
    assert not problems, "\n".join(problems)
    assert cited > 0


NUMBER_WORDS = {"three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9}


def test_adam_chapter_counts_the_lines_of_the_reference_update():
    """docs/06 says how many array expressions `Adam._update_reference` is; count them
    (statements that compute, not the local aliases xp = ..., g = ...)."""
    import inspect
    import textwrap

    from vae_np.optim import Adam

    function = ast.parse(textwrap.dedent(inspect.getsource(Adam._update_reference))).body[0]
    body = [s for s in function.body
            if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    computed = [s for s in body
                if not (isinstance(s, ast.Assign) and isinstance(s.value, (ast.Attribute, ast.Name)))]
    text = " ".join((DOCS / "06-adam.md").read_text(encoding="utf-8").split())
    said = re.search(r"`vae_np\.optim\.Adam\._update_reference` writes the algorithm one array "
                     r"expression per line, (\w+) lines", text)
    assert said, "docs/06-adam.md no longer counts the lines of Adam._update_reference"
    assert NUMBER_WORDS[said[1]] == len(computed), (said[1], len(computed))


# --------------------------------------------------------------------------------------
# The checker catches what it should


def test_checker_resolves_real_names():
    text = ("`vae_np.losses.kl_standard_normal` and `vae_np.model.VAE.backward` and "
            "`vae_np.gradcheck` and `tests/test_docs.py::test_checker_resolves_real_names` "
            "and `tests/test_docs.py::test_doctests_in_docs[04-losses.md]`")
    assert check_markdown(text) == []


def test_checker_catches_bogus_names():
    text = """
    The KL is `vae_np.losses.kl_to_nowhere`; the module `vae_np.nonexistent.thing` is gone;
    `vae_np.model.VAE.backwards` has a typo. Checked by `tests/test_losses.py::test_bogus_name`,
    `tests/test_missing_file.py::test_anything` and
    `tests/test_docs.py::NoSuchClass::test_method`.
    """
    problems = check_markdown(text)
    for bogus in ("vae_np.losses.kl_to_nowhere", "vae_np.nonexistent.thing",
                  "vae_np.model.VAE.backwards", "tests/test_losses.py::test_bogus_name",
                  "tests/test_missing_file.py::test_anything",
                  "tests/test_docs.py::NoSuchClass::test_method"):
        assert any(f"`{bogus}`" in problem for problem in problems), (bogus, problems)
    assert len(problems) == 6
    assert any("has no attribute 'kl_to_nowhere'" in p for p in problems)
    assert any("no such file" in p for p in problems)


def test_checker_handles_test_classes_and_non_tests(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_fake.py").write_text(
        "class TestThing:\n"
        "    def test_method(self):\n        pass\n\n"
        "def helper():\n    pass\n\n"
        "def test_function():\n    pass\n", encoding="utf-8")
    good = "`tests/test_fake.py::TestThing::test_method` `tests/test_fake.py::test_function`"
    assert check_markdown(good, root=tmp_path) == []
    bad = ("`tests/test_fake.py::TestThing::test_gone` `tests/test_fake.py::helper` "
           "`tests/test_fake.py::test_method`")
    problems = check_markdown(bad, root=tmp_path)
    assert len(problems) == 3, problems


def test_checker_catches_broken_links_anchors_and_paths(tmp_path):
    (tmp_path / "docs").mkdir()
    target = tmp_path / "docs" / "a.md"
    target.write_text("# Title\n\n## The MLP: the chain\n\n## `exp(0.5 ** logvar)`\n",
                      encoding="utf-8")
    page = tmp_path / "docs" / "b.md"
    ok = "[x](a.md#the-mlp-the-chain) [y](a.md#exp05--logvar) [z](a.md) [w](https://example.org)"
    assert check_markdown(ok, page, root=tmp_path) == []
    bad = "[x](a.md#no-such-heading) [y](missing.md) ![p](figures/none.png) `examples/none.py`"
    problems = check_markdown(bad, page, root=tmp_path)
    assert len(problems) == 4, problems


def test_math_checker_catches_unbalanced_dollars():
    assert math_problems("a $x$ and $y$\n```math\nz\n```\n", "ok") == []
    assert math_problems("a $x and y\n", "bad")
    assert math_problems("```math\nz\n", "bad")
    assert math_problems("$\tfrac{1}{2}$\n", "bad")  # a TAB where "\\t" was meant
