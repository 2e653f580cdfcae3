"""docs/design.md's module map against the package: every module is in it, everything it names
exists, and each module imports only modules above it in the table (the layering it states)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _rows() -> list[tuple[list[str], str]]:
    """The map's rows in table order: (the paths the first cell names, the whole row)."""
    design = (ROOT / "docs" / "design.md").read_text()
    section = design.split("\n## Module map\n", 1)[1].split("\n## ", 1)[0]
    return [
        (re.findall(r"`(blkfuse/[^`]*)`", line.split("|")[1]), line)
        for line in section.splitlines()
        if line.startswith("| `blkfuse/")
    ]


ROWS = _rows()
MODULES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "blkfuse").rglob("*.py"))


def _row_of(module: str) -> int | None:
    for i, (paths, _) in enumerate(ROWS):
        if any(p == module or (p.endswith("/") and module.startswith(p)) for p in paths):
            return i
    return None


def _module_file(dotted: str) -> str | None:
    path = dotted.replace(".", "/")
    for candidate in (f"{path}.py", f"{path}/__init__.py"):
        if (ROOT / candidate).exists():
            return candidate
    return None


def _imports(module: str) -> list[tuple[int, str]]:
    """(line, module file) of every blkfuse module `module` imports, deferred imports too."""
    found = []
    for node in ast.walk(ast.parse((ROOT / module).read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from pkg import mod` depends on pkg.mod, `from mod import name` on mod
            names = [
                f"{node.module}.{a.name}"
                if _module_file(f"{node.module}.{a.name}")
                else node.module
                for a in node.names
            ]
        else:
            continue
        for name in names:
            if name == "blkfuse" or name.startswith("blkfuse."):
                path = _module_file(name)
                assert path, f"{module}:{node.lineno} imports {name}, which is no module"
                found.append((node.lineno, path))
    return sorted(set(found))


def test_every_module_is_in_the_map():
    missing = [m for m in MODULES if _row_of(m) is None]
    assert not missing, f"docs/design.md's module map does not name {missing}"


def test_a_directory_row_names_each_of_its_modules():
    for paths, line in ROWS:
        for directory in (p for p in paths if p.endswith("/")):
            unnamed = [
                m
                for m in MODULES
                if m.startswith(directory) and f"`{m[len(directory) :]}`" not in line
            ]
            assert not unnamed, f"the module map's row {directory} does not name {unnamed}"


def test_everything_the_map_names_exists():
    named = [p for paths, _ in ROWS for p in paths]
    assert len(named) == len(set(named)), "a module is in the map twice"
    assert not [p for p in named if not (ROOT / p).exists()]


def test_each_module_imports_only_modules_above_it():
    upward = []
    for module in MODULES:
        for line, imported in _imports(module):
            above, below = _row_of(imported), _row_of(module)
            if above is not None and below is not None and above > below:
                upward.append(f"{module}:{line} imports {imported}, which the map puts below it")
    assert not upward, "\n".join(upward)
