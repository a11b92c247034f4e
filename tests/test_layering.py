"""The package imports downward only: kernels -> layer and experts -> models and checkpoints -> runtime ->
command line, with shared utilities (files, sizes, errors) below everything. Every import counts, those
inside functions too, so that a layer can be read, tested and replaced without the ones above it."""

from __future__ import annotations

import ast
from pathlib import Path

import moerun

PACKAGE = Path(moerun.__file__).parent

# Level of each module or subpackage (the longest matching prefix wins); imports must go to a level <= own.
LEVELS = {
    "files": 0, "sizes": 0, "errors": 0, "version": 0, "assets": 0,
    "kernels": 1, "quant": 1, "routing": 1,
    "layer": 2, "experts": 2, "offload": 2,
    "models": 3,
    "runtime": 4, "perf": 4, "plan": 4, "serve": 4,
    "cli": 5, "__init__": 5, "__main__": 5,
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def level(name: str) -> int:
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LEVELS:
            return LEVELS[".".join(parts[:n])]
    raise KeyError(f"module {name} has no level in LEVELS")


def _submodule_or_package(package: list[str], name: str) -> list[str]:
    base = PACKAGE.joinpath(*package, name)
    exists = base.with_suffix(".py").exists() or (base / "__init__.py").exists()
    return [*package, name] if exists else (package or ["__init__"])


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute moerun module name) of every moerun import in the file."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
                # "from . import x": x is a submodule, or a name the package itself defines
                names = [target] if node.module else [_submodule_or_package(target, a.name) for a in node.names]
            elif node.module and node.module.startswith("moerun"):
                names = [node.module.split(".")[1:]]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1:] for a in node.names if a.name.startswith("moerun.")]
        else:
            continue
        found += [(node.lineno, ".".join(n)) for n in names if n]
    return found


def test_every_module_has_a_level() -> None:
    for path in PACKAGE.rglob("*.py"):
        if "assets" not in path.parts:
            level(module_name(path))


def test_imports_go_downward_only() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "assets" in path.parts:
            continue
        own = level(module_name(path))
        for line, target in imports_of(path):
            if level(target) > own:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}")
    assert upward == [], "\n".join(upward)
