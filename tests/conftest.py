"""Shared fixtures: the real WorldCereal data (skipped when absent) and a tiny synthetic scene.

Real-data tests skip if ``../shared/data`` (or ``$STEMBED_SHARED_DATA``) is missing, unless
``STEMBED_REQUIRE_SHARED_DATA=1``, in which case a missing folder fails the test loudly.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from stembed.io.cube import Scene
from stembed.io.worldcereal import read_worldcereal, shared_data_dir
from stembed.testing import synthetic_scene

BELGIAN_SITE = "00002806639B424A"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The test files with the most slow tests first: ``--dist loadfile`` hands files to the workers in this order,
    so the long files start early and the short ones fill the gaps at the end. The sort is stable: each file's
    tests keep their order (some build on the one before)."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs ``-n auto``), each worker takes its share of the cores for torch:
    the workers' default thread counts would add up to several threads per core."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(workers)))


def require_shared(path: Path) -> Path:
    """Return ``path`` if it exists; otherwise skip, or fail when STEMBED_REQUIRE_SHARED_DATA=1."""
    if path.exists():
        return path
    msg = f"shared data not found: {path} (set STEMBED_SHARED_DATA to the shared data folder)"
    if os.environ.get("STEMBED_REQUIRE_SHARED_DATA") == "1":
        pytest.fail(f"STEMBED_REQUIRE_SHARED_DATA=1 but {msg}")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def shared_data_root() -> Path:
    """The shared data folder (parent of ``worldcereal_s2_s1_patches`` and ``fluxnet_daily_gpp``)."""
    return require_shared(shared_data_dir())


@pytest.fixture(scope="session")
def shared_data(shared_data_root: Path) -> Path:
    """``worldcereal_s2_s1_patches``; its ``.parent`` is the shared data folder (flux data beside it)."""
    return require_shared(shared_data_root / "worldcereal_s2_s1_patches")


@pytest.fixture(scope="session")
def belgian_dir(shared_data: Path) -> Path:
    """The Belgian location folder (all five files present)."""
    return require_shared(shared_data / BELGIAN_SITE)


@pytest.fixture(scope="session")
def belgian_scene(belgian_dir: Path) -> Scene:
    """The Belgian location read with the default settings (read once per session: do not mutate)."""
    return read_worldcereal(belgian_dir)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models fit several times faster on one thread; the setting is restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_scene() -> Scene:
    """A fresh default synthetic scene (seed 0, 48x48 px, one year); safe to modify."""
    return synthetic_scene(seed=0)
