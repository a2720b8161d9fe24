"""Export an embedding store for GIS tools that do not read zarr v3 (no torch here).

Two routes: one GeoTIFF per date (:func:`export_geotiffs`), or one CF netCDF file for the whole
store (:func:`export_netcdf`) that GDAL, rasterio, QGIS and xarray open with its CRS and grid.

GeoTIFFs:
Each file holds the 7 features of one date as float32 bands (descriptions ``E1``..``E7``), NaN as
nodata, the store's CRS and transform, tiled and deflate-compressed. Files are named
``embedding_YYYY-MM-DD.tif``; when two dates of the store fall on one day, their names carry the
time too (``embedding_YYYY-MM-DDTHHMMSS.tif``), so names never collide.

Also home to the date handling the products share: :func:`select_dates` turns ISO dates into
store time indices, and :func:`date_labels` names each date for file names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from stembed.io.embeddings import EmbeddingStoreError, feature_var
from stembed.types import BAND, FEATURE, TIME, X, Y

_BLOCK_PX = 256  # GeoTIFF tile size
_N_NEAREST = 3  # dates suggested when a requested one is not in the store


def _days(times: np.ndarray) -> np.ndarray:
    return np.asarray(times, dtype="datetime64[ns]").astype("datetime64[D]")


def date_labels(times: np.ndarray) -> list[str]:
    """A unique label per time: ``YYYY-MM-DD``, or ``YYYY-MM-DDTHHMMSS`` where several times share a day."""
    days = _days(times)
    uniq, counts = np.unique(days, return_counts=True)
    shared = set(uniq[counts > 1].tolist())
    labels = []
    for t, d in zip(pd.DatetimeIndex(times), days, strict=True):
        labels.append(t.strftime("%Y-%m-%dT%H%M%S") if d.item() in shared else t.strftime("%Y-%m-%d"))
    if len(set(labels)) != len(labels):
        raise EmbeddingStoreError(
            "the store has two dates within one second; it is corrupt, fix: re-run `stembed embed`"
        )
    return labels


def select_dates(times: np.ndarray, dates: Sequence[str]) -> list[int]:
    """Indices into ``times`` of the requested ISO days (every time on that day), in time order.

    Raises:
        EmbeddingStoreError: a date does not parse, or the store has no date on that day (the
            message lists the nearest days it does have).
    """
    days = _days(times)
    avail = np.unique(days)
    picked: set[int] = set()
    for text in dates:
        try:
            day = np.datetime64(pd.Timestamp(str(text)).date(), "D")
        except ValueError as e:
            raise EmbeddingStoreError(f"{text!r} is not an ISO date; fix: write dates like 2021-06-03") from e
        hits = np.flatnonzero(days == day)
        if hits.size == 0:
            if avail.size == 0:
                raise EmbeddingStoreError(f"no date {text} in the store: it has no dates at all")
            nearest = avail[np.argsort(np.abs((avail - day).astype(np.int64)), kind="stable")[:_N_NEAREST]]
            near = ", ".join(str(d) for d in np.sort(nearest))
            raise EmbeddingStoreError(
                f"no date {day} in the embedding store; nearest available: {near} "
                f"(the store has {avail.size} dates from {avail[0]} to {avail[-1]}); fix: pick one of those"
            )
        picked.update(int(i) for i in hits)
    return sorted(picked)


def _date_raster(embeddings: xr.Dataset, i: int, crs: str, transform: list[float]) -> xr.DataArray:
    """One date's ``(band, y, x)`` float32 raster with CRS, transform, NaN nodata and band names."""
    from affine import Affine

    emb = embeddings["embedding"].isel({TIME: i}).transpose(FEATURE, Y, X)
    features = [str(f) for f in emb[FEATURE].values]
    da = xr.DataArray(
        np.asarray(emb.values, dtype=np.float32),
        dims=(BAND, Y, X),
        coords={BAND: np.arange(1, len(features) + 1), Y: emb[Y].values, X: emb[X].values},
        attrs={"long_name": tuple(features)},
    )
    da = da.rio.write_crs(crs).rio.write_transform(Affine.from_gdal(*transform))
    return da.rio.write_nodata(np.nan, encoded=False)


def _georef_attrs(embeddings: xr.Dataset) -> tuple[str, list[float]]:
    crs, transform = embeddings.attrs.get("crs"), embeddings.attrs.get("transform")
    if not crs or transform is None or len(transform) != 6:
        raise EmbeddingStoreError(
            "the embedding store has no 'crs'/'transform' attributes; fix: open it with open_embeddings"
        )
    return str(crs), [float(v) for v in transform]


def export_netcdf(
    embeddings: xr.Dataset,
    path: str | Path,
    *,
    dates: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the store (all dates, or the ISO ``dates``) as one CF-1.8 netCDF-4 file GDAL and QGIS open.

    Layout: one float32 variable per feature, named like the store's float16/int8 variables
    (``embedding_E1`` ... ``(time, y, x)``, NaN = missing, so GDAL shows each as a subdataset whose bands
    are the dates: ``NETCDF:"file.nc":embedding_E1``), ``valid`` ``(time, y, x)`` uint8, and a
    ``spatial_ref`` grid mapping with the CRS and GeoTransform. The store's attributes go in the
    global attribute ``stembed_attrs`` (JSON). Values are decoded, so int8/float16 stores export
    as the values they hold. Written beside ``path`` and renamed into place.

    Raises:
        EmbeddingStoreError: a date is not in the store, or the store lacks its CRS/transform.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    from affine import Affine

    path = Path(path)
    crs, transform = _georef_attrs(embeddings)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists; fix: pass overwrite=True (--overwrite) or choose another path"
        )
    times = embeddings[TIME].values
    ds = _netcdf_dataset(embeddings, list(range(len(times))) if dates is None else select_dates(times, dates))
    ds = ds.rio.write_crs(crs).rio.write_transform(Affine.from_gdal(*transform)).rio.write_coordinate_system()
    ds.attrs = {
        "Conventions": "CF-1.8",
        "title": "stembed per-date embeddings",
        "source": "stembed embed (exported by stembed export --format netcdf)",
        "features": " ".join(str(f) for f in embeddings[FEATURE].values),
        "stembed_attrs": json.dumps(embeddings.attrs, sort_keys=True, default=str),
    }
    cf = {"zlib": True, "complevel": 4, "grid_mapping": "spatial_ref"}  # GDAL finds the CRS through it
    encoding: dict[str, dict[str, object]] = {name: {"_FillValue": np.float32(np.nan), **cf}
                                              for name in ds.data_vars if name != "valid"}
    encoding["valid"] = dict(cf)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=encoding)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def _netcdf_dataset(embeddings: xr.Dataset, idx: list[int]) -> xr.Dataset:
    """The dates ``idx`` as float32 ``embedding_<feature>`` variables and ``valid`` uint8, each ``(time, y, x)``,
    without the store's encodings."""
    emb = embeddings["embedding"].isel({TIME: idx})
    data_vars = {}
    for f in (str(f) for f in emb[FEATURE].values):
        v = emb.sel({FEATURE: f}, drop=True).astype(np.float32).transpose(TIME, Y, X)
        v.attrs = {"long_name": f"fused embedding feature {f}"}
        data_vars[feature_var(f)] = v
    valid = embeddings["valid"].isel({TIME: idx}).astype(np.uint8).transpose(TIME, Y, X)
    valid.attrs = {"long_name": "pixel-date has an embedding", "flag_values": [0, 1],
                   "flag_meanings": "no_embedding embedding"}
    data_vars["valid"] = valid
    ds = xr.Dataset(data_vars).drop_vars("spatial_ref", errors="ignore")
    for name in ds.data_vars:
        ds[name].encoding = {}
    return ds


def export_geotiffs(
    embeddings: xr.Dataset,
    out_dir: str | Path,
    *,
    dates: Sequence[str] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write one 7-band float32 GeoTIFF per date of ``embeddings`` (all dates, or the ISO ``dates``).

    Every target name is checked before anything is written, so a refused run leaves no partial
    export; each file is written beside its target and renamed into place.

    Args:
        embeddings: a store from :func:`stembed.io.embeddings.open_embeddings`.
        out_dir: folder for the files (created if needed).
        dates: ISO days to export; each must be in the store. None exports every date.
        overwrite: replace existing files of the same name.

    Returns:
        The written paths, in time order.

    Raises:
        EmbeddingStoreError: a date is not in the store, or the store lacks its CRS/transform.
        FileExistsError: a target file exists and ``overwrite`` is False.
    """
    import rioxarray  # noqa: F401  (registers the .rio accessor)

    out_dir = Path(out_dir)
    crs, transform = _georef_attrs(embeddings)
    times = embeddings[TIME].values
    idx = list(range(len(times))) if dates is None else select_dates(times, dates)
    labels = date_labels(times)
    targets = [(i, out_dir / f"embedding_{labels[i]}.tif") for i in idx]
    existing = [p for _, p in targets if p.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        shown = ", ".join(str(p) for p in existing[:3]) + more
        raise FileExistsError(
            f"{len(existing)} GeoTIFF(s) already exist: {shown}; fix: pass overwrite=True (--overwrite) "
            "or choose another output folder"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, path in targets:
        raster = _date_raster(embeddings, i, crs, transform)
        tmp = path.with_name(f".{path.name}.partial")
        raster.rio.to_raster(
            tmp, driver="GTiff", dtype="float32", tiled=True, blockxsize=_BLOCK_PX, blockysize=_BLOCK_PX,
            compress="deflate", predictor=3,
        )
        os.replace(tmp, path)
        written.append(path)
    return written
