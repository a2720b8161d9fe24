"""Embedding stores: the zarr layout ``stembed embed`` writes and every downstream command reads.

One store holds one cube's embeddings (no torch here):

* float32 stores: ``embedding`` ``(time, feature, y, x)`` holds the values (NaN = missing).
* float16 and int8 stores: one variable per feature, ``embedding_<feature>`` ``(time, y, x)`` (e.g.
  ``embedding_E1``), holding codes with the CF attributes ``scale_factor``, ``add_offset`` and, for
  int8, ``_FillValue`` (-128 = missing): CF scale and offset are one number per variable, and each
  feature has its own. A plain ``xr.open_zarr`` (and GDAL, QGIS) decodes them to values;
  :func:`open_embeddings` stacks them back into ``embedding`` ``(time, feature, y, x)`` float32.
  Stores of format ``stembed-embedding/1`` (codes in one ``embedding`` variable with separate
  ``scale``/``offset`` variables) still open.
* ``valid`` ``(time, y, x)`` bool: the pixel-date has an embedding (its S2 centre pixel was observed).
* daily stores (``stembed embed --daily``) only: ``time`` is every day, and ``flag`` ``(time, y, x)``
  uint8 says how each value was obtained (CF ``flag_values`` / ``flag_meanings``: 0 none,
  1 observed, 2 model_based, 3 linear, 4 savgol; see :mod:`stembed.inference.daily`).
* ``spatial_ref``: the CRS and GeoTransform as CF grid-mapping attributes (rioxarray reads them).
* bookkeeping for tiled, resumable writes: ``tile_done`` ``(tile_y, tile_x)`` (1 once a tile's
  region is written; the last write of a tile) and ``tile_error`` ``(tile_y, tile_x, stat, feature)``,
  the storage error each tile measured against its float32 values (count, sum of squares, max abs).
* attributes: the format, CRS and transform, the feature names, the bundle's sha256, the resolved
  embed config, the input provenance, a run fingerprint (what a resume must match) and, once every
  tile is written, ``complete: true`` and the measured ``storage_error``.
* stores grown by ``stembed embed --extend`` (:mod:`stembed.inference.extend`): ``extension`` ``(time, y, x)``
  uint8, which run wrote each pixel-date (0 the first, k the k-th extension); ``extension_tile``
  ``(tile_y, tile_x)``, the last extension that finished each tile; the attribute ``extensions``, one record
  per extension; while one runs, the journal ``extending`` (readers refuse the store) and ``tile_error_base``
  (the tiles' error stats before it).

The ``y``/``x`` chunks are the tiles; ``time`` chunks hold ``time_chunk`` dates. ``stembed embed`` writes
through :class:`ZarrEmbeddingStore`, this layout as an :class:`~stembed.io.sinks.EmbeddingSink`; the
functions (:func:`create_store`, :func:`write_tile`, :func:`finalise`) write it directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from stembed.errors import UserError
from stembed.io.outputs import creating_path
from stembed.types import FEATURE, TIME, X, Y

FORMAT_ATTR = "stembed_embedding_format"
EMBEDDING_FORMAT = "stembed-embedding/2"
READABLE_FORMATS = ("stembed-embedding/1", EMBEDDING_FORMAT)  # /1: codes + scale/offset variables
DTYPES = ("float32", "float16", "int8")
INT8_FILL = -128  # code of a missing value in int8 stores
INT8_MAX = 127  # codes -127..127 hold values
ERROR_STATS = ("count", "sum_sq", "max_abs")
_BOOKKEEPING = ("tile_done", "tile_error", "scale", "offset", "extension_tile", "tile_error_base")
EXTENDING_ATTR = "extending"
"""Attribute of a store that ``stembed embed --extend`` is growing (its journal): readers refuse the store."""
EXTENSION_VAR = "extension"


class EmbeddingStoreError(UserError):
    """A path that is not a usable stembed embedding store, or one that does not match the request."""


class EmbedError(UserError, RuntimeError):
    """An embedding run could not start or finish (e.g. no scheduler, a failed tile); the message says why."""


# ----------------------------------------------------------------------------- tiles
@dataclass(frozen=True)
class TileGrid:
    """Square tiles of ``tile_px`` over a ``height`` x ``width`` grid; edge tiles are smaller."""

    height: int
    width: int
    tile_px: int

    @property
    def shape(self) -> tuple[int, int]:
        """Number of tiles along y and x."""
        return -(-self.height // self.tile_px), -(-self.width // self.tile_px)

    def bounds(self, iy: int, ix: int) -> tuple[slice, slice]:
        """Pixel rows and columns of tile ``(iy, ix)``."""
        t = self.tile_px
        return slice(iy * t, min((iy + 1) * t, self.height)), slice(ix * t, min((ix + 1) * t, self.width))

    def tiles(self) -> list[tuple[int, int]]:
        """All tiles, row by row."""
        ny, nx = self.shape
        return [(iy, ix) for iy in range(ny) for ix in range(nx)]


# ----------------------------------------------------------------------------- storage dtype
@dataclass(frozen=True)
class Quantisation:
    """How float32 embeddings are stored: ``code = (value - offset) / scale`` in ``dtype``, per feature."""

    dtype: str
    scale: np.ndarray  # (feature,) float32
    offset: np.ndarray  # (feature,) float32

    @classmethod
    def identity(cls, n_features: int) -> Quantisation:
        """float32 storage: codes are the values."""
        return cls("float32", np.ones(n_features, np.float32), np.zeros(n_features, np.float32))

    @classmethod
    def calibrate(cls, dtype: str, sample: np.ndarray, margin: float) -> Quantisation:
        """Scale and offset from a ``(n, feature)`` sample of embeddings, widened by ``margin`` each side.

        int8 maps the widened range onto codes -127..127 (values beyond it are clipped, and the
        clipping shows in the measured error); float16 maps it onto [-1, 1].
        """
        if dtype not in DTYPES:
            raise EmbeddingStoreError(f"unknown storage dtype {dtype!r}; choose one of {list(DTYPES)}")
        n_features = sample.shape[1]
        if dtype == "float32":
            return cls.identity(n_features)
        finite = np.isfinite(sample).all(axis=1)
        if not finite.any():
            raise EmbeddingStoreError(
                "no valid pixel-date to calibrate the storage scale on; the cube has no observed S2 pixel"
            )
        lo, hi = sample[finite].min(axis=0).astype(np.float64), sample[finite].max(axis=0).astype(np.float64)
        width = np.maximum(hi - lo, 1e-6)
        lo, hi = lo - margin * width, hi + margin * width
        half_levels = INT8_MAX if dtype == "int8" else 1
        scale = (hi - lo) / (2 * half_levels)
        return cls(dtype, scale.astype(np.float32), ((hi + lo) / 2).astype(np.float32))

    def encode(self, values: np.ndarray) -> np.ndarray:
        """``values`` ``(time, feature, y, x)`` float32 (NaN = missing) -> codes of ``dtype``."""
        if self.dtype == "float32":
            return values.astype(np.float32, copy=False)
        s, o = self.scale[None, :, None, None], self.offset[None, :, None, None]
        z = (values.astype(np.float64) - o) / s
        if self.dtype == "float16":
            return z.astype(np.float16)
        codes = np.clip(np.rint(np.nan_to_num(z, nan=0.0)), -INT8_MAX, INT8_MAX).astype(np.int8)
        codes[np.isnan(values)] = INT8_FILL
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes ``(time, feature, y, x)`` -> float32 values, NaN where missing."""
        z = codes.astype(np.float32)
        if self.dtype == "int8":
            z[codes == INT8_FILL] = np.nan
        if self.dtype == "float32":
            return z
        return z * self.scale[None, :, None, None] + self.offset[None, :, None, None]

    def error_stats(self, values: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """``(stat, feature)`` float64: count, sum of squared and max absolute storage error of the valid values."""
        err = self.decode(codes).astype(np.float64) - values
        ok = np.isfinite(values)
        err = np.where(ok, err, 0.0)
        axes = (0, 2, 3)
        return np.stack([ok.sum(axis=axes), (err**2).sum(axis=axes), np.abs(err).max(axis=axes, initial=0.0)])


# ----------------------------------------------------------------------------- store
def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _array(g: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of an open store (a group in its place is a damaged store)."""
    a = g[name]
    if not isinstance(a, zarr.Array):
        raise EmbeddingStoreError(f"{g.store}: {name!r} is a group, not an array; the store is damaged")
    return a


def _features(g: zarr.Group) -> list[str]:
    """The feature names recorded in the store's attributes."""
    names = g.attrs["features"]
    if not isinstance(names, (list, tuple)):
        raise EmbeddingStoreError(f"{g.store}: 'features' attribute is {names!r}, not a list; the store is damaged")
    return [str(f) for f in names]


def create_store(
    path: str | Path,
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
    """Write an empty store (coordinates, metadata, no tiles done) at ``path``, which must not exist.

    ``attrs`` must hold ``fingerprint`` (what a resume must match); it is stored with the format
    marker, CRS, transform and feature names. ``flag_meanings`` (daily stores) adds the ``flag``
    array, code ``i`` meaning ``flag_meanings[i]``. Returns the tile grid.
    """
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    from affine import Affine

    path = Path(path)
    grid = TileGrid(len(y), len(x), tile_px)
    n_t, n_f = len(time), len(features)
    coords = xr.Dataset(coords={TIME: time, FEATURE: np.array(features, dtype=object), Y: y, X: x})
    coords = coords.rio.write_crs(crs).rio.write_transform(Affine.from_gdal(*transform))
    coords.attrs = {
        FORMAT_ATTR: EMBEDDING_FORMAT,
        "complete": False,
        "created": _now(),
        "crs": crs,
        "transform": [float(v) for v in transform],
        "features": list(features),
        "storage_dtype": quant.dtype,
        "tile_px": tile_px,
        **attrs,
    }
    coords.to_zarr(path, mode="w-", zarr_format=3, consolidated=False)

    g = zarr.open_group(path, mode="r+", zarr_format=3)
    tc = min(time_chunk, n_t)
    _create_value_arrays(g, grid, features, quant, n_t, tc)
    _create_pixel_arrays(g, grid, n_t, tc, flag_meanings)
    _create_bookkeeping(g, grid, n_f)
    return grid


def _create_value_arrays(
    g: zarr.Group, grid: TileGrid, features: list[str], quant: Quantisation, n_t: int, tc: int
) -> None:
    """The values: ``embedding`` (time, feature, y, x) for float32, else one CF-scaled array per feature."""
    n_f, tile_px = len(features), grid.tile_px
    fill: Any = INT8_FILL if quant.dtype == "int8" else np.nan
    if quant.dtype == "float32":
        g.create_array(
            "embedding",
            shape=(n_t, n_f, grid.height, grid.width),
            dtype=quant.dtype,
            chunks=(tc, n_f, tile_px, tile_px),
            fill_value=fill,
            dimension_names=(TIME, FEATURE, Y, X),
            attributes={"grid_mapping": "spatial_ref", "long_name": "fused embedding"},
        )
    for i, name in enumerate(features if quant.dtype != "float32" else []):
        attrs_f: dict[str, Any] = {
            "grid_mapping": "spatial_ref",
            "long_name": f"fused embedding feature {name}",
            "scale_factor": float(quant.scale[i]),  # CF: value = code * scale_factor + add_offset
            "add_offset": float(quant.offset[i]),
        }
        if quant.dtype == "int8":
            attrs_f["_FillValue"] = INT8_FILL  # xarray and GDAL mask it
        g.create_array(
            feature_var(name),
            shape=(n_t, grid.height, grid.width),
            dtype=quant.dtype,
            chunks=(tc, tile_px, tile_px),
            fill_value=fill,
            dimension_names=(TIME, Y, X),
            attributes=attrs_f,
        )


def _create_pixel_arrays(
    g: zarr.Group, grid: TileGrid, n_t: int, tc: int, flag_meanings: tuple[str, ...] | None
) -> None:
    """Per pixel-date: ``valid``, and ``flag`` (how the value was obtained) for daily stores."""
    tile_px = grid.tile_px
    g.create_array(
        "valid",
        shape=(n_t, grid.height, grid.width),
        dtype="bool",
        chunks=(tc, tile_px, tile_px),
        fill_value=False,
        dimension_names=(TIME, Y, X),
        attributes={"grid_mapping": "spatial_ref", "long_name": "pixel-date has an embedding"},
    )
    if flag_meanings is not None:
        g.create_array(
            "flag",
            shape=(n_t, grid.height, grid.width),
            dtype="uint8",
            chunks=(tc, tile_px, tile_px),
            fill_value=0,
            dimension_names=(TIME, Y, X),
            attributes={
                "grid_mapping": "spatial_ref",
                "long_name": "how the value was obtained",
                "flag_values": list(range(len(flag_meanings))),
                "flag_meanings": " ".join(flag_meanings),
            },
        )


def _create_bookkeeping(g: zarr.Group, grid: TileGrid, n_f: int) -> None:
    """Per tile: ``tile_done`` (its last write) and ``tile_error`` (its storage-error stats)."""
    ny, nx = grid.shape
    g.create_array(
        "tile_done",
        shape=(ny, nx),
        dtype="uint8",
        chunks=(1, 1),
        fill_value=0,
        dimension_names=("tile_y", "tile_x"),
        attributes={"long_name": "1 once the tile's region is written"},
    )
    g.create_array(
        "tile_error",
        shape=(ny, nx, len(ERROR_STATS), n_f),
        dtype="float64",
        chunks=(1, 1, len(ERROR_STATS), n_f),
        fill_value=0.0,
        dimension_names=("tile_y", "tile_x", "stat", FEATURE),
        attributes={"stats": list(ERROR_STATS), "long_name": "storage error of each tile's valid values"},
    )


def feature_var(feature: str) -> str:
    """The variable holding one feature in float16/int8 stores."""
    return f"embedding_{feature}"


def read_attrs(path: str | Path) -> dict[str, Any]:
    """The attributes of the embedding store at ``path``.

    Raises:
        EmbeddingStoreError: ``path`` is missing, is not a readable zarr group, or is not a stembed
            embedding store of this format.
    """
    path = Path(path)
    if not path.exists():
        raise EmbeddingStoreError(f"no embedding store at {path}; fix: write one with `stembed embed`")
    try:
        attrs = dict(zarr.open_group(path, mode="r").attrs)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise EmbeddingStoreError(
            f"{path} is not a readable zarr store ({type(e).__name__}: {e}); fix: point at a store "
            "`stembed embed` wrote, or remove it and run again"
        ) from e
    fmt = attrs.get(FORMAT_ATTR)
    if fmt not in READABLE_FORMATS:
        what = "no stembed embedding format attribute" if fmt is None else f"format {fmt!r}"
        raise EmbeddingStoreError(
            f"{path} is a zarr store but not a stembed embedding store ({what}, expected {EMBEDDING_FORMAT!r}); "
            "fix: choose another --out, or remove it if it is yours to delete"
        )
    return attrs


def store_quantisation(path: str | Path) -> Quantisation:
    """The storage dtype, scale and offset of a store (either format)."""
    g = zarr.open_group(Path(path), mode="r")
    if "scale" in g:  # format /1
        return Quantisation(
            str(_array(g, "embedding").dtype), np.asarray(_array(g, "scale")[:]), np.asarray(_array(g, "offset")[:])
        )
    features = _features(g)
    if "embedding" in g:
        return Quantisation.identity(len(features))
    arrs = [_array(g, feature_var(f)) for f in features]
    scale = np.array([a.attrs["scale_factor"] for a in arrs], dtype=np.float32)
    offset = np.array([a.attrs["add_offset"] for a in arrs], dtype=np.float32)
    return Quantisation(str(arrs[0].dtype), scale, offset)


def tiles_done(path: str | Path) -> np.ndarray:
    """``(tile_y, tile_x)`` bool: which tiles are completely written."""
    g = zarr.open_group(Path(path), mode="r")
    return np.asarray(_array(g, "tile_done")[:]).astype(bool)


def write_tile(
    path: str | Path,
    grid: TileGrid,
    tile: tuple[int, int],
    codes: np.ndarray,
    valid: np.ndarray,
    error: np.ndarray,
    flag: np.ndarray | None = None,
) -> None:
    """Write one tile's region (all dates; ``flag`` for daily stores), its error stats, and last its done flag.

    A process killed mid-way leaves the flag unset, so a resume rewrites the whole tile; the region
    is chunk-aligned, so no other tile's chunks are touched.
    """
    write_region(path, grid, tile, codes, valid, error, flag)
    mark_tile_done(path, tile)


def write_region(
    path: str | Path,
    grid: TileGrid,
    tile: tuple[int, int],
    codes: np.ndarray,
    valid: np.ndarray,
    error: np.ndarray,
    flag: np.ndarray | None = None,
) -> None:
    """The first part of :func:`write_tile`: the tile's region and error stats, without its done flag."""
    g = zarr.open_group(Path(path), mode="r+")
    ys, xs = grid.bounds(*tile)
    if "embedding" in g:
        _array(g, "embedding")[:, :, ys, xs] = codes
    else:
        for i, f in enumerate(_features(g)):
            _array(g, feature_var(f))[:, ys, xs] = codes[:, i]
    _array(g, "valid")[:, ys, xs] = valid
    if flag is not None:
        _array(g, "flag")[:, ys, xs] = flag
    _array(g, "tile_error")[tile[0], tile[1]] = error


def mark_tile_done(path: str | Path, tile: tuple[int, int]) -> None:
    """The last write of a tile: its ``tile_done`` flag."""
    g = zarr.open_group(Path(path), mode="r+")
    _array(g, "tile_done")[tile[0], tile[1]] = 1


def finalise(path: str | Path) -> dict[str, Any]:
    """Once every tile is done: sum the tiles' storage error into the attributes and mark the store complete."""
    path = Path(path)
    g = zarr.open_group(path, mode="r+")
    done = np.asarray(_array(g, "tile_done")[:]).astype(bool)
    if not done.all():
        raise EmbeddingStoreError(
            f"{path}: {int((~done).sum())} tiles are not written yet; run with --resume"
        )
    summary = _error_summary(g)
    g.attrs.update({"storage_error": summary, "complete": True, "finished": _now()})
    return summary


def _error_summary(g: zarr.Group) -> dict[str, Any]:
    """The store's storage error: the tiles' ``tile_error`` stats summed (count, RMSE and max abs per feature)."""
    err = np.asarray(_array(g, "tile_error")[:])  # (ny, nx, stat, feature)
    count = err[:, :, 0].sum(axis=(0, 1))
    rmse = np.sqrt(err[:, :, 1].sum(axis=(0, 1)) / np.maximum(count, 1))
    return {
        "dtype": str(g.attrs["storage_dtype"]),
        "measured_on": "every valid pixel-date, decoded value minus the float32 model output",
        "n_values_per_feature": int(count[0]) if count.size else 0,
        "max_abs": [float(v) for v in err[:, :, 2].max(axis=(0, 1))],
        "rmse": [float(v) for v in rmse],
    }


# ----------------------------------------------------------------------------- growing (stembed embed --extend)
def refuse_mid_extension(path: str | Path, attrs: dict[str, Any]) -> None:
    """Refuse a store that ``stembed embed --extend`` has started to grow and not finished.

    Raises:
        EmbeddingStoreError: the store holds the journal ``extending``.
    """
    journal = attrs.get(EXTENDING_ATTR)
    if journal is not None:
        cube = journal.get("cube", "CUBE") if isinstance(journal, dict) else "CUBE"
        raise EmbeddingStoreError(
            f"{path} is mid-extension (`stembed embed --extend` with {cube} was interrupted, or is still running); "
            "fix: rerun the same `stembed embed --extend` command to finish it"
        )


def store_times(path: str | Path) -> np.ndarray:
    """The store's dates (its decoded ``time`` coordinate)."""
    with xr.open_zarr(Path(path), consolidated=False) as ds:
        return np.asarray(ds[TIME].values)


def begin_extension(path: str | Path, journal: dict[str, Any]) -> None:
    """Write the journal of an extension (attribute ``extending``) and mark the store incomplete: one write."""
    g = zarr.open_group(Path(path), mode="r+")
    g.attrs.update({EXTENDING_ATTR: journal, "complete": False})


def set_extension_step(path: str | Path, step: str) -> None:
    """Record the step an extension has reached in its journal."""
    g = zarr.open_group(Path(path), mode="r+")
    journal = g.attrs[EXTENDING_ATTR]
    if not isinstance(journal, dict):
        raise EmbeddingStoreError(f"{path}: its {EXTENDING_ATTR!r} attribute is {journal!r}; the store is damaged")
    g.attrs[EXTENDING_ATTR] = {**journal, "step": step}


def grow_time(path: str | Path, times: np.ndarray) -> None:
    """Grow every ``(time, ...)`` array and the ``time`` coordinate to ``times``; create or grow ``extension`` and
    ``extension_tile``; keep the tiles' error stats as ``tile_error_base``. Idempotent: a rerun gives the same store.
    """
    from xarray.coding.times import encode_cf_datetime

    g = zarr.open_group(Path(path), mode="r+")
    n = len(times)
    for name, arr in list(g.arrays()):
        if name != TIME and _dims(arr)[:1] == (TIME,) and arr.shape[0] != n:
            arr.resize((n, *arr.shape[1:]))
    coord = _array(g, TIME)
    nums, units, calendar = encode_cf_datetime(times, None, str(coord.attrs.get("calendar", "proleptic_gregorian")))
    coord.resize((n,))
    coord[:] = np.asarray(nums).astype(coord.dtype)
    coord.attrs.update({"units": units, "calendar": calendar})
    valid = _array(g, "valid")
    if EXTENSION_VAR not in g:
        g.create_array(
            EXTENSION_VAR, shape=valid.shape, dtype="uint8", chunks=valid.chunks, fill_value=0,
            dimension_names=(TIME, Y, X),
            attributes={"grid_mapping": "spatial_ref", "long_name": "which run wrote the pixel-date: 0 the first, "
                        "k the k-th `stembed embed --extend`"},
        )
    done = _array(g, "tile_done")
    if "extension_tile" not in g:
        g.create_array("extension_tile", shape=done.shape, dtype="uint8", chunks=done.chunks, fill_value=0,
                       dimension_names=("tile_y", "tile_x"),
                       attributes={"long_name": "the last extension that finished the tile"})
    err = _array(g, "tile_error")
    base = g.create_array("tile_error_base", shape=err.shape, dtype=err.dtype, chunks=err.shape, fill_value=0.0,
                          dimension_names=_dims(err), overwrite=True)
    base[...] = err[...]


def _dims(arr: zarr.Array) -> tuple[str | None, ...]:
    """An array's dimension names (zarr v3 metadata; none for v2)."""
    return tuple(getattr(arr.metadata, "dimension_names", None) or ())


def read_rows(path: str | Path, grid: TileGrid, tile: tuple[int, int], rows: slice) -> tuple[np.ndarray, ...]:
    """A tile's stored ``codes`` ``(rows, feature, h, w)``, ``valid`` and ``extension`` ``(rows, h, w)``."""
    g = zarr.open_group(Path(path), mode="r")
    ys, xs = grid.bounds(*tile)
    if "embedding" in g:
        codes = np.asarray(_array(g, "embedding")[rows, :, ys, xs])
    else:
        codes = np.stack([np.asarray(_array(g, feature_var(f))[rows, ys, xs]) for f in _features(g)], axis=1)
    return codes, np.asarray(_array(g, "valid")[rows, ys, xs]), np.asarray(_array(g, EXTENSION_VAR)[rows, ys, xs])


def write_rows(
    path: str | Path, grid: TileGrid, tile: tuple[int, int], first: int, codes: np.ndarray, valid: np.ndarray,
    extension: np.ndarray, error: np.ndarray,
) -> None:
    """A tile's rows from date ``first`` on (codes, valid, extension), and its error stats: those it had before the
    extension (``tile_error_base``) plus ``error``, the extension's (so a rerun of the tile adds them once)."""
    g = zarr.open_group(Path(path), mode="r+")
    ys, xs = grid.bounds(*tile)
    rows = slice(first, first + len(valid))
    if "embedding" in g:
        _array(g, "embedding")[rows, :, ys, xs] = codes
    else:
        for i, f in enumerate(_features(g)):
            _array(g, feature_var(f))[rows, ys, xs] = codes[:, i]
    _array(g, "valid")[rows, ys, xs] = valid
    _array(g, EXTENSION_VAR)[rows, ys, xs] = extension
    base = np.asarray(_array(g, "tile_error_base")[tile[0], tile[1]])
    total = base.copy()
    total[:2] += error[:2]  # count, sum of squares
    total[2] = np.maximum(base[2], error[2])  # max abs
    _array(g, "tile_error")[tile[0], tile[1]] = total


def mark_tile_extended(path: str | Path, tile: tuple[int, int], number: int) -> None:
    """The last write of a tile in extension ``number``."""
    g = zarr.open_group(Path(path), mode="r+")
    _array(g, "extension_tile")[tile[0], tile[1]] = number


def tiles_extended(path: str | Path, number: int) -> np.ndarray:
    """``(tile_y, tile_x)`` bool: the tiles extension ``number`` has finished."""
    g = zarr.open_group(Path(path), mode="r")
    return np.asarray(_array(g, "extension_tile")[:]) == number


def extension_counts(path: str | Path, number: int, n_dates: int) -> np.ndarray:
    """``(n_dates,)`` how many pixels of each of the first ``n_dates`` dates extension ``number`` wrote (read a time
    chunk at a time)."""
    ext = _array(zarr.open_group(Path(path), mode="r"), EXTENSION_VAR)
    step = ext.chunks[0]
    counts = [(np.asarray(ext[i : min(i + step, n_dates)]) == number).sum(axis=(1, 2)) for i in range(0, n_dates, step)]
    return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)


def finish_extension(path: str | Path, updates: dict[str, Any]) -> dict[str, Any]:
    """Close an extension: sum the storage error, drop ``tile_error_base`` and the journal, apply ``updates`` and mark
    the store complete (the attributes in one write); the storage-error summary."""
    g = zarr.open_group(Path(path), mode="r+")
    summary = _error_summary(g)
    if "tile_error_base" in g:
        del g["tile_error_base"]
    attrs = {k: v for k, v in dict(g.attrs).items() if k != EXTENDING_ATTR}
    g.attrs.put({**attrs, **updates, "storage_error": summary, "complete": True})
    return summary


def grid_mismatch(embeddings: xr.Dataset, obj: xr.Dataset | xr.DataArray, name: str) -> str | None:
    """Why ``obj`` (an S2 cube, labels) is not on the embedding store's y/x grid, or None if it is."""
    for dim in (Y, X):
        if dim not in obj.dims:
            return f"the {name} has no {dim!r} dimension (dims {tuple(obj.dims)})"
        a, b = embeddings[dim].values, obj[dim].values
        if a.shape != b.shape or not np.allclose(a, b, atol=1e-3):
            return (
                f"the {name}'s {dim} grid ({b.size} px from {b[0]:.1f}) differs from the embedding "
                f"store's ({a.size} px from {a[0]:.1f})"
            )
    return None


def open_embeddings(path: str | Path, *, allow_incomplete: bool = False, features: int | None = None) -> xr.Dataset:
    """Open an embedding store lazily (dask), with ``embedding`` decoded to float32 (NaN = missing).

    Returns a Dataset with ``embedding`` ``(time, feature, y, x)``, ``valid`` ``(time, y, x)`` and
    ``spatial_ref`` (and ``extension`` ``(time, y, x)`` in a store grown by ``stembed embed --extend``: which run
    wrote each pixel-date); the store's attributes are on the Dataset. ``features``: only the first that many, one of
    the sizes the store records as complete embeddings (its ``nested`` attribute; a store without one: all).

    Raises:
        EmbeddingStoreError: not an embedding store, an unfinished one (unless ``allow_incomplete``), one
            mid-extension (always), or a ``features`` that is not a complete embedding of it.
    """
    path = Path(path)
    attrs = read_attrs(path)
    refuse_mid_extension(path, attrs)
    if not attrs.get("complete") and not allow_incomplete:
        raise EmbeddingStoreError(
            f"{path} is an unfinished embedding run (some tiles are not written); "
            "fix: finish it with `stembed embed ... --resume`"
        )
    ds = xr.open_zarr(path, consolidated=False)
    names = [str(f) for f in attrs.get("features", [])]
    per_feature = [feature_var(f) for f in names]
    if "embedding" not in ds and all(v in ds for v in per_feature):  # float16/int8, CF-decoded by xarray
        emb = xr.concat([ds[v] for v in per_feature], dim=FEATURE).assign_coords({FEATURE: names})
        emb = emb.astype(np.float32).transpose(TIME, FEATURE, Y, X)
        ds = ds.drop_vars(per_feature)
    elif "embedding" in ds:
        emb = ds["embedding"]
        if "scale" in ds and str(attrs.get("storage_dtype")) != "float32":  # format /1
            emb = (emb * ds["scale"] + ds["offset"]).astype(np.float32)
            emb = emb.transpose(TIME, FEATURE, Y, X)
    else:
        raise EmbeddingStoreError(
            f"{path} has neither an 'embedding' variable nor one per feature ({per_feature}); it is damaged; "
            "fix: rerun `stembed embed ... --overwrite`"
        )
    emb.attrs = {"grid_mapping": "spatial_ref", "long_name": "fused embedding"}
    emb.encoding = {}
    out = ds.drop_vars([v for v in _BOOKKEEPING if v in ds.variables]).assign(embedding=emb)
    out = out.assign_coords({FEATURE: [str(f) for f in out[FEATURE].values]})
    out.attrs = attrs
    return out if features is None else prefix(out, features, path)


def nested_sizes(ds: xr.Dataset) -> list[int]:
    """The embedding sizes a store (or an opened one) holds as complete embeddings: its ``nested`` prefixes, or all
    of its features for a store written before nesting."""
    n = int(ds.sizes[FEATURE])
    nested = ds.attrs.get("nested")
    return [int(k) for k in nested if int(k) <= n] if nested else [n]


def prefix(ds: xr.Dataset, features: int, name: str | Path = "the store") -> xr.Dataset:
    """An opened store reduced to its first ``features`` features (a nested prefix); its ``nested`` attribute too.

    Raises:
        EmbeddingStoreError: ``features`` is not one of :func:`nested_sizes`.
    """
    sizes = nested_sizes(ds)
    if features not in sizes:
        raise EmbeddingStoreError(
            f"{name} holds complete embeddings of {sizes} features, not {features}; fix: pass --features "
            f"{' or '.join(map(str, sizes))}"
        )
    out = ds.isel({FEATURE: slice(0, features)})
    out.attrs = {**ds.attrs, "nested": [k for k in sizes if k <= features]}
    return out


@dataclass(frozen=True)
class ZarrEmbeddingStore:
    """The zarr embedding store at ``path`` as an :class:`~stembed.io.sinks.EmbeddingSink` (picklable: a path).

    :meth:`create` writes the empty store beside ``path`` (``creating_path``) and renames it into place, so
    a kill never leaves a half-created store at ``path``; ``path`` must not exist (an old store is the
    caller's to discard first).
    """

    path: str

    def create(self, **layout: Any) -> TileGrid:
        """:func:`create_store` aside, then renamed to ``path``; the tile grid."""
        creating = creating_path(self.path)
        grid = create_store(creating, **layout)
        creating.rename(self.path)
        return grid

    def tiles_done(self) -> np.ndarray:
        """``(tile_y, tile_x)`` bool: the tiles already marked done (:func:`tiles_done`)."""
        return tiles_done(self.path)

    def quantisation(self) -> Quantisation:
        """The store's dtype, scale and offset (:func:`store_quantisation`), for a resumed run."""
        return store_quantisation(self.path)

    def write_tile(
        self,
        grid: TileGrid,
        tile: tuple[int, int],
        codes: np.ndarray,
        valid: np.ndarray,
        error: np.ndarray,
        flag: np.ndarray | None = None,
    ) -> None:
        """One tile's region of every date and its storage-error stats (:func:`write_region`); not yet done."""
        write_region(self.path, grid, tile, codes, valid, error, flag)

    def mark_done(self, tile: tuple[int, int]) -> None:
        """The tile's last write, its done flag (:func:`mark_tile_done`)."""
        mark_tile_done(self.path, tile)

    def finalise(self) -> dict[str, Any]:
        """Sum the storage error and mark the store complete (:func:`finalise`); the summary."""
        return finalise(self.path)

    def read_rows(self, grid: TileGrid, tile: tuple[int, int], rows: slice) -> tuple[np.ndarray, ...]:
        """A tile's stored codes, valid and extension of ``rows`` (:func:`read_rows`)."""
        return read_rows(self.path, grid, tile, rows)

    def write_rows(
        self, grid: TileGrid, tile: tuple[int, int], first: int, codes: np.ndarray, valid: np.ndarray,
        extension: np.ndarray, error: np.ndarray,
    ) -> None:
        """A tile's rows from ``first`` on and its error stats (:func:`write_rows`); not yet marked."""
        write_rows(self.path, grid, tile, first, codes, valid, extension, error)

    def mark_extended(self, tile: tuple[int, int], number: int) -> None:
        """The tile's last write in extension ``number`` (:func:`mark_tile_extended`)."""
        mark_tile_extended(self.path, tile, number)

    def tiles_extended(self, number: int) -> np.ndarray:
        """The tiles extension ``number`` has finished (:func:`tiles_extended`)."""
        return tiles_extended(self.path, number)
