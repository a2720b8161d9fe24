"""The cube contract: the one form in which imagery crosses module boundaries.

A *cube* is one ``xr.DataArray`` holding one sensor's model-ready time series on one 10 m grid:

* **dims**: exactly ``("time", "band", "y", "x")`` (:data:`stembed.types.CUBE_DIMS`).
* **band**: the sensor's band names in the fixed order of ``SensorSpec.bands``
  (S2: ``B02 B03 B04 B05 B06 B07 B08 B8A B11 B12``; S1: ``VV VH``).
* **values**: float32, normalised as the :class:`~stembed.sensors.SensorSpec` says, so every finite
  value lies in ``valid_range`` ([0, 1]); NaN = missing (cloud, shadow, no data).
* **time**: datetime64[ns], strictly increasing (sorted, no duplicates).
* **y, x**: pixel-centre coordinates in metres of a projected CRS; ``x`` increases, ``y``
  decreases, regular spacing of ``resolution_m`` (10 m).
* **attrs**:

  - ``crs``: a pyproj-parseable string such as ``"EPSG:32631"``;
  - (no ``transform`` attribute: rioxarray reads one as an Affine-order matrix; the grid's affine is
    :func:`cube_transform` of the coordinates, and stores carry it in ``spatial_ref``, below);
  - ``sensor``: ``"s1"``, ``"s2"`` or a registered companion sensor (e.g. ``"agera5"``, see
    :mod:`stembed.sensors`);
  - ``site``: a string id;
  - ``provenance``: a JSON string holding a dict that says where the data came from.

Georeferencing follows the CF convention rioxarray, GDAL and odc-geo read: a scalar ``spatial_ref``
coordinate holding the CRS (``crs_wkt``) and the GDAL-order ``GeoTransform`` of the cube's outer
corner (:func:`with_georef` writes it; :func:`make_cube` and :func:`open_cube` return cubes that
carry it), so ``cube.rio.to_raster(path)`` places a cube right. Stores always get a ``spatial_ref``
rebuilt from the ``x``/``y`` coordinates, so a cropped cube (whose ``spatial_ref`` still describes the
uncropped grid) is stored right; rioxarray itself recomputes the transform from the coordinates when
it writes a raster. Stores written before this convention carry a GDAL-order ``transform``
attribute instead: they still open (the attribute is checked against the coordinates, replaced by
``spatial_ref``, and a :class:`LegacyStoreWarning` says how to rewrite the store).

Optional: an S1 cube put on the S2 dates by :func:`stembed.preprocess.match_s1_to_s2` carries an
``s1_time`` coordinate along ``time`` (the S1 acquisition used, NaT where none was close enough).

A :class:`Scene` pairs an S2 cube on its own (valid) dates with an S1 cube on *its own* dates,
both normalised and on the same grid (same CRS, same y/x). Matching S1 to the S2 dates happens
later, in the data pipeline, so the S1 temporal smoothing always runs on the S1 time axis.
The scene keys its cubes by sensor name (``Scene.sensors``: s2, s1, then companions); ``Scene.extra``
(the companion-sensor cubes) follow the same rules: each on its own dates, on the S2 grid (see
:class:`stembed.sensors.SensorPlugin`).

:func:`validate_cube` checks every rule above and names, for each violation, the problem and the
fix. Stores (zarr) are :mod:`stembed.io.cube`'s; this module holds the rules only, so ``preprocess`` and
``io`` both build on it without importing each other.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyproj
import xarray as xr

from stembed.errors import UserError
from stembed.sensors import (
    ANCHOR,
    CORE_SENSORS,
    PAIRED,
    SCENE_SENSORS,
    SENSORS,
    SensorSpec,
    companions,
    load_builtin_plugins,
)
from stembed.types import BAND, CUBE_DIMS, TIME, X, Y

COORD_TOL_M = 1e-3  # coordinates and transforms agree if within a millimetre
_S2_DN_MAX = 1.5  # S2 reflectance never gets this high; larger maxima are digital numbers


class CubeError(UserError):
    """A cube, cube pair or cube store that breaks the contract; the message names the problem and the fix."""


# ----------------------------------------------------------------------------- construction
def make_cube(
    values: Any,
    *,
    times: Any,
    bands: Iterable[str],  # a list, or the band coordinate's values
    y: Any,
    x: Any,
    crs: str,
    sensor: str,
    site: str,
    provenance: dict[str, Any] | None = None,
) -> xr.DataArray:
    """Build a contract cube from a ``(time, band, y, x)`` array; ``transform`` is derived from ``y``/``x``.

    Values are cast to float32 but not otherwise touched: normalise first (see :mod:`stembed.preprocess`).
    """
    da = xr.DataArray(
        np.asarray(values, dtype=np.float32),
        dims=CUBE_DIMS,
        coords={
            TIME: np.asarray(pd.DatetimeIndex(times), dtype="datetime64[ns]"),
            BAND: [str(b) for b in bands],
            Y: np.asarray(y, dtype=np.float64),
            X: np.asarray(x, dtype=np.float64),
        },
        name=sensor,
        attrs={
            "crs": str(crs),
            "sensor": sensor,
            "site": str(site),
            "provenance": provenance_json(provenance or {}),
        },
    )
    if _parse_crs(str(crs)) is None:
        return da  # no spatial_ref to write; validate_cube names the bad crs and its fix
    return with_georef(da)


def with_georef(da: xr.DataArray) -> xr.DataArray:
    """``da`` with a CF ``spatial_ref`` coordinate for its ``crs`` attribute and its x/y grid.

    The GeoTransform is rebuilt from the coordinates (:func:`cube_transform`), so this also refreshes
    the ``spatial_ref`` of a cropped cube. A legacy GDAL-order ``transform`` attribute is dropped
    (rioxarray would read it in Affine order and misplace the cube). ``attrs['crs']`` is kept.
    """
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    from affine import Affine

    crs = da.attrs.get("crs")
    parsed = _parse_crs(crs) if isinstance(crs, str) else None
    if parsed is None:
        raise CubeError(
            f"cannot georeference: crs attribute {crs!r} is not a CRS; fix: cube.attrs['crs'] = 'EPSG:<code>'"
        )
    attrs = {k: v for k, v in da.attrs.items() if k not in ("transform", "grid_mapping")}
    out = da.drop_vars("spatial_ref", errors="ignore")
    out.attrs = {}
    out = out.rio.write_crs(parsed.to_wkt()).rio.write_transform(Affine.from_gdal(*cube_transform(da)))
    out.attrs = attrs
    return out


def provenance_json(provenance: dict[str, Any]) -> str:
    """Serialise a provenance dict the way cubes store it (sorted keys; numpy values become plain JSON)."""
    return json.dumps(provenance, sort_keys=True, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"provenance value {obj!r} ({type(obj).__name__}) is not JSON-serialisable")


def cube_transform(da: xr.DataArray) -> tuple[float, ...]:
    """GDAL-order affine ``(x_left, dx, 0, y_top, 0, dy)`` implied by the pixel-centre coordinates.

    A single-pixel axis has no spacing to read, so it takes the contract's 10 m.
    """
    x = np.asarray(da[X].values, dtype=np.float64)
    y = np.asarray(da[Y].values, dtype=np.float64)
    if x.size == 0 or y.size == 0:
        raise CubeError(f"cube has an empty grid ({y.size}x{x.size} px); a cube needs at least one pixel")
    dx = float(x[1] - x[0]) if x.size > 1 else 10.0
    dy = float(y[1] - y[0]) if y.size > 1 else -10.0
    return (float(x[0] - dx / 2), dx, 0.0, float(y[0] - dy / 2), 0.0, dy)


# ----------------------------------------------------------------------------- validation
def validate_cube(
    da: xr.DataArray,
    spec: SensorSpec,
    *,
    min_dates: int | None = None,
    patch_px: int | None = None,
    check_values: bool = True,
) -> None:
    """Check ``da`` against the cube contract for ``spec``.

    Structural problems (not a DataArray, wrong dims) are raised at once; all other violations are
    collected and raised together, one line each, so a user fixes everything in one pass.

    Args:
        da: the cube.
        spec: the sensor it should hold.
        min_dates: if given, the cube must have at least this many dates (a training window).
        patch_px: if given, the grid must be at least ``patch_px`` pixels in y and x.
        check_values: check dtype and value range, which reads every value. Tiled readers that must
            not load a whole cube pass False and check each tile with :func:`value_problems`.

    Raises:
        CubeError: naming each problem and its fix.
    """
    if not isinstance(da, xr.DataArray):
        hint = "build one with make_cube"
        if isinstance(da, xr.Dataset):
            hint = f"pick the variable: ds[{spec.name!r}]"
        raise CubeError(f"expected an xarray.DataArray cube, got {type(da).__name__}; fix: {hint}")
    if tuple(da.dims) != CUBE_DIMS:
        if set(da.dims) == set(CUBE_DIMS):
            fix = f"cube.transpose{CUBE_DIMS}"
        else:
            fix = "rename the dims (cube.rename(...)); stack band variables with ds.to_dataarray('band')"
        raise CubeError(f"cube dims are {tuple(da.dims)}, expected {CUBE_DIMS} in that order; fix: {fix}")
    missing_coords = [c for c in CUBE_DIMS if c not in da.coords]
    if missing_coords:
        raise CubeError(
            f"cube has no coordinate for {missing_coords}; fix: cube.assign_coords(...) "
            "(time = acquisition datetimes, band = band names, y/x = pixel centres in metres)"
        )
    problems = [
        *_band_problems(da, spec),
        *(value_problems(da, spec) if check_values else []),
        *_time_problems(da, min_dates),
        *_grid_problems(da, spec, patch_px),
        *_attr_problems(da, spec),
    ]
    if problems:
        site = da.attrs.get("site", "?")
        listing = "\n".join(f"- {p}" for p in problems)
        raise CubeError(f"{spec.name} cube (site {site}) breaks the cube contract:\n{listing}")


def _band_problems(da: xr.DataArray, spec: SensorSpec) -> list[str]:
    bands = [str(b) for b in da[BAND].values]
    expected = list(spec.bands)
    dups = sorted({b for b in bands if bands.count(b) > 1})
    missing = [b for b in expected if b not in bands]
    extra = [b for b in bands if b not in expected]
    out = []
    if dups:
        out.append(f"duplicate bands {dups}; fix: keep one of each, e.g. cube.sel(band={expected})")
    if missing:
        out.append(
            f"missing bands {missing}: a {spec.name} cube needs all of {expected}; "
            "fix: read or compute the missing bands (the model takes every band)"
        )
    if extra:
        out.append(f"extra bands {extra} not in the {spec.name} band set; fix: cube.sel(band={expected})")
    if not (dups or missing or extra) and bands != expected:
        out.append(f"bands are in the order {bands}, expected {expected}; fix: cube.sel(band={expected})")
    return out


def value_problems(da: xr.DataArray, spec: SensorSpec, *, allow_all_nan: bool = False) -> list[str]:
    """Dtype and value-range violations of ``da`` (any part of a cube), one line each with its fix.

    ``allow_all_nan``: ``da`` is a part of a cube (a tile and its halo), where no observation at
    all is data (a swath edge, a water mask), not a broken contract; a whole cube must hold some.
    """
    out = []
    if da.dtype != np.float32:
        out.append(f"dtype is {da.dtype}, expected float32; fix: normalise, then cube.astype('float32')")
    if not np.issubdtype(da.dtype, np.number) or da.size == 0:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN reductions
        vmin, vmax = float(da.min()), float(da.max())
        if np.isinf(vmin) or np.isinf(vmax):
            out.append(
                "the cube holds infinite values; fix: make missing values NaN: cube.where(np.isfinite(cube))"
            )
            finite = da.where(np.isfinite(da))
            vmin, vmax = float(finite.min()), float(finite.max())
    if np.isnan(vmin):
        if not allow_all_nan:
            out.append("every value is NaN, so the cube holds no data; fix: check the masking and the period")
        return out
    lo, hi = spec.valid_range
    if lo <= vmin and vmax <= hi:
        return out
    found = f"values range over [{vmin:.4g}, {vmax:.4g}], outside the valid range [{lo:g}, {hi:g}]"
    if spec.name == "s2" and vmax > _S2_DN_MAX:
        fix = (
            "this looks like digital numbers (DN), not reflectance; fix: multiply by 1e-4 (for processing "
            "baseline >= 04.00 first add BOA_ADD_OFFSET, i.e. (DN - 1000) * 1e-4), then run "
            "stembed.preprocess.prepare_s2"
        )
    elif spec.name == "s2":
        fix = "fix: clip reflectance to [0, 1] (stembed.preprocess.prepare_s2 does this)"
    elif spec.name == "s1":
        fix = (
            "this looks like dB or linear power, not normalised backscatter; fix: run "
            "stembed.preprocess.prepare_s1 on linear power (from dB: 10 ** (dB / 10))"
        )
    else:
        fix = f"fix: normalise as the sensor spec says: {spec.normalisation}"
    out.append(f"{found}; {fix}")
    return out


def _time_problems(da: xr.DataArray, min_dates: int | None) -> list[str]:
    t = da[TIME]
    n = t.size
    out = []
    if n == 0:
        out.append("the cube has no dates; fix: check the period read and the date filters")
    if not np.issubdtype(t.dtype, np.datetime64):
        out.append(
            f"time coordinate has dtype {t.dtype}, expected datetime64[ns]; "
            "fix: cube.assign_coords(time=pd.to_datetime(cube.time.values))"
        )
        return out
    if t.dtype != np.dtype("datetime64[ns]"):
        out.append(
            f"time coordinate has dtype {t.dtype}, expected datetime64[ns]; "
            "fix: cube.assign_coords(time=cube.time.values.astype('datetime64[ns]'))"
        )
    idx = pd.DatetimeIndex(t.values)
    if idx.hasnans:
        out.append("time coordinate holds NaT; fix: drop those dates (cube.sel(time=cube.time.notnull()))")
    dups = idx[idx.duplicated()].unique()
    if len(dups):
        more = " ..." if len(dups) > 5 else ""
        out.append(
            f"duplicate times {[str(d) for d in dups[:5]]}{more}; fix: merge or drop them, "
            "e.g. cube.isel(time=~cube.get_index('time').duplicated())"
        )
    if not idx.is_monotonic_increasing:
        out.append("times are not sorted; fix: cube.sortby('time')")
    if min_dates is not None and n < min_dates:
        out.append(f"a window needs {min_dates} dates; the cube has {n}; fix: extend the period")
    if "s1_time" in da.coords:
        s1t = da.coords["s1_time"]
        if s1t.dims != (TIME,) or not np.issubdtype(s1t.dtype, np.datetime64):
            out.append(
                f"s1_time must be a datetime64 coordinate along time, got dims {s1t.dims} and dtype "
                f"{s1t.dtype}; fix: build matched S1 cubes with stembed.preprocess.match_s1_to_s2"
            )
    return out


def _grid_problems(da: xr.DataArray, spec: SensorSpec, patch_px: int | None) -> list[str]:
    out = []
    res = spec.resolution_m
    for name, sign, word, sort_fix in ((X, 1, "increase", "cube.sortby('x')"),
                                       (Y, -1, "decrease", "cube.sortby('y', ascending=False)")):
        c = da[name].values
        if not np.issubdtype(c.dtype, np.number):
            out.append(f"{name} coordinate has dtype {c.dtype}; fix: use pixel-centre coordinates in metres")
            continue
        if c.size < 2:
            continue
        steps = np.diff(c.astype(np.float64)) * sign
        if np.all(steps < 0):
            out.append(f"{name} coordinate does not {word} (west to east / north to south); fix: {sort_fix}")
        elif not np.allclose(steps, res, rtol=0, atol=COORD_TOL_M):
            uniq = np.unique(np.round(np.abs(steps), 3))
            regular = uniq.size == 1 and np.all(steps > 0)
            what = f"{uniq[0]:g} m" if regular else f"irregular (steps {uniq[:5].tolist()} m)"
            out.append(
                f"{name} spacing is {what}, expected a regular {res:g} m; fix: resample onto a regular "
                f"{res:g} m grid (e.g. rioxarray: cube.rio.reproject(crs, resolution={res:g}))"
            )
    ny, nx = da.sizes[Y], da.sizes[X]
    if patch_px is not None and (ny < patch_px or nx < patch_px):
        out.append(f"cube is {ny}x{nx} px, smaller than a {patch_px}x{patch_px} patch; fix: enlarge the area")
    return out


def _attr_problems(da: xr.DataArray, spec: SensorSpec) -> list[str]:
    out = []
    crs = da.attrs.get("crs")
    if crs is None:
        out.append("no 'crs' attribute; fix: cube.attrs['crs'] = 'EPSG:<code>' (the projected CRS of x/y)")
    elif not isinstance(crs, str):
        out.append(
            f"crs attribute is a {type(crs).__name__}, expected a string; "
            "fix: cube.attrs['crs'] = 'EPSG:<code>'"
        )
    parsed = _parse_crs(crs) if isinstance(crs, str) else None
    if isinstance(crs, str):
        if parsed is None:
            out.append(f"crs {crs!r} cannot be parsed by pyproj; fix: use a string such as 'EPSG:32631'")
        elif not parsed.is_projected:
            out.append(f"crs {crs!r} is not projected (x/y must be metres); fix: reproject to the UTM zone")
    out.extend(georef_problems(da, parsed if isinstance(crs, str) else None))
    sensor = da.attrs.get("sensor")
    if sensor != spec.name:
        out.append(
            f"attrs['sensor'] is {sensor!r} but the cube is checked as {spec.name!r}; fix: check the sensor, "
            f"then cube.attrs['sensor'] = {spec.name!r}"
        )
    site = da.attrs.get("site")
    if not isinstance(site, str) or not site:
        out.append(f"attrs['site'] is {site!r}, expected a non-empty string; fix: cube.attrs['site'] = 'id'")
    prov = da.attrs.get("provenance")
    try:
        ok = isinstance(prov, str) and isinstance(json.loads(prov), dict)
    except json.JSONDecodeError:
        ok = False
    if not ok:
        out.append(
            "attrs['provenance'] must be a JSON string holding a dict; "
            "fix: cube.attrs['provenance'] = stembed.contract.provenance_json({...where the data came from})"
        )
    return out


def georef_problems(da: xr.DataArray, crs: pyproj.CRS | None) -> list[str]:
    """A legacy ``transform`` attribute must match the grid; a ``spatial_ref`` must name the cube's CRS."""
    out = []
    fix = "fix: cube = stembed.contract.with_georef(cube)"
    transform = da.attrs.get("transform")
    if transform is not None:
        try:
            t = np.asarray(transform, dtype=np.float64)
        except (TypeError, ValueError):
            t = np.empty(0)
        expected = cube_transform(da)
        if t.shape != (6,):
            out.append(f"transform {transform!r} is not 6 numbers (GDAL order); {fix}")
        elif not np.allclose(t, expected, rtol=0, atol=COORD_TOL_M):
            out.append(
                f"transform {t.tolist()} does not match the x/y coordinates, which imply "
                f"{list(expected)}; {fix}"
            )
    if "spatial_ref" in da.coords and crs is not None:
        wkt = da.coords["spatial_ref"].attrs.get("crs_wkt")
        ref = _parse_crs(wkt) if isinstance(wkt, str) else None
        if ref is None or ref != crs:
            out.append(f"the spatial_ref coordinate's CRS is not attrs['crs'] ({da.attrs.get('crs')}); {fix}")
    return out


def _parse_crs(crs: str) -> pyproj.CRS | None:
    try:
        return pyproj.CRS.from_user_input(crs)
    except pyproj.exceptions.CRSError:
        return None


def validate_pair(s1: xr.DataArray, s2: xr.DataArray) -> None:
    """Check that an S1 and an S2 cube share one grid (CRS, size and pixel coordinates).

    Raises:
        CubeError: naming the mismatch (CRS, shape or offset) and the fix.
    """
    for cube, name in ((s1, "s1"), (s2, "s2")):
        if not isinstance(cube, xr.DataArray):
            raise CubeError(f"validate_pair got a {type(cube).__name__} for {name}, expected a DataArray")
        if cube.attrs.get("sensor") != name:
            raise CubeError(
                f"the {name} argument has attrs['sensor'] = {cube.attrs.get('sensor')!r}; "
                "fix: call validate_pair(s1, s2) with the S1 cube first"
            )
    _check_on_s2_grid(s1, s2, "S1", "s1")


def _check_on_s2_grid(cube: xr.DataArray, s2: xr.DataArray, label: str, var: str) -> None:
    """``cube`` (an S1 or companion cube, called ``label`` in messages) shares the S2 grid and site."""
    fix = f"fix: reproject/resample {label} onto the S2 grid (e.g. rioxarray: {var}.rio.reproject_match(s2))"
    c1, c2 = _parse_crs(str(cube.attrs.get("crs"))), _parse_crs(str(s2.attrs.get("crs")))
    if c1 is None or c2 is None or c1 != c2:
        raise CubeError(
            f"{label} and S2 differ in CRS: {cube.attrs.get('crs')} vs {s2.attrs.get('crs')}; {fix}"
        )
    shape1, shape2 = (cube.sizes[Y], cube.sizes[X]), (s2.sizes[Y], s2.sizes[X])
    if shape1 != shape2:
        raise CubeError(
            f"{label} grid is {shape1[0]}x{shape1[1]} px but S2 is {shape2[0]}x{shape2[1]} px; {fix}"
        )
    dx = cube[X].values.astype(np.float64) - s2[X].values
    dy = cube[Y].values.astype(np.float64) - s2[Y].values
    if not (np.allclose(dx, 0, atol=COORD_TOL_M) and np.allclose(dy, 0, atol=COORD_TOL_M)):
        if np.ptp(dx) < COORD_TOL_M and np.ptp(dy) < COORD_TOL_M:
            raise CubeError(f"{label} grid is offset by ({dx[0]:g}, {dy[0]:g}) m (dx, dy) from S2; {fix}")
        raise CubeError(f"{label} and S2 have different x/y pixel coordinates (not a constant offset); {fix}")
    if cube.attrs.get("site") != s2.attrs.get("site"):
        raise CubeError(
            f"{label} is from site {cube.attrs.get('site')!r} but S2 from site {s2.attrs.get('site')!r}; "
            "fix: pair the cubes of one site"
        )


def _refuse_core_sensor(name: str) -> None:
    """Refuse s1/s2 among the companion cubes (``Scene.extra``): they are the scene's own cubes."""
    if name in CORE_SENSORS:
        raise CubeError(
            f"Scene.extra holds a {name!r} cube, but s1/s2 are the scene's own cubes; "
            f"fix: pass it as Scene(site, sensors={{{name!r}: ...}}), keep only companion sensors in extra"
        )


def validate_extra(name: str, cube: xr.DataArray, s2: xr.DataArray, *, check_values: bool = True) -> None:
    """Check a companion-sensor cube: the contract of its registered spec, and the S2 grid and site.

    Raises:
        CubeError: the sensor is unknown or reserved, or the cube breaks the contract or sits off the S2 grid.
    """
    _refuse_core_sensor(name)
    if name not in SENSORS:
        load_builtin_plugins()
    if name not in SENSORS:
        raise CubeError(
            f"Scene.extra holds a {name!r} cube but no sensor of that name is registered "
            f"(known: {sorted(SENSORS)}); "
            "fix: import the module that registers it (e.g. import stembed.io.agera5), which calls "
            "stembed.sensors.register_sensor"
        )
    if not isinstance(cube, xr.DataArray):
        raise CubeError(f"Scene.extra[{name!r}] is a {type(cube).__name__}, expected a DataArray cube")
    validate_cube(cube, SENSORS[name], check_values=check_values)
    _check_on_s2_grid(cube, s2, name, name)


@dataclass(frozen=True, eq=False)
class Scene:
    """One site: its cubes keyed by sensor name, each on its own dates, all on the S2 grid.

    ``sensors`` holds ``s2`` (the anchor: its valid dates and its grid), ``s1`` (required, on ITS OWN
    dates) and any companion sensors, kept in that order (s2, s1, then the companions as given).
    The cubes are normalised (``eq=False``: scenes compare by identity, as DataArrays have no
    single truth value). S1 is deliberately not matched to the S2 dates here: stage-1 training
    uses each sensor on its own time axis, and fusion matches later (``preprocess.match_s1_to_s2``);
    companions are put on the S2 dates by ``data.build.matched_arrays``. ``labels`` (optional) holds
    per-pixel reference layers on the same y/x grid. The read-only properties ``s2``, ``s1`` and
    ``extra`` (the companions only) name the cubes; :meth:`from_cubes` takes them as separate arguments.
    """

    site: str
    sensors: Mapping[str, xr.DataArray]
    labels: xr.Dataset | None = None

    def __post_init__(self) -> None:
        """Check that ``sensors`` maps names to cubes with s2 and s1, and fix its order (s2, s1, companions)."""
        if not isinstance(self.sensors, Mapping):
            raise CubeError(
                f"Scene.sensors is a {type(self.sensors).__name__}; fix: pass a dict sensor name -> cube"
            )
        missing = [k for k in SCENE_SENSORS if k not in self.sensors]
        if missing:
            raise CubeError(
                f"Scene.sensors has no {' or '.join(missing)} cube (it has {sorted(self.sensors)}); "
                "fix: pass Scene(site, sensors={'s2': s2, 's1': s1, ...})"
            )
        ordered = {k: self.sensors[k] for k in (*SCENE_SENSORS, *companions(self.sensors))}
        object.__setattr__(self, "sensors", ordered)

    @classmethod
    def from_cubes(
        cls,
        site: str,
        s2: xr.DataArray,
        s1: xr.DataArray,
        labels: xr.Dataset | None = None,
        extra: Mapping[str, xr.DataArray] | None = None,
    ) -> Scene:
        """The scene of separate S2, S1 and companion cubes (the former ``Scene(site, s2, s1, labels, extra)``)."""
        extra = {} if extra is None else extra
        if not isinstance(extra, Mapping):
            raise CubeError(f"Scene.extra is a {type(extra).__name__}; fix: pass a dict sensor name -> cube")
        for name in extra:
            _refuse_core_sensor(name)
        return cls(site=site, sensors={ANCHOR: s2, PAIRED: s1, **extra}, labels=labels)

    @property
    def s2(self) -> xr.DataArray:
        """The S2 cube (the anchor: its dates and grid)."""
        return self.sensors[ANCHOR]

    @property
    def s1(self) -> xr.DataArray:
        """The S1 cube, on its own dates."""
        return self.sensors[PAIRED]

    @property
    def extra(self) -> dict[str, xr.DataArray]:
        """The companion-sensor cubes (every sensor but s1 and s2), in the scene's order."""
        return {k: self.sensors[k] for k in companions(self.sensors)}

    def validate_cubes(self, *, check_values: bool = True) -> None:
        """Validate each cube against its sensor's spec, and every cube but S2's against the S2 grid and site (what
        :func:`stembed.io.cube.open_scene` checks of a store); raise :class:`CubeError` if broken."""
        for name in SCENE_SENSORS:
            validate_cube(self.sensors[name], SENSORS[name], check_values=check_values)
        validate_pair(self.s1, self.s2)
        for name, cube in self.extra.items():
            validate_extra(name, cube, self.s2, check_values=check_values)

    def validate(self) -> None:
        """Validate every cube, the shared grid and the labels' grid; raise :class:`CubeError` if broken."""
        self.validate_cubes()
        if self.s2.attrs.get("site") != self.site:
            raise CubeError(
                f"Scene.site is {self.site!r} but its cubes say site {self.s2.attrs.get('site')!r}; "
                "fix: build the Scene with site=cube.attrs['site']"
            )
        if self.labels is not None:
            for dim in (Y, X):
                if dim not in self.labels.coords or not np.allclose(
                    self.labels[dim].values, self.s2[dim].values, atol=COORD_TOL_M
                ):
                    raise CubeError(
                        f"labels {dim} coordinates differ from the S2 grid; fix: put the labels on that grid"
                    )
