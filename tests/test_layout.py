"""The repository's layout rules, checked on the source itself: layers point one way, no
import cycles, no private names imported across modules, short functions and modules,
and docs that stand alone (no path outside the repository, every relative link resolves).

Layers, lowest first (a module may import from its own package and from lower layers
only; packages of one layer do not import each other):

0. ``errors``, ``caches``, ``spec``, ``losses``, ``version``, ``rundir``, ``plotting``, ``configs``,
   ``trees``
1. ``data``, ``nn``, ``optim``, ``tasks``
2. ``training``
3. ``run``, ``diagnostics``, ``bench``
4. ``cli``

The package root ``jtricks/__init__.py`` re-exports the public API and is left out.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jtricks"
LAYERS = {
    **dict.fromkeys(
        (
            "errors",
            "caches",
            "spec",
            "imports",
            "losses",
            "version",
            "rundir",
            "plotting",
            "configs",
            "trees",
            "moved",
        ),
        0,
    ),
    **dict.fromkeys(("data", "nn", "optim", "tasks"), 1),
    "training": 2,
    **dict.fromkeys(("run", "diagnostics", "bench"), 3),
    "search": 3.5,  # trials of runs, drawn with the bench's quasi-random points
    "cli": 4,
}
MAX_FUNCTION_LINES = 80  # docstring included
MAX_MODULE_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, imported names, line)`` of every jtricks import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jtricks"):
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("jtricks")]
    return found


def _top(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_top_level_module_has_a_layer():
    tops = {_top(m) for m in _modules()} - {""}
    assert tops <= set(LAYERS), f"give these a layer in LAYERS: {sorted(tops - set(LAYERS))}"


def test_imports_point_down_the_layers():
    bad = []
    for module, path in _modules().items():
        src = _top(module)
        if not src:
            continue
        for target, _, line in _imports(path):
            dst = _top(target)
            if dst == src:
                continue
            up = LAYERS.get(dst, -1) > LAYERS[src]
            sideways = LAYERS.get(dst, -1) == LAYERS[src] and LAYERS[src] > 0
            if not dst or up or sideways:
                bad.append(f"{path.relative_to(ROOT)}:{line} {module} -> {target}")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_import_cycle_between_modules():
    modules = _modules()
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        for target, names, _ in _imports(path):
            for name in [f"{target}.{n}" for n in names] + [target]:
                if name in modules and name != module:
                    graph[module].add(name)
                    break
    # every submodule imports its package's __init__ implicitly; only explicit edges count
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*stack, node])):
                return cycle
        state[node] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [])):
            pytest.fail("import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]) :]))


def test_no_private_name_is_imported_across_modules():
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name} from {target}"
        for path in _modules().values()
        for target, names, line in _imports(path)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not bad, "\n".join(bad)


def _sources() -> list[Path]:
    """The package's modules and the benchmark scripts."""
    return [*_modules().values(), *sorted((ROOT / "benchmarks").rglob("*.py"))]


def test_functions_and_modules_are_short():
    long = []
    for path in _sources():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines}")
    assert not long, "too long:\n" + "\n".join(long)


def test_no_code_is_packed_past_the_formatter():
    """Code that outgrows a limit changes its design; it is never packed onto lines the
    formatter would split (``# fmt: skip`` / ``# fmt: off``)."""
    bad = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in _sources()
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if "# fmt: " + "skip" in line or "# fmt: " + "off" in line
    ]
    assert not bad, "\n".join(bad)


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


OUTSIDE = re.compile(r"\.\./shared|(?<![\w.])\.\./\.\.|/work/|TRICKS\.md|STYLE\.md")


def test_nothing_points_outside_the_repository():
    files = [*_docs(), *_modules().values()]
    bad = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not bad, "\n".join(bad)


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_every_relative_link_in_the_docs_resolves():
    bad = []
    for doc in _docs():
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address, or an anchor in the same page
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.exists() or ROOT not in path.parents:
                bad.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not bad, "links that do not resolve in the repository:\n" + "\n".join(bad)


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, stripped text)`` of the lines that carry code: no blanks, comments,
    imports or bare docstring quotes."""
    skip = ("#", "import ", "from ")
    return [
        (i, t)
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if (t := line.strip()) and not t.startswith(skip) and t != '"""'
    ]


def test_no_six_code_lines_are_repeated():
    """The same six lines of code (not mostly punctuation) never stand in two places."""
    seen: dict[tuple[str, ...], list[str]] = {}
    for path in _modules().values():
        lines = _code_lines(path)
        for k in range(len(lines) - 5):
            texts = tuple(t for _, t in lines[k : k + 6])
            if sum(len(re.sub(r"[\W_]", "", t)) >= 12 for t in texts) >= 4:
                seen.setdefault(texts, []).append(f"{path.relative_to(ROOT)}:{lines[k][0]}")
    repeated = [" ~ ".join(places) for places in seen.values() if len(places) > 1]
    assert not repeated, "repeated blocks:\n" + "\n".join(repeated)


IMPORT_TO_DIST = {"orbax": "orbax-checkpoint", "sklearn": "scikit-learn", "PIL": "pillow"}


def test_every_imported_package_is_declared():
    import sys
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [
        d for ds in project["optional-dependencies"].values() for d in ds
    ]
    declared = {re.split(r"[<>=\[ ;]", s, maxsplit=1)[0].lower() for s in specs}
    missing = set()
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "jtricks":
                    continue
                if IMPORT_TO_DIST.get(top, top).lower() not in declared:
                    missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"
