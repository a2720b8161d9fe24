"""stembed: per-pixel, per-date embeddings from Sentinel-1 and Sentinel-2 time series.

The functions below are the Python API (:mod:`stembed.api`; the command line calls the same ones). They are
imported on first use, so ``import stembed`` loads neither torch nor dask::

    import stembed
    scene = stembed.open_scene("scene.zarr")
    emb = stembed.embed(scene, "pretrained:belgium")   # xr.Dataset: embedding (time, feature, y, x)
"""

from __future__ import annotations

from importlib import import_module as _import_module
from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

if _TYPE_CHECKING:  # the real signatures, for type checkers and editors
    from stembed.api import (
        embed,
        embed_store,
        extend_store,
        load_bundle,
        open_embeddings,
        open_run,
        open_scene,
        save_scene,
    )

try:
    __version__ = _version("stembed")
except _PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "embed",
    "embed_store",
    "extend_store",
    "load_bundle",
    "open_embeddings",
    "open_run",
    "open_scene",
    "save_scene",
]

_API = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> _Any:
    """Import the API function ``name`` from :mod:`stembed.api` on first use (keeps ``import stembed`` light)."""
    if name in _API:
        value = getattr(_import_module("stembed.api"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stembed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
