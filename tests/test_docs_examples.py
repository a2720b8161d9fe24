"""Every code block of README.md and docs/ runs here, so no example rots (docs/development.md, "Examples are tests").

- ``python`` blocks run in order in one namespace per page, like a notebook's cells; ``bash`` blocks in ``bash -e``
  with this environment's ``stembed`` on the PATH. Each page runs in a fresh copy of small synthetic inputs
  (``scene.zarr``, ``be.zarr``) that stand in for the user's.
- A block whose first line is ``# not run in the tests: REASON`` is skipped, the reason visible on the page.
- A block whose first line is ``# synopsis: ...`` is a usage summary: each ``stembed`` line's command must exist
  and each ``--option`` on it must be one of that command's.
- Blocks in a data language (``text``, ``csv``, ``yaml``, ...) are not run; any other label fails, so no example
  escapes the tests by its label.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
RUN = {"python", "bash"}
DATA = {"text", "csv", "yaml", "json", "ini", "toml"}
SKIP = re.compile(r"^#\s*not run in the tests:\s*(?P<reason>\S.*)$")
SYNOPSIS = re.compile(r"^#\s*synopsis:")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: its page, first line number, language and code (dedented)."""

    page: Path
    line: int
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def first(self) -> str:
        return self.code.lstrip("\n").split("\n", 1)[0].strip()

    @property
    def kind(self) -> str:
        if self.lang in DATA:
            return "data"
        if SKIP.match(self.first):
            return "skip"
        if SYNOPSIS.match(self.first):
            return "synopsis"
        return "run"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a markdown page, in order."""
    out: list[Block] = []
    lines = page.read_text().split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, start = len(m["indent"]), m["fence"], i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        info = m["info"].strip()
        out.append(Block(page, start + 1, info.split()[0] if info else "", "\n".join(body) + "\n"))
        i += 1
    return out


ALL = [b for page in PAGES for b in blocks(page)]


def test_the_pages_hold_examples() -> None:
    """The runner finds the blocks (an empty list would make every test below pass)."""
    assert sum(b.kind == "run" for b in ALL) >= 10
    assert {p.relative_to(ROOT).as_posix() for p in PAGES} >= {"README.md", "docs/guide/notebook.md"}


@pytest.mark.parametrize("block", ALL, ids=lambda b: b.where)
def test_every_block_runs_or_says_why(block: Block) -> None:
    assert block.lang in RUN | DATA, (
        f"{block.where}: a ```{block.lang or '(no language)'} block is neither run nor data; label it python or "
        f"bash (it then runs), or one of {sorted(DATA)}"
    )
    if block.lang in RUN and block.first.startswith("#") and "not run" in block.first:
        assert block.kind == "skip", f"{block.where}: write the marker as '# not run in the tests: REASON'"


def _logical_lines(code: str) -> list[str]:
    """Lines with their backslash continuations joined."""
    return [line for line in code.replace("\\\n", " ").split("\n") if line.strip()]


def _options(command: Any) -> set[str]:
    return {"--help", *(o for p in command.params for o in (*p.opts, *p.secondary_opts))}


@pytest.mark.parametrize("block", [b for b in ALL if b.kind == "synopsis"], ids=lambda b: b.where)
def test_synopses_name_real_commands_and_options(block: Block) -> None:
    import typer

    from stembed.cli import app

    root = typer.main.get_command(app)
    bad = []
    for line in _logical_lines(block.code):
        words = shlex.split(line, comments=True)
        if not words or words[0] != "stembed":
            continue
        command, path, rest = root, ["stembed"], words[1:]
        while hasattr(command, "commands") and rest and rest[0] in command.commands:  # a group: its sub-command
            command, path, rest = command.commands[rest[0]], [*path, rest[0]], rest[1:]
        if hasattr(command, "commands") and rest and not rest[0].startswith("-"):
            bad.append(f"{' '.join(path)} has no command {rest[0]!r}: {line.strip()}")
            continue
        for word in rest:
            option = word.strip("[]()|").split("=", 1)[0]
            if option.startswith("--") and option not in _options(command):
                bad.append(f"{' '.join(path)} has no option {option}: {line.strip()}")
    assert not bad, f"{block.where}:\n" + "\n".join(bad)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small inputs the examples use: a 24 x 24 px synthetic scene store (the smallest the 23 px halo of the
    built-in bundles takes) of 40 days (6 dates: the examples embed it a dozen times) as ``scene.zarr`` and as
    ``be.zarr`` (the README's area)."""
    from stembed.io.cube import save_scene
    from stembed.testing import synthetic_scene

    d = tmp_path_factory.mktemp("examples")
    save_scene(synthetic_scene(seed=1, height_px=24, width_px=24, n_days=40), d / "scene.zarr")
    shutil.copytree(d / "scene.zarr", d / "be.zarr")
    return d


RUNNABLE = [p for p in PAGES if any(b.kind == "run" for b in blocks(p))]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_examples_of_a_page_run(page: Path, inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    work = tmp_path / "work"
    shutil.copytree(inputs, work)
    monkeypatch.chdir(work)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MPLBACKEND": "Agg"}
    namespace: dict[str, object] = {"__name__": "__main__"}
    try:
        for block in blocks(page):
            if block.kind != "run":
                continue
            if block.lang == "python":
                exec(compile(block.code, block.where, "exec"), namespace)  # our own documentation, run as a reader would
            else:
                r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=work, env=env,
                                   capture_output=True, text=True, timeout=600)
                assert r.returncode == 0, f"{block.where} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    finally:
        plt.close("all")
