"""The lock files that `make` installs from (requirements/*.lock, written by `make lock`) cover pyproject.toml: every
dependency it names is pinned there, at a version its range allows. A dependency added to pyproject.toml without
`make lock` fails here rather than installing unpinned."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
UNLOCKED = {"torch"}  # named on the install command line instead (the CPU build here, CUDA on a GPU machine)


def _pins(lock: Path) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in lock.read_text().splitlines():
        if line and not line.startswith((" ", "#", "-")):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version.split(";")[0].strip())
    return pins


def _requirements(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = list(project["dependencies"])
    for extra in extras:
        names += project["optional-dependencies"][extra]
    return [Requirement(r) for r in names]


@pytest.mark.parametrize(("lock", "extras"), [("run.lock", ()), ("dev.lock", ("test", "docs"))])
def test_the_lock_pins_every_dependency_within_its_range(lock: str, extras: tuple[str, ...]) -> None:
    pins = _pins(ROOT / "requirements" / lock)
    assert len(pins) > 50  # the whole environment, not only the direct dependencies
    assert not UNLOCKED & set(pins), "torch must not be locked"
    for req in _requirements(extras):
        name = canonicalize_name(req.name)
        if name in UNLOCKED:
            continue
        assert name in pins, f"{req} is not in requirements/{lock}; run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements/{lock} pins {name}=={pins[name]}, outside {req}; run `make lock`"
        )
