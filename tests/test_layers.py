"""The package's layers, kept: every import in ``src/stembed`` (function-level ones included) goes down.

A module may import from its own package (``stembed.io.cube`` from ``stembed.io.outputs``) and from any
package of a lower rank; never sideways (``data`` and ``models`` do not know each other) or up. The
``testing`` helpers (a package) may import anything but the CLI; production code never imports them. The
layers below the models (``geometry``, ``contract``, ``preprocess``, ``io``, ...) and the ``cube_build``
orchestration never import torch or Lightning, so reading and writing cubes and stores needs no
deep-learning stack. ``models`` never import ``io`` or ``data`` although both rank below them. The docs page
``docs/layout.md`` ("Layout") lists the same ranks.

Built-in sensor plugins are loaded by name (``stembed.sensors.BUILTIN_PLUGIN_MODULES``, like entry points),
not imported by ``sensors``: that lookup is a registry, not an import edge, and is not checked here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "stembed"

RANK = {
    "errors": 0, "types": 0,
    "sensors": 1, "geometry": 1,
    "config": 2, "repro": 2, "runtime": 2, "pretrained": 2, "cluster": 2,
    "contract": 3,
    "preprocess": 4,
    "io": 5,
    "data": 6, "models": 6, "losses": 6,
    "inference": 7,
    "training": 8, "cube_build": 8,
    "eval": 9,
    "describe": 10, "demo": 10,
    "api": 11,
    "cli": 12,
}
NO_TORCH = {"errors", "types", "sensors", "geometry", "config", "repro", "runtime", "pretrained", "cluster",
            "contract", "preprocess", "io", "cube_build"}
MODELS_NEVER = {"io", "data"}  # below the models by rank, but a model file never reads cubes, stores or patches


def _part(module: str) -> str:
    """``stembed.io.cube`` -> ``io``; ``stembed.contract`` -> ``contract``; ``stembed`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import statement in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # the package imports absolutely; a relative import would hide from this check
                out.append((node.lineno, f"<relative import of {node.module!r}>"))
            elif node.module:
                out.append((node.lineno, node.module))
    return out


FILES = sorted(SRC.rglob("*.py"))


def _module(path: Path) -> str:
    return ".".join(["stembed", *path.relative_to(SRC).with_suffix("").parts]).removesuffix(".__init__")


def test_every_package_has_a_rank() -> None:
    parts = {_part(_module(f)) for f in FILES} - {"", "testing"}
    assert parts <= set(RANK), f"new packages without a rank: {sorted(parts - set(RANK))}; add them to RANK and docs/layout.md"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_down_the_layers(path: Path) -> None:
    me = _part(_module(path))
    bad = []
    for line, target in _imports(path):
        if target.startswith("<relative"):
            bad.append(f"line {line}: {target}; write it as an absolute stembed.* import")
            continue
        top = target.split(".")[0]
        if top in ("torch", "lightning") and me in NO_TORCH:
            bad.append(f"line {line}: {target} (the {me} layer must not need torch)")
        if top != "stembed" or me in ("", "testing"):
            if me == "testing" and _part(target) == "cli":
                bad.append(f"line {line}: {target} (testing helpers must not import the CLI)")
            continue
        other = _part(target)
        if me == "models" and other in MODELS_NEVER:
            bad.append(f"line {line}: {target} (models are pure torch: they never read cubes or stores)")
        if other == "testing":
            bad.append(f"line {line}: {target} (production code must not import the test helpers)")
        elif other and other != me and RANK[other] >= RANK[me]:
            bad.append(f"line {line}: {target} ({other}, rank {RANK[other]}, is not below {me}, rank {RANK[me]})")
    assert not bad, f"{_module(path)} imports against the layers:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_private_name_crosses_a_package(path: Path) -> None:
    """A ``_name`` is its module's business: another package importing it is a layer seam left unmade."""
    me = _part(_module(path))
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stembed"):
            if _part(node.module) != me and me != "testing":
                bad += [f"line {node.lineno}: {a.name} from {node.module}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, f"{_module(path)} imports private names:\n" + "\n".join(bad)


SCRIPTS = sorted(p for folder in ("experiments", "benchmarks") for p in (SRC.parents[1] / folder).glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(SRC.parents[1])))
def test_scripts_use_no_private_names(path: Path) -> None:
    """Experiments and benchmarks use stembed as a user would: a ``_name`` they need is an API left unmade."""
    bad = [
        f"line {node.lineno}: {a.name} from {node.module}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stembed")
        for a in node.names
        if a.name.startswith("_") and not a.name.startswith("__")
    ]
    assert not bad, f"{path.name} imports private names:\n" + "\n".join(bad)


def test_the_walk_sees_function_level_imports(tmp_path: Path) -> None:
    """The check would be empty if it missed imports inside functions, where most cross-layer ones hide."""
    found = [m for _, m in _imports(SRC / "data" / "scenes.py")]
    assert "stembed.data.synthetic" in found  # imported inside load_scenes


def test_the_docs_layout_lists_the_same_ranks() -> None:
    """``docs/layout.md`` "Layout" is the map of these ranks: every package with its rank, none missing, none stale."""
    import re

    page = (SRC.parents[1] / "docs" / "layout.md").read_text()
    section = page.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = {}
    for rank, modules in re.findall(r"^\| (\d+) \| ([^|]+) \|", section, flags=re.MULTILINE):
        for name in re.findall(r"`([a-z_0-9]+)`", modules):
            listed[name] = int(rank)
    assert listed == RANK


MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_a_screen() -> None:
    """A function over 60 lines (def to last line, docstring included) checks, plans and acts at once: split it into
    helpers that read top to bottom (docs/development.md)."""
    long = []
    for path in FILES:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
