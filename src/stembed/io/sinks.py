"""Where ``stembed embed`` writes: the :class:`EmbeddingSink` protocol (no torch, no zarr here).

The tile runner (:mod:`stembed.inference.workers`) writes only through a sink, in this order:

1. :meth:`~EmbeddingSink.create` once, for a new output: the empty layout (coordinates, metadata, no tile
   done), put in place atomically;
2. per tile, on a worker: :meth:`~EmbeddingSink.write_tile` (the tile's region of every date, its
   storage-error stats, the daily flags), then :meth:`~EmbeddingSink.mark_done` *last*, so a process killed
   between the two leaves the tile to be written again by a resume;
3. :meth:`~EmbeddingSink.finalise` once every tile is done.

:meth:`~EmbeddingSink.tiles_done` and :meth:`~EmbeddingSink.quantisation` let a resumed run continue a
store it did not create. ``stembed embed --extend`` (:mod:`stembed.inference.extend`) needs an
:class:`ExtendableSink`: one that also reads back a tile's rows and rewrites them from a date on. A sink
is sent to dask workers inside each tile job, so it must pickle (hold a path, not an open handle). The zarr embedding store,
:class:`stembed.io.embeddings.ZarrEmbeddingStore`, is the one implementation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from stembed.io.embeddings import Quantisation, TileGrid


@runtime_checkable
class EmbeddingSink(Protocol):
    """A tiled, resumable destination of per-pixel-per-date embeddings ``(time, feature, y, x)``."""

    def create(
        self,
        *,
        time: np.ndarray,
        y: np.ndarray,
        x: np.ndarray,
        features: list[str],
        crs: str,
        transform: list[float],
        quant: Quantisation,
        tile_px: int,
        time_chunk: int,
        attrs: dict[str, Any],
        flag_meanings: tuple[str, ...] | None = None,
    ) -> TileGrid:
        """Lay out an empty output (nothing there yet) and return its tile grid."""
        ...

    def tiles_done(self) -> np.ndarray:
        """``(tile_y, tile_x)`` bool: the tiles already marked done."""
        ...

    def quantisation(self) -> Quantisation:
        """How values are stored (dtype, per-feature scale and offset)."""
        ...

    def write_tile(
        self,
        grid: TileGrid,
        tile: tuple[int, int],
        codes: np.ndarray,
        valid: np.ndarray,
        error: np.ndarray,
        flag: np.ndarray | None = None,
    ) -> None:
        """Write one tile's region (all dates) and its storage-error stats; not yet marked done."""
        ...

    def mark_done(self, tile: tuple[int, int]) -> None:
        """Record that ``tile`` is completely written (its last write)."""
        ...

    def finalise(self) -> dict[str, Any]:
        """Once every tile is done: summarise the storage error, mark the output complete; the summary."""
        ...


@runtime_checkable
class ExtendableSink(EmbeddingSink, Protocol):
    """An :class:`EmbeddingSink` that can grow: the tile writes of ``stembed embed --extend``, after the store's time
    axis was grown (:func:`stembed.io.embeddings.grow_time`)."""

    def read_rows(self, grid: TileGrid, tile: tuple[int, int], rows: slice) -> tuple[np.ndarray, ...]:
        """A tile's stored ``codes`` ``(rows, feature, h, w)``, ``valid`` and ``extension`` ``(rows, h, w)``."""
        ...

    def write_rows(
        self, grid: TileGrid, tile: tuple[int, int], first: int, codes: np.ndarray, valid: np.ndarray,
        extension: np.ndarray, error: np.ndarray,
    ) -> None:
        """Write a tile's rows from date ``first`` on, and its error stats (the extension's ``error`` added to
        those it had before the extension); not yet marked."""
        ...

    def mark_extended(self, tile: tuple[int, int], number: int) -> None:
        """Record that extension ``number`` has completely written ``tile`` (its last write)."""
        ...

    def tiles_extended(self, number: int) -> np.ndarray:
        """``(tile_y, tile_x)`` bool: the tiles extension ``number`` has finished."""
        ...
