"""Stand-in stores for tests of what reads them: :func:`write_embedding_store` (a finished embedding store on
an S2 cube's grid, no model needed) and :func:`write_embedding_store_at` (the same on a grid given directly)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from stembed.types import TIME, X, Y

if TYPE_CHECKING:
    from stembed.io.embeddings import Quantisation


def write_embedding_store(
    path: Any, s2: xr.DataArray, values: np.ndarray, *, valid: np.ndarray | None = None, tile_px: int = 16,
    time_chunk: int = 8, attrs: dict[str, Any] | None = None,
) -> Any:
    """Write ``values`` (time, 7, y, x) on the grid of the S2 cube ``s2`` as a finished float32 embedding store,
    for tests of what reads one (eval, sample, export) where no model is needed. ``valid`` defaults to
    "every feature finite"; returns ``path``."""
    from stembed.contract import cube_transform

    return write_embedding_store_at(
        path, values, time=s2[TIME].values, y=s2[Y].values, x=s2[X].values, crs=str(s2.attrs["crs"]),
        transform=list(cube_transform(s2)), valid=valid, tile_px=tile_px, time_chunk=time_chunk, attrs=attrs,
    )


def write_embedding_store_at(
    path: Any, values: np.ndarray, *, time: np.ndarray, y: np.ndarray, x: np.ndarray, crs: str,
    transform: list[float], valid: np.ndarray | None = None, quant: Quantisation | None = None, tile_px: int = 16,
    time_chunk: int = 8, attrs: dict[str, Any] | None = None,
) -> Any:
    """:func:`write_embedding_store` on a grid given by its coordinates, CRS and transform instead of an S2 cube.

    ``values`` (time, feature, y, x); ``quant`` the store's quantisation (default: float32, values as they
    are); ``valid`` defaults to "every feature finite"; returns ``path``.
    """
    from stembed.io.embeddings import Quantisation, create_store, finalise, write_tile

    q = Quantisation.identity(values.shape[1]) if quant is None else quant
    valid = np.isfinite(values).all(axis=1) if valid is None else valid
    grid = create_store(
        path, time=time, y=y, x=x, features=[f"E{i}" for i in range(1, values.shape[1] + 1)], crs=crs,
        transform=transform, quant=q, tile_px=tile_px, time_chunk=time_chunk, attrs=attrs or {},
    )
    for tile in grid.tiles():
        ys, xs = grid.bounds(*tile)
        v = values[:, :, ys, xs]
        codes = q.encode(v)
        write_tile(path, grid, tile, codes, valid[:, ys, xs], q.error_stats(v, codes))
    finalise(path)
    return path
