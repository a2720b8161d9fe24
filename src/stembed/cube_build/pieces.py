"""One *piece* of a period per sensor: its items loaded onto the grid (:mod:`stembed.io.stac_load`), turned
into prepared values (:mod:`stembed.preprocess`), and staged atomically as a small zarr store, so an
interrupted build resumes at the first unfinished piece.

* Sentinel-2 (:func:`s2_piece`): DN 0 = no data; the item's BOA offset added; reflectance = (DN + offset)
  * 1e-4; a cloud/shadow mask from the request's :class:`~stembed.preprocess.CloudMask`; BRDF nadir
  normalisation (:func:`item_c_factor`); same-day items merged (first valid item per pixel) and
  :func:`~stembed.preprocess.prepare_s2` masks, clips and drops dates under ``min_valid_fraction``.
* Sentinel-1 (:func:`s1_piece`): RTC gamma0 in linear power of the chosen orbit direction, nodata as NaN,
  same-day slices merged. ``prepare_s1`` runs later, on the whole S1 time axis (:mod:`stembed.cube_build.build`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from stembed.cube_build.request import CubeRequest
from stembed.errors import CubeBuildError
from stembed.geometry import GridSpec
from stembed.io.cube import write_atomically
from stembed.io.stac import Piece, item_epsg, sign_items
from stembed.io.stac_load import asset_key, fetch_granule_metadata, load_items
from stembed.preprocess import boa_add_offset, dn_to_reflectance, merge_same_day, prepare_s2
from stembed.preprocess.s2_radiometry import c_factor_on_grid
from stembed.sensors import S1, S2
from stembed.types import BAND, CUBE_DIMS, TIME, X, Y


def orbit_state(item: Any) -> str:
    """An S1 item's ``sat:orbit_state`` in lower case (``ascending``/``descending``), ``unknown`` if absent."""
    return str(item.properties.get("sat:orbit_state", "unknown")).lower()


def select_orbit(items: list[Any], orbit: str) -> list[Any]:
    """The S1 items of the ``orbit`` direction (all of them for ``both``)."""
    return items if orbit == "both" else [it for it in items if orbit_state(it) == orbit]


def piece_store(stage: Path, piece: Piece, sensor: str) -> Path:
    """Where one sensor's piece is staged: ``pieces/<START_END>_<sensor>.zarr`` under ``stage``."""
    return stage / "pieces" / f"{piece.name}_{sensor}.zarr"


def piece_done(stage: Path, piece: Piece, sensor: str) -> bool:
    """Whether the piece is staged already (written atomically, so it exists only complete), for a resume."""
    return piece_store(stage, piece, sensor).exists()


def build_piece(
    stage: Path, piece: Piece, sensor: str, items: list[Any], request: CubeRequest, session: Any
) -> None:
    """Load, prepare and stage one sensor's piece from its items (signed for the catalog first)."""
    items = sign_items(items, request.catalog)
    if sensor == "s2":
        values, meta = s2_piece(items, request, session, stage)
    else:
        values, meta = s1_piece(items, request)
    values = values.assign_coords({BAND: values[BAND].values.astype(object)})  # zarr v3 strings
    ds = xr.Dataset({"values": values}, attrs={"meta": json.dumps(meta, default=str), "piece": piece.name})
    path = piece_store(stage, piece, sensor)
    write_atomically(
        path, lambda tmp: ds.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False), overwrite=False
    )


def s2_piece(
    items: list[Any], request: CubeRequest, session: Any, stage: Path
) -> tuple[xr.DataArray, dict[str, Any]]:
    """One S2 piece: reflectance (BRDF-normalised if asked), cloud-masked, same-day merged, prepared; per-date metadata."""
    mask = request.cloud_mask
    keys = [asset_key(items[0], b) for b in S2.bands] if items else list(S2.bands)
    for it in items[1:]:
        if [asset_key(it, b) for b in S2.bands] != keys:
            raise CubeBuildError(f"item {it.id} names its band assets differently from {items[0].id}")
    if not items:
        return _empty_s2(request), {"dates": []}
    resampling = {"*": request.resampling} | {a: "nearest" for a in mask.assets}
    ds = load_items(
        items, [*keys, *mask.assets], request.grid, chunk_px=request.chunk_px, resampling=resampling,
        what=f"S2 assets of {len(items)} items",
    )
    dn = np.stack([ds[k].values for k in keys], axis=1)  # (time, band, y, x)
    offsets, sources = zip(*(boa_add_offset(it) for it in items), strict=True)
    refl, plain = _s2_reflectance(items, dn, offsets, request, session, stage)
    clear = np.asarray(mask.clear(plain, {a: ds[a].values for a in mask.assets}), dtype=bool)
    want = (len(items), request.grid.height_px, request.grid.width_px)
    if clear.shape != want:
        raise CubeBuildError(
            f"the cloud mask {mask.describe()} returned shape {clear.shape}, expected {want}"
        )

    times = np.array([naive(it.datetime) for it in items], dtype="datetime64[ns]")
    valid = clear & np.isfinite(refl).all(axis=1)
    flag = (~clear).astype(np.uint8)  # 1 = not clear, masked by prepare_s2 below
    (refl, flag), merged_times = merge_same_day([refl, flag], times, valid)
    coords = {TIME: merged_times, Y: request.grid.y, X: request.grid.x}
    prepared = prepare_s2(
        xr.DataArray(refl, dims=CUBE_DIMS, coords=coords | {BAND: list(S2.bands)}),
        xr.DataArray(flag, dims=(TIME, Y, X), coords=coords),
        masked_classes=(1,),
        min_valid_fraction=request.min_valid_fraction,
    )
    kept = set(pd.DatetimeIndex(prepared[TIME].values).normalize())
    dates = _s2_dates(items, times, merged_times, kept, offsets, sources)
    return prepared.astype(np.float32), {"dates": dates}


def _empty_s2(request: CubeRequest) -> xr.DataArray:
    """A piece without S2 items: no date, on the request's grid."""
    return xr.DataArray(
        np.zeros((0, S2.n_bands, request.grid.height_px, request.grid.width_px), np.float32),
        dims=CUBE_DIMS,
        coords={
            TIME: np.array([], "datetime64[ns]"),
            BAND: list(S2.bands),
            Y: request.grid.y,
            X: request.grid.x,
        },
    )


def _s2_reflectance(
    items: list[Any], dn: np.ndarray, offsets: tuple[float, ...], request: CubeRequest, session: Any, stage: Path,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(time, band, y, x)`` reflectance of each item (BRDF-normalised if asked), and without BRDF for a cloud
    mask that reads reflectance (else None)."""
    workdir = stage / "metadata"
    workdir.mkdir(exist_ok=True)
    refl = np.empty(dn.shape, np.float32)
    plain = np.empty(dn.shape, np.float32) if request.cloud_mask.needs_reflectance else None
    for i, it in enumerate(items):
        c = item_c_factor(it, request.grid, session, workdir) if request.brdf else None
        refl[i] = dn_to_reflectance(dn[i], boa_add_offset=offsets[i], c_factor=c)
        if plain is not None:
            plain[i] = dn_to_reflectance(dn[i], boa_add_offset=offsets[i])
    return refl, plain


def _s2_dates(
    items: list[Any], times: np.ndarray, merged_times: np.ndarray, kept: set[pd.Timestamp],
    offsets: tuple[float, ...], sources: tuple[str, ...],
) -> list[dict[str, Any]]:
    """Per merged date: whether it was kept, its items, their processing baselines and BOA offsets."""
    day_of = pd.DatetimeIndex(times).normalize()
    dates = []
    for day in pd.DatetimeIndex(merged_times).normalize():
        idx = np.flatnonzero(day_of == day)
        dates.append(
            {
                "date": str(day.date()),
                "kept": day in kept,
                "items": [items[i].id for i in idx],
                "processing_baseline": [items[i].properties.get("s2:processing_baseline") for i in idx],
                "boa_add_offset": [offsets[i] for i in idx],
                "offset_source": [sources[i] for i in idx],
            }
        )
    return dates


def s1_piece(items: list[Any], request: CubeRequest) -> tuple[xr.DataArray, dict[str, Any]]:
    """One S1 piece: linear gamma0 with nodata as NaN, same-day slices merged; with per-date metadata."""
    grid = request.grid
    if not items:
        empty = np.zeros((0, S1.n_bands, grid.height_px, grid.width_px), np.float32)
        return xr.DataArray(
            empty,
            dims=CUBE_DIMS,
            coords={TIME: np.array([], "datetime64[ns]"), BAND: list(S1.bands), Y: grid.y, X: grid.x},
        ), {"dates": []}
    keys = [asset_key(items[0], b) for b in S1.bands]
    ds = load_items(
        items, keys, grid, chunk_px=request.chunk_px, resampling={"*": request.resampling},
        what=f"S1 assets of {len(items)} items",
    )
    layers = []
    for k in keys:
        a = ds[k].values.astype(np.float32)
        nodata = ds[k].attrs.get("nodata")
        if nodata is not None and np.isfinite(float(nodata)):
            a = np.where(a == float(nodata), np.nan, a)
        layers.append(a)
    linear = np.stack(layers, axis=1)
    times = np.array([naive(it.datetime) for it in items], dtype="datetime64[ns]")
    (linear,), merged_times = merge_same_day([linear], times, np.all(np.isfinite(linear), axis=1))
    day_of = pd.DatetimeIndex(times).normalize()
    dates = []
    for day in pd.DatetimeIndex(merged_times).normalize():
        idx = np.flatnonzero(day_of == day)
        dates.append(
            {
                "date": str(day.date()),
                "items": [items[i].id for i in idx],
                "orbit_state": [orbit_state(items[i]) for i in idx],
            }
        )
    da = xr.DataArray(
        linear, dims=CUBE_DIMS, coords={TIME: merged_times, BAND: list(S1.bands), Y: grid.y, X: grid.x}
    )
    return da, {"dates": dates}


def read_pieces(
    stage: Path, pieces: list[Piece], sensor: str
) -> tuple[xr.DataArray | None, list[dict[str, Any]]]:
    """The staged pieces of one sensor concatenated in time (None if no dates) and their per-date metadata."""
    parts, meta = [], []
    for piece in pieces:
        ds = xr.open_zarr(piece_store(stage, piece, sensor), consolidated=False, chunks=None)
        meta.extend(json.loads(ds.attrs["meta"])["dates"])
        if ds.sizes[TIME]:
            da = ds["values"].load()
            parts.append(da.assign_coords({BAND: [str(b) for b in da[BAND].values]}))
    if not parts:
        return None, meta
    return xr.concat(parts, dim=TIME), meta


def item_c_factor(item: Any, grid: GridSpec, session: Any, workdir: Path) -> np.ndarray:
    """The BRDF c-factor (band, y, x) of one S2 item on ``grid``: its ``MTD_TL.xml`` fetched into ``workdir``
    (:mod:`stembed.io.stac_load`), then read and interpolated by :func:`~stembed.preprocess.s2_radiometry.c_factor_on_grid`."""
    local = fetch_granule_metadata(item, session, workdir)
    return c_factor_on_grid(local, grid, item_id=item.id, item_crs=lambda: f"EPSG:{item_epsg(item)}")


def naive(t: Any) -> np.datetime64:
    """A timestamp without its time zone (UTC), as numpy datetime64."""
    ts = pd.Timestamp(t)
    return (ts.tz_convert(None) if ts.tzinfo is not None else ts).to_datetime64()
