"""Cube and scene stores (zarr): :func:`save_cube` / :func:`open_cube` store one cube (one variable named
after the sensor, attributes included); :func:`save_scene` / :func:`open_scene` a :class:`Scene` (S2, S1,
companion sensors and labels as groups of one store). Every store is validated against the cube contract
(:mod:`stembed.contract`) on the way in and on the way out.

Georeferencing: stores always get a ``spatial_ref`` rebuilt from the ``x``/``y`` coordinates (CF, what
rioxarray, GDAL and odc-geo read). Stores written before this convention carry a GDAL-order
``transform`` attribute instead: they still open (the attribute is checked against the coordinates,
replaced by ``spatial_ref``, and a :class:`LegacyStoreWarning` says how to rewrite the store).

The contract's names (``Scene``, ``CubeError``, ``make_cube``, ``validate_cube``, ...) are importable from
here too, where they lived first.
"""

from __future__ import annotations

import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from stembed.contract import (  # noqa: F401  (re-exported: the contract's names lived here first)
    COORD_TOL_M,
    CubeError,
    Scene,
    cube_transform,
    georef_problems,
    make_cube,
    provenance_json,
    validate_cube,
    validate_extra,
    validate_pair,
    value_problems,
    with_georef,
)
from stembed.io.outputs import StoreKind, is_stembed_store
from stembed.sensors import CORE_SENSORS, SCENE_SENSORS, SENSORS, load_builtin_plugins
from stembed.types import BAND, X, Y

_STORE_MARKER = "stembed_cube_format"
_STORE_FORMAT = 1
_CHUNK_PX = 512


class LegacyStoreWarning(UserWarning):
    """A store written by an older stembed opened fine, but should be rewritten (the message says how)."""


# ----------------------------------------------------------------------------- storage
def _cube_dataset(da: xr.DataArray) -> xr.Dataset:
    """A cube as the Dataset stored in zarr: one variable named after the sensor."""
    sensor = da.attrs.get("sensor") if isinstance(da, xr.DataArray) else None
    if sensor not in SENSORS:
        raise CubeError(f"cannot save: attrs['sensor'] is {sensor!r}, expected one of {sorted(SENSORS)}")
    # object-dtype band names are stored as zarr v3 variable-length strings (fixed-width numpy
    # unicode has no stable zarr v3 representation)
    var = da.assign_coords({BAND: da[BAND].values.astype(object)})
    var.encoding = {}
    var = with_georef(var)  # spatial_ref rebuilt from x/y, so a cropped cube is stored right
    ds = var.to_dataset(name=sensor)
    ds.attrs = {_STORE_MARKER: _STORE_FORMAT, "sensor": sensor}
    return ds


def _cube_encoding(da: xr.DataArray) -> dict[str, dict[str, Any]]:
    grid_mapping = {"grid_mapping": "spatial_ref"}  # CF: names the variable holding CRS and GeoTransform
    if da.chunks is not None:  # dask-backed cubes keep their own chunks
        return {str(da.attrs["sensor"]): grid_mapping}
    return {
        str(da.attrs["sensor"]): {
            "chunks": (1, da.sizes[BAND], min(da.sizes[Y], _CHUNK_PX), min(da.sizes[X], _CHUNK_PX)),
            **grid_mapping,
        }
    }


def write_atomically(path: Path, write: Any, *, overwrite: bool, owner: StoreKind | None = None) -> Path:
    """Run ``write(tmp)`` on a temporary sibling, then rename it to ``path``.

    An interrupted write never leaves a complete-looking store at ``path``, and an existing store
    is only replaced once the new one is complete. With ``owner``, an existing ``path`` is only
    replaced if it is a stembed store of that kind (never someone's folder or file).
    """
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if owner is not None and (path.exists() or path.is_symlink()) and not is_stembed_store(path, owner):
        raise CubeError(
            f"{path} exists but is not a stembed {owner} store, so it is not replaced; fix: choose another "
            "path, or remove it yourself if it is yours to delete"
        )
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        path.rename(old)
        tmp.rename(path)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        tmp.rename(path)
    return path


def save_cube(da: xr.DataArray, path: str | Path, *, overwrite: bool = False) -> Path:
    """Validate ``da`` and write it as a zarr store (variable named after the sensor), atomically.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        CubeError: the cube breaks the contract.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    sensor = da.attrs.get("sensor") if isinstance(da, xr.DataArray) else None
    if sensor not in SENSORS:
        raise CubeError(f"cannot save: attrs['sensor'] is {sensor!r}, expected one of {sorted(SENSORS)}")
    validate_cube(da, SENSORS[str(sensor)])
    ds = _cube_dataset(da)
    encoding = _cube_encoding(da)
    return write_atomically(
        path,
        lambda tmp: ds.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False, encoding=encoding),
        overwrite=overwrite,
        owner="cube",
    )


def _read_cube(path: Path, group: str | None = None, legacy: list[str] | None = None) -> xr.DataArray:
    """Read one cube; a store without ``spatial_ref`` (older stembed) is upgraded and noted in ``legacy``."""
    where = f"{path}" + (f" (group {group!r})" if group else "")
    try:
        ds = xr.open_zarr(path, group=group, consolidated=False, chunks=None, decode_coords="all")
    except (OSError, ValueError, KeyError) as e:
        raise CubeError(f"{where} is not a readable zarr store ({type(e).__name__}: {e})") from e
    sensor = ds.attrs.get("sensor")
    if ds.attrs.get(_STORE_MARKER) is None or sensor not in ds.data_vars:
        raise CubeError(
            f"{where} is a zarr store but not a stembed cube (variables {sorted(map(str, ds.data_vars))}, "
            f"no '{_STORE_MARKER}' attribute); fix: write cubes with stembed.io.cube.save_cube"
        )
    if ds.attrs[_STORE_MARKER] != _STORE_FORMAT:
        raise CubeError(
            f"{where} has cube format {ds.attrs[_STORE_MARKER]}, this stembed reads format {_STORE_FORMAT}; "
            "fix: rewrite the cube with this stembed version"
        )
    da = ds[sensor]
    da = da.assign_coords({BAND: np.array([str(b) for b in da[BAND].values])})
    if "spatial_ref" in da.coords:
        gt = str(da.coords["spatial_ref"].attrs.get("GeoTransform", ""))
        try:
            stored = np.asarray([float(v) for v in gt.split()], dtype=np.float64)
        except ValueError:
            stored = np.empty(0)
        if stored.shape != (6,) or not np.allclose(stored, cube_transform(da), rtol=0, atol=COORD_TOL_M):
            raise CubeError(
                f"{where}: spatial_ref GeoTransform {gt!r} does not match the x/y coordinates, which imply "
                f"{list(cube_transform(da))}; fix: rewrite the store from a corrected cube "
                "(save_scene/save_cube)"
            )
    else:
        problems = georef_problems(da, None)
        if problems:
            raise CubeError(f"{where}: {problems[0]}")
        da = with_georef(da)
        if legacy is not None:
            legacy.append(group or "/")
    return da


def _warn_legacy(path: Path, legacy: list[str], rewrite: str) -> None:
    """One warning per opened store that predates the ``spatial_ref`` convention."""
    if legacy:
        warnings.warn(
            f"{path} was written by an older stembed (a GDAL-order 'transform' attribute, no CF spatial_ref; "
            f"read fine); fix: rewrite it so GIS tools place it right: {rewrite}",
            LegacyStoreWarning,
            stacklevel=3,
        )


def open_cube(path: str | Path) -> xr.DataArray:
    """Open a cube written by :func:`save_cube`, lazily (values load on first access, e.g. ``.values``).

    Raises:
        CubeError: the path is missing, is not a zarr store, or is not a stembed cube.
    """
    path = Path(path)
    if not path.exists():
        raise CubeError(f"no cube at {path}; fix: check the path (stembed.io.cube.save_cube writes cubes)")
    legacy: list[str] = []
    da = _read_cube(path, legacy=legacy)
    _warn_legacy(path, legacy, "save_cube(open_cube(old).load(), new)")
    return da


_SCENE_MARKER = "stembed_scene_format"
_SCENE_FORMAT = 1
EXTENDING_ATTR = "stembed_extending"
"""Root attribute of a scene store that ``stembed cube --extend`` is appending dates to (set before the first write,
removed by the last): :func:`open_scene` refuses such a store (:mod:`stembed.cube_build.append`)."""


def save_scene(scene: Scene, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a :class:`Scene` as one zarr store, atomically: groups ``s2``, ``s1`` (+ ``labels``, extras).

    This is the ``CUBE`` that ``stembed embed --cube`` reads. Each sensor group (companion sensors
    included, named after the sensor) is laid out like :func:`save_cube`'s store; the root's
    attributes name the format, the site and the companion sensors (``extra_sensors``).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        CubeError: the scene breaks the cube contract.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    scene.validate()

    def write(tmp: Path) -> None:
        extra = sorted(scene.extra)
        root = xr.Dataset(attrs={_SCENE_MARKER: _SCENE_FORMAT, "site": scene.site, "extra_sensors": extra})
        root.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False)
        for cube in (scene.s2, scene.s1, *(scene.extra[n] for n in extra)):
            _cube_dataset(cube).to_zarr(
                tmp, group=str(cube.attrs["sensor"]), mode="w-", zarr_format=3, consolidated=False,
                encoding=_cube_encoding(cube),
            )
        if scene.labels is not None:
            scene.labels.to_zarr(tmp, group="labels", mode="w-", zarr_format=3, consolidated=False)

    return write_atomically(path, write, overwrite=overwrite, owner="scene")


def _refuse_mid_extension(path: Path, extending: Any) -> None:
    """Refuse a scene store that ``stembed cube --extend`` has started to append to (``extending``: its marker)."""
    if extending is not None:
        end = extending.get("end") if isinstance(extending, dict) else None
        raise CubeError(
            f"{path} is mid-extension to {end} (its new dates are incomplete: the run was interrupted, or is still "
            f"running); fix: run the same cube --extend command to finish: stembed cube --extend {path} --end {end}"
        )


def open_scene(path: str | Path, *, check_values: bool = True) -> Scene:
    """Open a scene store written by :func:`save_scene`, lazily, and validate it (companion sensors included).

    Args:
        check_values: also check every value's range (reads the whole cube); pass False to check
            only structure and grids, e.g. before a tiled run that checks each tile as it reads it.

    Raises:
        CubeError: the path is missing or is not a stembed scene store, the scene breaks the contract,
            it holds a companion sensor that is not registered, or ``stembed cube --extend`` has not finished
            appending to it.
    """
    path = Path(path)
    if not path.exists():
        raise CubeError(f"no scene store at {path}; fix: check the path (stembed.io.cube.save_scene writes one)")
    try:
        root = xr.open_zarr(path, consolidated=False, chunks=None)
    except (OSError, ValueError, KeyError) as e:
        raise CubeError(f"{path} is not a readable zarr store ({type(e).__name__}: {e})") from e
    if root.attrs.get(_SCENE_MARKER) != _SCENE_FORMAT:
        hint = (
            "it looks like a single-sensor cube (save_cube); pair it with the other sensor and write "
            "both with stembed.io.cube.save_scene"
            if root.attrs.get(_STORE_MARKER) is not None
            else "write scenes with stembed.io.cube.save_scene"
        )
        raise CubeError(
            f"{path} is not a stembed scene store (no '{_SCENE_MARKER}' = {_SCENE_FORMAT} attribute); fix: {hint}"
        )
    _refuse_mid_extension(path, root.attrs.get(EXTENDING_ATTR))
    legacy: list[str] = []
    core = {k: _read_cube(path, k, legacy) for k in SCENE_SENSORS}
    labels = None
    if (path / "labels").is_dir():
        labels = xr.open_zarr(path, group="labels", consolidated=False, chunks=None)
    names = root.attrs.get("extra_sensors", [])
    if isinstance(names, str) or not isinstance(names, list | tuple):
        raise CubeError(
            f"{path}: root attribute extra_sensors is {names!r}, expected a list; "
            "fix: rewrite the store with save_scene"
        )
    load_builtin_plugins()
    unknown = [str(n) for n in names if str(n) not in SENSORS or str(n) in CORE_SENSORS]
    if unknown:
        raise CubeError(
            f"{path} holds companion-sensor cubes {unknown}, but no such sensor is registered (known: "
            f"{sorted(SENSORS)}); fix: import the module that registers it before opening the scene"
        )
    extra = {str(n): _read_cube(path, str(n), legacy) for n in names}
    _warn_legacy(path, legacy, "save_scene(open_scene(old), new)")
    scene = Scene(site=str(root.attrs.get("site")), sensors={**core, **extra}, labels=labels)
    scene.validate_cubes(check_values=check_values)
    if scene.site != scene.s2.attrs.get("site"):
        raise CubeError(
            f"{path}: the store says site {scene.site!r} but its S2 cube says {scene.s2.attrs.get('site')!r}"
        )
    return scene
