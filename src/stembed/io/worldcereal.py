"""Read a WorldCereal extraction folder (one 640 m x 640 m location) into a :class:`~stembed.io.cube.Scene`.

A location folder holds NetCDF files named ``<PRODUCT>_<res>_<location>_<epsg>_<start>_<end>.nc``:

* ``S2_L2A_10m_*``: B02 B03 B04 B08 (uint16 DN, 0 = no data) on the 10 m grid that becomes the cube grid;
* ``S2_L2A_20m_*``: B05 B06 B07 B8A B11 B12 and SCL on a 20 m grid nested exactly in the 10 m one
  (20 m pixel (i, j) = 10 m pixels (2i..2i+1, 2j..2j+1)), so it is upsampled by repeating each pixel 2x2;
* ``S1_GRD-ASCENDING_20m_*``: VV VH sigma0 in dB x 1e4 (int32, 0 = no data), GEE ``S1_GRD`` (ortho-corrected,
  not terrain-flattened: sigma0, not RTC gamma0), ascending orbits only, on the same 20 m grid;
* ``OUTPUT_POLY-*_10m_*`` (optional): LC / CT / IRR reference labels.

Files are opened with ``mask_and_scale=False``: the SCL variable carries an integer ``_FillValue`` with
``scale_factor=1``, which xarray's default CF decoding cannot handle. Scaling is done here.

Same-day acquisitions (two S2 granules or S1 slices with timestamps on one calendar day) are merged
into one date before preprocessing: each pixel takes the first acquisition of the day that is valid
there (for S2: not masked by SCL and all bands present), otherwise the first one; the merged date
keeps the first timestamp of the day.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from stembed.contract import CubeError, Scene, make_cube
from stembed.preprocess import SCL_MASKED_DEFAULT, merge_same_day, prepare_s1, prepare_s2
from stembed.sensors import S1, S2
from stembed.types import BAND, CUBE_DIMS, TIME, X, Y

SOURCE = "WorldCereal worldcereal-classification test resources"

_S2_10M_BANDS = ("B02", "B03", "B04", "B08")
_S2_20M_BANDS = ("B05", "B06", "B07", "B8A", "B11", "B12")
_DN_SCALE = 1e-4  # S2 DN -> reflectance, and S1 int -> dB
_BASELINE_04_START = np.datetime64("2022-01-25")  # from here on L2A DN carry BOA_ADD_OFFSET = -1000

# key -> (file pattern, what it holds, what the reader needs it for)
_FILES = {
    "s2_10m": ("S2_L2A_10m_*.nc", "S2 10 m file (B02, B03, B04, B08)", "the reader needs all 10 S2 bands"),
    "s2_20m": ("S2_L2A_20m_*.nc", "S2 20 m file (B05, B06, B07, B8A, B11, B12, SCL)",
               "the reader needs all 10 S2 bands and the SCL cloud mask"),
    "s1": ("S1_GRD-ASCENDING_20m_*.nc", "S1 GRD ascending file (VV, VH)", "the reader needs S1 VV and VH"),
}
_LABEL_PATTERN = "OUTPUT_POLY-*_10m_*.nc"


def shared_data_dir() -> Path:
    """The project's shared data folder: ``$STEMBED_SHARED_DATA``, else ``<repo>/../shared/data``."""
    env = os.environ.get("STEMBED_SHARED_DATA")
    if env:
        return Path(env)
    return (Path(__file__).resolve().parents[3] / ".." / "shared" / "data").resolve()


def read_worldcereal(
    location_dir: str | Path,
    *,
    masked_classes: Sequence[int] = SCL_MASKED_DEFAULT,
    min_valid_fraction: float = 0.03,
) -> Scene:
    """Read one WorldCereal location folder into a validated :class:`Scene` (S2 and S1 on their own dates).

    Args:
        location_dir: folder holding the location's NetCDF files.
        masked_classes: SCL classes set to NaN (0 = no data is always masked).
        min_valid_fraction: keep an S2 date only if this share of its values is valid.

    Raises:
        FileNotFoundError: the folder or a required file is missing (never zero-filled).
        CubeError: the files disagree (dates, grids) or the result breaks the cube contract.
    """
    folder = Path(location_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"WorldCereal location folder {folder} does not exist")
    paths = {key: _find(folder, *spec) for key, spec in _FILES.items()}
    label_paths = sorted(folder.glob(_LABEL_PATTERN))

    ds10, ds20, ds1 = (_load(paths[k]) for k in ("s2_10m", "s2_20m", "s1"))
    y, x = ds10[Y].values.astype(np.float64), ds10[X].values.astype(np.float64)
    _check_files(ds10, ds20, ds1, paths, y, x)
    crs = f"EPSG:{ds10.attrs['epsg']}"
    site = str(ds10.attrs.get("location_id", folder.name))
    coords = {Y: y, X: x}
    classes = sorted(set(masked_classes) | {0})
    base = {"source": SOURCE, "reader": "stembed.io.worldcereal.read_worldcereal", "location_id": site,
            "location_dir": str(folder)}

    s2, n_merged = _s2_cube(ds10, ds20, coords, classes, min_valid_fraction)
    s2_prov = base | {
        "files": _hashes([paths["s2_10m"], paths["s2_20m"]]),
        "product": "Sentinel-2 L2A (Sen2Cor) from Google Earth Engine; reflectance = DN * 1e-4 (processing "
        "baseline < 04.00, no BOA_ADD_OFFSET); 20 m bands and SCL repeated 2x2 onto the 10 m grid",
        "scl_masked_classes": classes,
        "min_valid_fraction": min_valid_fraction,
        "dates_in_file": int(ds10.sizes["timestamp"]),
        "dates_after_same_day_merge": n_merged,
        "dates_kept": int(s2.sizes[TIME]),
    }

    s1 = _s1_cube(ds1, coords)
    s1_prov = base | {
        "files": _hashes([paths["s1"]]),
        "product": "Sentinel-1 GRD sigma0 (not RTC gamma0), ascending orbits only, from Google Earth Engine "
        "S1_GRD; value * 1e-4 = dB, converted to linear power and repeated 2x2 onto the 10 m grid",
        "dates_in_file": int(ds1.sizes["timestamp"]),
        "dates": int(s1.sizes[TIME]),
    }
    scene = Scene(
        site=site,
        sensors={"s2": _cube(s2, "s2", site, crs, y, x, s2_prov), "s1": _cube(s1, "s1", site, crs, y, x, s1_prov)},
        labels=_read_labels(label_paths, y, x) if label_paths else None,
    )
    scene.validate()
    return scene


def _cube(
    da: xr.DataArray, sensor: str, site: str, crs: str, y: np.ndarray, x: np.ndarray, provenance: dict[str, Any]
) -> xr.DataArray:
    """``da`` as a contract cube of the location's grid."""
    return make_cube(da.values, times=da[TIME].values, bands=da[BAND].values, y=y, x=x, crs=crs, sensor=sensor,
                     site=site, provenance=provenance)


def _check_files(
    ds10: xr.Dataset, ds20: xr.Dataset, ds1: xr.Dataset, paths: dict[str, Path], y: np.ndarray, x: np.ndarray
) -> None:
    """The three files of a location agree (nested grids, the same S2 dates), predate baseline 04.00 and
    name their CRS.

    Raises:
        CubeError: they do not.
    """
    _check_nested(ds20, y, x, paths["s2_20m"].name)
    _check_nested(ds1, y, x, paths["s1"].name)
    if not np.array_equal(ds10["timestamp"].values, ds20["timestamp"].values):
        raise CubeError(
            f"{paths['s2_10m'].name} and {paths['s2_20m'].name} have different timestamps; "
            "this reader needs both S2 files from one extraction"
        )
    if (ds10["timestamp"].values >= _BASELINE_04_START).any():
        raise CubeError(
            f"{paths['s2_10m'].name} holds acquisitions from {_BASELINE_04_START} on (processing baseline "
            ">= 04.00), whose DN may carry BOA_ADD_OFFSET = -1000; this reader assumes older data: check the "
            "source collection"
        )
    if "epsg" not in ds10.attrs:
        raise CubeError(f"{paths['s2_10m'].name} has no 'epsg' attribute, so its CRS is unknown")


def _s2_cube(
    ds10: xr.Dataset, ds20: xr.Dataset, coords: dict[str, np.ndarray], classes: list[int], min_valid_fraction: float
) -> tuple[xr.DataArray, int]:
    """Sentinel-2 reflectance (time, band, y, x) and SCL on the 10 m grid, same-day merged, then prepared;
    with the number of dates after the merge."""
    bands = {b: _dn_to_reflectance(ds10[b].values) for b in _S2_10M_BANDS}
    bands |= {b: _upsample2(_dn_to_reflectance(ds20[b].values)) for b in _S2_20M_BANDS}
    reflectance = np.stack([bands[b] for b in S2.bands], axis=1)
    scl = _upsample2(ds20["SCL"].values)
    s2_times = ds10["timestamp"].values
    valid = ~np.isin(scl, classes) & np.isfinite(reflectance).all(axis=1)
    (reflectance, scl), s2_times = merge_same_day([reflectance, scl], s2_times, valid)
    s2 = prepare_s2(
        xr.DataArray(reflectance, dims=CUBE_DIMS, coords={TIME: s2_times, BAND: list(S2.bands), **coords}),
        xr.DataArray(scl, dims=(TIME, Y, X), coords={TIME: s2_times, **coords}),
        masked_classes=classes,
        min_valid_fraction=min_valid_fraction,
    )
    return s2, len(s2_times)


def _s1_cube(ds1: xr.Dataset, coords: dict[str, np.ndarray]) -> xr.DataArray:
    """Sentinel-1: dB -> linear power, upsampled, same-day merged, then prepared on its own dates."""
    linear = np.stack([_upsample2(_db_to_linear(ds1[b].values)) for b in S1.bands], axis=1)
    s1_times = ds1["timestamp"].values
    (linear,), s1_times = merge_same_day([linear], s1_times, np.isfinite(linear).all(axis=1))
    return prepare_s1(
        xr.DataArray(linear, dims=CUBE_DIMS, coords={TIME: s1_times, BAND: list(S1.bands), **coords})
    )


def _find(folder: Path, pattern: str, what: str, needs: str) -> Path:
    matches = sorted(folder.glob(pattern))
    if not matches:
        raise FileNotFoundError(
            f"{what} not found in {folder} (no file matching {pattern}); "
            f"this location cannot be read: {needs}"
        )
    if len(matches) > 1:
        raise CubeError(f"several files match {pattern} in {folder}: {[m.name for m in matches]}; keep one")
    return matches[0]


def _load(path: Path) -> xr.Dataset:
    """Open raw (unscaled, unmasked) and load into memory, closing the file."""
    with xr.open_dataset(path, mask_and_scale=False) as ds:
        return ds.load()


def _hashes(paths: Sequence[Path]) -> dict[str, str]:
    out = {}
    for p in paths:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[p.name] = h.hexdigest()
    return out


def _check_nested(ds: xr.Dataset, y10: np.ndarray, x10: np.ndarray, name: str) -> None:
    """A 20 m grid nests in the 10 m grid if each 20 m centre is the centre of a 2x2 block of 10 m pixels."""
    y20, x20 = ds[Y].values, ds[X].values
    ok = (
        y10.size == 2 * y20.size
        and x10.size == 2 * x20.size
        and np.allclose(y20, (y10[0::2] + y10[1::2]) / 2)
        and np.allclose(x20, (x10[0::2] + x10[1::2]) / 2)
    )
    if not ok:
        raise CubeError(
            f"the 20 m grid of {name} ({y20.size}x{x20.size} px) does not nest in the 10 m grid "
            f"({y10.size}x{x10.size} px): 2x2 repetition would misplace pixels; resample it onto the "
            "10 m grid instead"
        )


def _upsample2(a: np.ndarray) -> np.ndarray:
    """20 m -> 10 m by repeating each pixel 2x2 (exact for a nested grid, no interpolation)."""
    return np.repeat(np.repeat(a, 2, axis=-1), 2, axis=-2)


def _dn_to_reflectance(dn: np.ndarray) -> np.ndarray:
    return np.where(dn == 0, np.nan, dn.astype(np.float64) * _DN_SCALE).astype(np.float32)


def _db_to_linear(raw: np.ndarray) -> np.ndarray:
    return np.where(raw == 0, np.nan, 10.0 ** (raw.astype(np.float64) * _DN_SCALE / 10.0))


def _read_labels(paths: list[Path], y: np.ndarray, x: np.ndarray) -> xr.Dataset:
    if len(paths) > 1:
        raise CubeError(f"several label files match {_LABEL_PATTERN}: {[p.name for p in paths]}; keep one")
    ds = _load(paths[0])
    same_shape = ds.sizes.get(Y) == y.size and ds.sizes.get(X) == x.size
    if not (same_shape and np.allclose(ds[Y].values, y) and np.allclose(ds[X].values, x)):
        raise CubeError(f"{paths[0].name} is not on the S2 10 m grid; labels must share the cube grid")
    return xr.Dataset(
        {v: ((Y, X), ds[v].values) for v in ("LC", "CT") if v in ds},
        coords={Y: y, X: x},
        attrs={
            "source_file": paths[0].name,
            "description": "WorldCereal reference labels: LC land-cover code (11 = annual cropland, "
            "99 = unknown), CT crop-type code; 0 = no data",
            "nodata": 0,
        },
    )
