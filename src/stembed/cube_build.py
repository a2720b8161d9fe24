"""``stembed cube``: a scene store (S2 L2A + S1 RTC on one UTM 10 m grid) for any place and period, from STAC.

The steps, each a function here:

1. **Search** (:mod:`stembed.io.stac`): S2 and S1 items per *piece* of the period (calendar years by
   default), with retries; the item lists are staged as JSON, so a resumed build reuses the very same items.
2. **Load** (odc-stac): every item onto the one grid (``groupby="id"``: one slice per item), dask-chunked;
   10 m bands need no resampling, 20 m bands and masks are resampled with ``nearest`` (exact 2 x 2
   repetition on the Sentinel-2 tile grid). A failed asset read stops the piece with a
   :class:`CubeBuildError` naming it; nothing is zero-filled.
3. **Sentinel-2** per item: DN 0 = no data; ``BOA_ADD_OFFSET`` (-1000 for processing baseline >= 04.00,
   read from ``s2:processing_baseline``) added; reflectance = (DN + offset) * 1e-4; a cloud/shadow mask
   from a :class:`CloudMask` (default :class:`SCLMask`); BRDF nadir normalisation with sen2nbar's
   c-factor (:func:`nbar_c_factor`) from the angle grids of the item's own granule metadata
   (``MTD_TL.xml``, fetched here and handed to sen2nbar as a local file: sen2nbar never touches the
   network). **B8A**: sen2nbar has no coefficients for it; B8A is corrected with B08's coefficients
   (both come from the same MODIS NIR band, 841-876 nm, which B8A's 865 nm lies in) and B8A's own view
   angles. Then same-day items are merged (first valid item per pixel) and
   :func:`stembed.preprocess.prepare_s2` masks, clips and drops dates under ``min_valid_fraction``.
4. **Sentinel-1**: one orbit direction (``auto``: the one with most acquisitions over the whole
   period; recorded), RTC gamma0 in linear power, same-day slices merged; after all pieces,
   :func:`stembed.preprocess.prepare_s1` (3-frame centred rolling mean in linear power, dB, clip,
   normalise) runs on the whole S1 time axis, so the smoothing does not stop at piece boundaries.
   S1 stays on its own dates (the scene-store contract); the number of S2 dates with an S1 date
   within ``s1_max_gap_days`` is checked (> 0) and recorded, as is the tolerance.
5. **Stage and assemble**: each finished piece is written to ``<out>.staging/pieces/`` atomically
   (temporary folder, then rename), so an interrupted build resumes at the first unfinished piece;
   :func:`stembed.io.cube.save_scene` writes the final store atomically; then the staging folder is
   removed. A store at ``out`` therefore always is complete.

Limits: the period's S2 and S1 cubes are assembled in memory (pieces too); the 6-degree UTM zones
only (no Norway/Svalbard exceptions); ``auto`` orbit picks one direction for the whole cube.
"""

from __future__ import annotations

import json
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import import_module, metadata
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import xarray as xr

from stembed.contract import Scene, make_cube
from stembed.errors import UserError
from stembed.io.cube import open_scene, save_scene, write_atomically
from stembed.io.outputs import check_store_output, is_stembed_store, lock_output
from stembed.io.sites import SiteOutcome, store_path
from stembed.io.stac import (
    PLANETARY_COMPUTER,
    S1_COLLECTION,
    S2_COLLECTION,
    GridSpec,
    Piece,
    RetryPolicy,
    fetch_bytes,
    http_session,
    item_epsg,
    period_pieces,
    search_items,
    sign_items,
)
from stembed.preprocess import SCL_MASKED_DEFAULT, merge_same_day, prepare_s1, prepare_s2
from stembed.sensors import S1, S2
from stembed.types import BAND, CUBE_DIMS, TIME, X, Y

MIN_DATES_DEFAULT = 6
"""S2 dates a cube needs for one 11-frame window reflected at the ends (``inference.engine.min_dates(11)``)."""
BOA_ADD_OFFSET = -1000.0
"""ESA's L2A offset for processing baseline >= 04.00: reflectance = (DN + BOA_ADD_OFFSET) / 10000."""
_BASELINE_04 = (4, 0)
_BASELINE_04_START = pd.Timestamp("2022-01-25")  # first products of baseline 04.00
_DN_SCALE = 1e-4
_GRANULE_METADATA = "granule-metadata"
_ORBITS = ("auto", "ascending", "descending", "both")


class CubeBuildError(UserError):
    """A cube that cannot be built as asked; the message names the problem and the fix."""


# ----------------------------------------------------------------------------- cloud masks
@runtime_checkable
class CloudMask(Protocol):
    """Which S2 pixels are clear. Plug a model-based mask (e.g. a CloudSEN12-type network) in here.

    ``assets``: the extra item assets it reads (loaded onto the cube grid with ``nearest``);
    ``needs_reflectance``: whether :meth:`clear` wants the reflectance bands;
    :meth:`clear` gets ``reflectance`` (time, band, y, x) float32 in the cube band order, *after* the
    BOA offset and *before* BRDF (None when not needed), and ``extra`` {asset: (time, y, x) array};
    it returns a bool array (time, y, x), True = clear. :meth:`describe` goes into the provenance.

    A user's model mask is a class with these members, e.g. in ``mymasks.py``::

        class CloudSen12Mask:
            assets = ()
            needs_reflectance = True
            def __init__(self): self.net = load_my_weights("cloudsen12.pt")
            def clear(self, reflectance, extra): return self.net.predict(reflectance) == 0
            def describe(self): return {"kind": "cloudsen12", "weights": "cloudsen12.pt"}

    and ``stembed cube --cloud-mask mymasks:CloudSen12Mask`` builds it (no arguments).
    """

    # read-only members: a class attribute (``assets = ()``), a ClassVar or a property all fit
    @property
    def assets(self) -> tuple[str, ...]:
        """The extra item assets :meth:`clear` reads."""

    @property
    def needs_reflectance(self) -> bool:
        """Whether :meth:`clear` wants the reflectance bands."""

    def clear(self, reflectance: np.ndarray | None, extra: dict[str, np.ndarray]) -> np.ndarray:
        """The clear-sky mask (time, y, x) of one piece; True = clear."""

    def describe(self) -> dict[str, Any]:
        """What this mask is and how it was set up, for the store's provenance."""


@dataclass(frozen=True)
class SCLMask:
    """The Sen2Cor scene classification: pixels of ``classes`` (plus 0 = no data) are not clear."""

    classes: tuple[int, ...] = SCL_MASKED_DEFAULT
    asset: str = "SCL"
    needs_reflectance: ClassVar[bool] = False

    @property
    def assets(self) -> tuple[str, ...]:
        """The SCL asset, the one extra asset this mask reads."""
        return (self.asset,)

    def masked_classes(self) -> list[int]:
        """The SCL classes that are not clear, always including 0 (no data)."""
        return sorted({int(c) for c in self.classes} | {0})

    def clear(self, reflectance: np.ndarray | None, extra: dict[str, np.ndarray]) -> np.ndarray:
        """True where the SCL class is not among :meth:`masked_classes`."""
        return ~np.isin(np.asarray(extra[self.asset]), self.masked_classes())

    def describe(self) -> dict[str, Any]:
        """``kind``, asset and masked classes, for the store's provenance."""
        return {"kind": "scl", "asset": self.asset, "masked_classes": self.masked_classes()}


def load_cloud_mask(spec: str, *, scl_classes: Sequence[int] | None = None) -> CloudMask:
    """``"scl"`` -> :class:`SCLMask` (``scl_classes`` or the default classes); ``"module:name"`` -> ``name()``.

    Raises:
        CubeBuildError: the module or name cannot be imported, or the object is not a :class:`CloudMask`.
    """
    if spec == "scl":
        return SCLMask(tuple(scl_classes) if scl_classes is not None else SCL_MASKED_DEFAULT)
    if scl_classes is not None:
        raise CubeBuildError("--scl-classes only applies to --cloud-mask scl")
    module, _, name = spec.partition(":")
    if not module or not name:
        raise CubeBuildError(f"--cloud-mask {spec!r}: use 'scl' or 'package.module:ClassOrFactory'")
    try:
        factory = getattr(import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise CubeBuildError(
            f"--cloud-mask {spec!r} cannot be imported ({e}); fix: check the module path"
        ) from e
    mask = factory()
    if not isinstance(mask, CloudMask):
        raise CubeBuildError(
            f"--cloud-mask {spec!r} built a {type(mask).__name__}, which lacks the CloudMask members (assets, "
            "needs_reflectance, clear, describe); see stembed.cube_build.CloudMask"
        )
    return mask


# ----------------------------------------------------------------------------- S2 radiometry
def boa_add_offset(item: Any) -> tuple[float, str]:
    """The BOA_ADD_OFFSET of an S2 L2A item and where it came from.

    -1000 from processing baseline 04.00 on (``s2:processing_baseline``), else 0. Items without the
    property are judged by date (baseline 04.00 started on 2022-01-25) and the source says so.
    """
    baseline = item.properties.get("s2:processing_baseline")
    if baseline is not None:
        try:
            major, minor = (int(p) for p in str(baseline).split(".")[:2])
        except ValueError as e:
            raise CubeBuildError(
                f"item {item.id} has s2:processing_baseline {baseline!r}, not 'NN.NN'; the BOA offset is unknown"
            ) from e
        return (BOA_ADD_OFFSET if (major, minor) >= _BASELINE_04 else 0.0), f"baseline {baseline}"
    when = (
        pd.Timestamp(item.datetime).tz_localize(None)
        if item.datetime.tzinfo is None
        else pd.Timestamp(item.datetime).tz_convert(None)
    )
    offset = BOA_ADD_OFFSET if when >= _BASELINE_04_START else 0.0
    return offset, "no s2:processing_baseline; inferred from the date (04.00 from 2022-01-25)"


def dn_to_reflectance(dn: np.ndarray, *, boa_add_offset: float = 0.0, c_factor: Any = None) -> np.ndarray:
    """L2A digital numbers -> float32 reflectance: NaN where DN is 0, ``(DN + offset) * 1e-4 * c_factor``.

    Computed in float64 and rounded once. ``c_factor`` (broadcastable, e.g. (band, y, x)) is the BRDF
    nadir factor of :func:`nbar_c_factor`; None leaves the reflectance as observed.
    """
    dn = np.asarray(dn)
    refl = np.where(dn == 0, np.nan, (dn.astype(np.float64) + boa_add_offset) * _DN_SCALE)
    if c_factor is not None:
        refl = refl * np.asarray(c_factor, dtype=np.float64)
    return refl.astype(np.float32)


def nbar_c_factor(angles: xr.DataArray) -> xr.DataArray:
    """sen2nbar's c-factor for the 10 cube bands from an angle array like ``sen2nbar.metadata.angles_from_metadata``.

    ``angles`` has dims (band, angle, ...): band ``"Sun"`` and the S2 band names, angle ``"Zenith"``
    and ``"Azimuth"`` in degrees. Returns (band, ...) with band = ``S2.bands``. B8A takes B08's BRDF
    coefficients with its own view angles (sen2nbar's table has no B8A; see the module docstring).
    """
    from sen2nbar.c_factor import c_factor

    sun_zenith = angles.sel(band="Sun", angle="Zenith", drop=True)
    sun_azimuth = angles.sel(band="Sun", angle="Azimuth", drop=True)
    parts: dict[str, xr.DataArray] = {}
    # two calls: the nine bands sen2nbar knows, then B8A under B08's name (its coefficients)
    for bands, coefs in (([b for b in S2.bands if b != "B8A"], None), (["B8A"], ["B08"])):
        view_zenith = angles.sel(band=bands, angle="Zenith", drop=True)
        view_azimuth = angles.sel(band=bands, angle="Azimuth", drop=True)
        if coefs is not None:
            view_zenith, view_azimuth = (a.assign_coords(band=coefs) for a in (view_zenith, view_azimuth))
        c = c_factor(sun_zenith, view_zenith, sun_azimuth - view_azimuth)
        if c.sizes.get("band") != len(bands):
            raise CubeBuildError(f"sen2nbar has BRDF coefficients for {c['band'].values.tolist()} of {bands}")
        parts.update(zip(bands, (c.isel(band=i) for i in range(len(bands))), strict=True))
    out = [parts[b].drop_vars("band").expand_dims(band=[b]) for b in S2.bands]
    return xr.concat(out, dim="band")


def item_c_factor(item: Any, grid: GridSpec, session: Any, workdir: Path) -> np.ndarray:
    """The BRDF c-factor (band, y, x) of one S2 item on ``grid``, from its granule metadata (``MTD_TL.xml``).

    The angle grids (5 km) are read by sen2nbar from a local copy, NaN cells (outside the detectors)
    filled by nearest neighbour (sen2nbar's own rule), the c-factor computed per band and interpolated
    linearly to every pixel centre (transformed into the item's CRS when it differs from the grid's).
    """
    from sen2nbar.metadata import angles_from_metadata
    from sen2nbar.utils import _extrapolate_c_factor

    asset = item.assets.get(_GRANULE_METADATA)
    if asset is None:
        raise CubeBuildError(
            f"S2 item {item.id} has no '{_GRANULE_METADATA}' asset, so its sun/view angles are unknown and BRDF "
            f"cannot be normalised; fix: pass --no-brdf, or use a collection whose items link MTD_TL.xml"
        )
    local = workdir / f"{item.id}_MTD_TL.xml"
    local.write_bytes(fetch_bytes(asset.href, session, what=f"the granule metadata of {item.id}"))
    try:
        angles = angles_from_metadata(str(local))  # a local file: sen2nbar does not fetch anything
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise CubeBuildError(
            f"the granule metadata of {item.id} has no readable sun/view angle grids ({type(e).__name__}: {e}); "
            "fix: pass --no-brdf"
        ) from e
    c = _extrapolate_c_factor(nbar_c_factor(angles))
    src_crs = str(angles.attrs.get("epsg") or f"EPSG:{item_epsg(item)}")
    interp = {"method": "linear", "kwargs": {"fill_value": "extrapolate"}}
    if _same_crs(src_crs, grid.crs):
        out = c.interp(x=grid.x, y=grid.y, **interp)
    else:
        import pyproj

        xx, yy = np.meshgrid(grid.x, grid.y)
        sx, sy = pyproj.Transformer.from_crs(grid.crs, src_crs, always_xy=True).transform(xx, yy)
        out = c.interp(x=xr.DataArray(sx, dims=(Y, X)), y=xr.DataArray(sy, dims=(Y, X)), **interp)
    values = out.transpose("band", Y, X).values.astype(np.float64)
    if not np.isfinite(values).all():
        raise CubeBuildError(f"the BRDF c-factor of {item.id} is not finite everywhere; fix: pass --no-brdf")
    return values


def _same_crs(a: str, b: str) -> bool:
    import pyproj

    return bool(pyproj.CRS.from_user_input(a) == pyproj.CRS.from_user_input(b))


# ----------------------------------------------------------------------------- the request
@dataclass(frozen=True)
class CubeRequest:
    """Everything that decides the cube's content (and so whether a staged build can be resumed)."""

    grid: GridSpec
    start: str
    end: str
    site: str
    catalog: str = PLANETARY_COMPUTER
    s2_collection: str = S2_COLLECTION
    s1_collection: str = S1_COLLECTION
    cloud_mask: CloudMask = field(default_factory=SCLMask)
    brdf: bool = True
    min_valid_fraction: float = 0.03
    min_dates: int = MIN_DATES_DEFAULT
    s1_orbit: str = "auto"
    s1_max_gap_days: float = 6.0
    piece_months: int = 12
    resampling: str = "nearest"
    chunk_px: int = 2048
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.s1_orbit not in _ORBITS:
            raise CubeBuildError(f"--s1-orbit is {self.s1_orbit!r}; use one of {', '.join(_ORBITS)}")
        if not 0.0 <= self.min_valid_fraction <= 1.0:
            raise CubeBuildError(f"--min-valid-fraction is {self.min_valid_fraction}; use a share in [0, 1]")
        if self.min_dates < 1:
            raise CubeBuildError(f"--min-dates is {self.min_dates}; use at least 1")
        if not self.s1_max_gap_days >= 0:
            raise CubeBuildError(f"--s1-max-gap-days is {self.s1_max_gap_days}; use >= 0 days")
        if self.resampling not in ("nearest", "bilinear", "cubic", "average"):
            raise CubeBuildError(
                f"--resampling is {self.resampling!r}; use nearest, bilinear, cubic or average"
            )
        if not self.site:
            raise CubeBuildError("the site id is empty; fix: pass --site NAME")

    def identity(self) -> dict[str, Any]:
        """The JSON facts a staged build must match to be resumed (retry settings do not count)."""
        return {
            "format": 1,
            "grid": self.grid.to_dict(),
            "start": self.start,
            "end": self.end,
            "site": self.site,
            "catalog": self.catalog,
            "s2_collection": self.s2_collection,
            "s1_collection": self.s1_collection,
            "cloud_mask": self.cloud_mask.describe(),
            "brdf": self.brdf,
            "min_valid_fraction": self.min_valid_fraction,
            "min_dates": self.min_dates,
            "s1_orbit": self.s1_orbit,
            "s1_max_gap_days": self.s1_max_gap_days,
            "piece_months": self.piece_months,
            "resampling": self.resampling,
        }


@dataclass(frozen=True)
class BuildResult:
    """What :func:`build_cube` did."""

    path: Path
    s2_dates: int
    s1_dates: int
    s2_dates_with_s1: int
    s1_orbit: str
    pieces_loaded: int
    pieces_reused: int
    notes: tuple[str, ...]


# ----------------------------------------------------------------------------- the build
def staging_dir(out: str | Path) -> Path:
    """Where an unfinished build of ``out`` keeps its searched items and finished pieces."""
    out = Path(out)
    return out.with_name(out.name + ".staging")


def build_cube(
    request: CubeRequest,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> BuildResult:
    """Build the scene store ``out`` for ``request`` (see the module docstring); resumes a staged build.

    Raises:
        CubeBuildError, StacError: an empty search, no S1 coverage, too few dates, failed reads, a
            different build staged at the same place, an existing output without ``overwrite``.
    """
    out = Path(out)
    say = echo or (lambda msg: None)
    notes: list[str] = []
    if request.grid.note:
        notes.append(request.grid.note)
        say(f"note: {request.grid.note}")
    # a file, or a folder that is not a scene store, is refused even with --overwrite (never deleted)
    check_store_output(out, "scene", overwrite=overwrite)
    pieces = period_pieces(request.start, request.end, months=request.piece_months)  # checks the dates
    session = http_session(request.retry)
    _configure_gdal(request.retry)
    # this run owns --out and its staging folder (OUT.lock) until it ends: a second run refuses
    with lock_output(out, command="cube", echo=echo):
        return _build_owned(request, out, overwrite, progress, say, notes, pieces, session)


def _build_owned(
    request: CubeRequest, out: Path, overwrite: bool, progress: bool, say: Callable[[str], None],
    notes: list[str], pieces: list[Any], session: Any,
) -> BuildResult:
    from tqdm.auto import tqdm

    stage = _open_staging(out, request, overwrite=overwrite)

    bar = tqdm(total=4 * len(pieces) + 1, disable=not progress, desc="stembed cube", unit="step")
    try:
        items: dict[tuple[str, str], list[Any]] = {}
        for piece in pieces:
            for sensor, collection in (("s2", request.s2_collection), ("s1", request.s1_collection)):
                bar.set_postfix_str(f"search {sensor} {piece.name}")
                items[piece.name, sensor] = _staged_search(stage, piece, sensor, collection, request)
                bar.update()
        orbit = _check_search(request, pieces, items, notes, say)

        loaded = reused = 0
        for piece in pieces:
            for sensor in ("s2", "s1"):
                bar.set_postfix_str(f"load {sensor} {piece.name}")
                if _piece_done(stage, piece, sensor):
                    reused += 1
                else:
                    piece_items = items[piece.name, sensor]
                    if sensor == "s1":
                        piece_items = _select_orbit(piece_items, orbit)
                    _build_piece(stage, piece, sensor, piece_items, request, session)
                    loaded += 1
                bar.update()

        bar.set_postfix_str("assemble")
        scene, counts = _assemble(stage, pieces, request, orbit, notes)
        check_store_output(out, "scene", overwrite=overwrite)  # again: --out may have changed meanwhile
        save_scene(scene, out, overwrite=overwrite)
        bar.update()
    except BaseException:
        _drop_empty_staging(stage)
        raise
    finally:
        bar.close()
    shutil.rmtree(stage, ignore_errors=True)
    return BuildResult(
        out, counts["s2"], counts["s1"], counts["s2_with_s1"], orbit, loaded, reused, tuple(notes)
    )


def _drop_empty_staging(stage: Path) -> None:
    """Remove a staging folder that holds no searched item list and no piece (nothing to resume)."""
    if not stage.is_dir() or not (stage / "request.json").is_file():
        return
    kept = [p for sub in ("search", "pieces") if (stage / sub).is_dir() for p in (stage / sub).iterdir()]
    if not kept:
        shutil.rmtree(stage, ignore_errors=True)


def _open_staging(out: Path, request: CubeRequest, *, overwrite: bool) -> Path:
    stage = staging_dir(out)
    ident = request.identity()
    if stage.exists() or stage.is_symlink():
        if not stage.is_dir() or not (stage / "request.json").is_file():  # not ours: never deleted
            raise CubeBuildError(
                f"{stage} exists but is not a staged stembed cube build (no request.json); fix: move it "
                "away, or choose another --out"
            )
        try:
            staged = json.loads((stage / "request.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            staged = None
        if staged != json.loads(json.dumps(ident)):
            finished = [p for p in (stage / "pieces").glob("*.zarr") if not p.name.startswith(".")]
            if finished and not overwrite:
                raise CubeBuildError(
                    f"{stage} holds an unfinished build with different settings; fix: rerun with the same arguments "
                    "to resume it, or pass --overwrite to discard it"
                )
            shutil.rmtree(stage)
    if not stage.exists():
        tmp = stage.with_name(f".{stage.name}.tmp-{uuid.uuid4().hex[:8]}")
        (tmp / "search").mkdir(parents=True)
        (tmp / "pieces").mkdir()
        (tmp / "request.json").write_text(json.dumps(ident, indent=1, sort_keys=True))
        tmp.rename(stage)
    for leftover in (stage / "pieces").glob(".*.tmp-*"):  # a piece write that was cut short
        shutil.rmtree(leftover, ignore_errors=True)
    return stage


def _configure_gdal(policy: RetryPolicy) -> None:
    import odc.stac

    odc.stac.configure_rio(
        cloud_defaults=True,
        GDAL_HTTP_MAX_RETRY=str(policy.retries),
        GDAL_HTTP_RETRY_DELAY=str(max(policy.backoff_s, 0.001)),
    )


def _staged_search(
    stage: Path, piece: Piece, sensor: str, collection: str, request: CubeRequest
) -> list[Any]:
    import pystac

    path = stage / "search" / f"{piece.name}_{sensor}.json"
    if path.exists():
        return list(pystac.ItemCollection.from_file(str(path)).items)
    found = search_items(
        request.catalog, collection, request.grid.bbox_lonlat(), piece.start, piece.end, policy=request.retry
    )
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(pystac.ItemCollection(found).to_dict()))
    tmp.rename(path)
    return found


def _orbit_state(item: Any) -> str:
    return str(item.properties.get("sat:orbit_state", "unknown")).lower()


def _select_orbit(items: list[Any], orbit: str) -> list[Any]:
    return items if orbit == "both" else [it for it in items if _orbit_state(it) == orbit]


def _check_search(
    request: CubeRequest,
    pieces: list[Piece],
    items: dict[tuple[str, str], list[Any]],
    notes: list[str],
    say: Callable[[str], None],
) -> str:
    where = (
        f"bbox {tuple(round(v, 5) for v in request.grid.bbox_lonlat())} from {request.start} to {request.end} "
        f"at {request.catalog}"
    )
    s2 = [it for p in pieces for it in items[p.name, "s2"]]
    s1 = [it for p in pieces for it in items[p.name, "s1"]]
    if not s2:
        raise CubeBuildError(
            f"the search found no {request.s2_collection!r} items for {where}; fix: check the area (lon/lat order: "
            "--bbox W S E N), the period and --s2-collection"
        )
    days = {pd.Timestamp(it.datetime).strftime("%Y-%m-%d") for it in s2}
    if len(days) < request.min_dates:
        raise CubeBuildError(
            f"the period is too short for a window: {len(days)} S2 acquisition dates found for {where}, a cube "
            f"needs at least {request.min_dates} valid dates; fix: extend --start/--end"
        )
    if not s1:
        raise CubeBuildError(
            f"no S1 coverage: the search found no {request.s1_collection!r} items for {where}; fix: check "
            "--s1-collection, or extend the period"
        )
    counts: dict[str, int] = {}
    for it in s1:
        counts[_orbit_state(it)] = counts.get(_orbit_state(it), 0) + 1
    orbit = request.s1_orbit
    if orbit == "auto":
        orbit = max(("ascending", "descending"), key=lambda o: (counts.get(o, 0), o == "ascending"))
        note = f"S1 orbit direction: {orbit} ({counts.get(orbit, 0)} of {len(s1)} S1 items; found {counts})"
        notes.append(note)
        say(f"note: {note}")
    if orbit != "both" and not counts.get(orbit):
        raise CubeBuildError(
            f"no S1 coverage in the {orbit} orbit direction for {where} (orbit states found: {counts}); fix: pass "
            "--s1-orbit with one of those, or auto"
        )
    return orbit


def _piece_store(stage: Path, piece: Piece, sensor: str) -> Path:
    return stage / "pieces" / f"{piece.name}_{sensor}.zarr"


def _piece_done(stage: Path, piece: Piece, sensor: str) -> bool:
    return _piece_store(stage, piece, sensor).exists()


def _build_piece(
    stage: Path, piece: Piece, sensor: str, items: list[Any], request: CubeRequest, session: Any
) -> None:
    items = sign_items(items, request.catalog)
    if sensor == "s2":
        values, meta = _s2_piece(items, request, session, stage)
    else:
        values, meta = _s1_piece(items, request)
    values = values.assign_coords({BAND: values[BAND].values.astype(object)})  # zarr v3 strings
    ds = xr.Dataset({"values": values}, attrs={"meta": json.dumps(meta, default=str), "piece": piece.name})
    path = _piece_store(stage, piece, sensor)
    write_atomically(
        path, lambda tmp: ds.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False), overwrite=False
    )


@contextmanager
def _quiet_reproject_warning() -> Iterator[None]:
    """Hide rasterio's "Dataset has no geotransform" warning when ``rasterio.warp.reproject`` raises it.

    odc-stac's threaded reads raise it now and then although every source is georeferenced (odc-geo#131,
    odc-stac#145: spurious, seen by the maintainers). On the local test catalog it came from the first
    build of a process only (two processes of 8 and 10 builds: each first build warned once, no
    later one), and every build's cube is bit-identical to the first's, warned or not
    (``experiments/reproject_warning.py``). Only that call site is hidden: the same warning raised on
    opening a file that really lacks georeferencing still shows.
    """
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module=r"rasterio\.warp$")
        yield


def _load(
    items: list[Any], bands: list[str], request: CubeRequest, resampling: dict[str, str], what: str
) -> xr.Dataset:
    """odc-stac load, one slice per item in the given order, computed; read failures become CubeBuildError."""
    import odc.stac
    import rasterio.errors

    try:
        ds = odc.stac.load(
            items,
            bands=bands,
            geobox=request.grid.geobox(),
            groupby="id",
            preserve_original_order=True,
            resampling=resampling,
            chunks={"x": request.chunk_px, "y": request.chunk_px},
            fail_on_error=True,
        )
        with _quiet_reproject_warning():
            ds = ds.compute()
    except (rasterio.errors.RasterioError, OSError, RuntimeError) as e:
        raise CubeBuildError(
            f"reading {what} failed ({type(e).__name__}: {e}); no value was filled in for it and nothing of this "
            "piece was written; fix: check that the catalog serves the asset, then rerun the same command to "
            "resume (finished pieces are kept)"
        ) from e
    if ds.sizes.get(TIME) != len(items):
        raise CubeBuildError(
            f"odc-stac returned {ds.sizes.get(TIME)} slices for {len(items)} items of {what}; cannot tell which "
            "slice is which item"
        )
    return ds


def _asset_key(item: Any, band: str) -> str:
    for key in (band, band.lower()):
        if key in item.assets:
            return key
    raise CubeBuildError(
        f"item {item.id} has no asset for band {band} (assets: {sorted(item.assets)}); fix: choose a collection "
        "with one asset per band named like B02 or vv"
    )


def _s2_piece(
    items: list[Any], request: CubeRequest, session: Any, stage: Path
) -> tuple[xr.DataArray, dict[str, Any]]:
    mask = request.cloud_mask
    keys = [_asset_key(items[0], b) for b in S2.bands] if items else list(S2.bands)
    for it in items[1:]:
        if [_asset_key(it, b) for b in S2.bands] != keys:
            raise CubeBuildError(f"item {it.id} names its band assets differently from {items[0].id}")
    empty = xr.DataArray(
        np.zeros((0, S2.n_bands, request.grid.height_px, request.grid.width_px), np.float32),
        dims=CUBE_DIMS,
        coords={
            TIME: np.array([], "datetime64[ns]"),
            BAND: list(S2.bands),
            Y: request.grid.y,
            X: request.grid.x,
        },
    )
    if not items:
        return empty, {"dates": []}
    resampling = {"*": request.resampling} | {a: "nearest" for a in mask.assets}
    ds = _load(items, [*keys, *mask.assets], request, resampling, what=f"S2 assets of {len(items)} items")
    dn = np.stack([ds[k].values for k in keys], axis=1)  # (time, band, y, x)
    extra = {a: ds[a].values for a in mask.assets}
    offsets, sources = zip(*(boa_add_offset(it) for it in items), strict=True)

    workdir = stage / "metadata"
    workdir.mkdir(exist_ok=True)
    refl = np.empty(dn.shape, np.float32)
    plain = np.empty(dn.shape, np.float32) if mask.needs_reflectance else None
    for i, it in enumerate(items):
        c = item_c_factor(it, request.grid, session, workdir) if request.brdf else None
        refl[i] = dn_to_reflectance(dn[i], boa_add_offset=offsets[i], c_factor=c)
        if plain is not None:
            plain[i] = dn_to_reflectance(dn[i], boa_add_offset=offsets[i])
    clear = np.asarray(mask.clear(plain, extra), dtype=bool)
    want = (len(items), request.grid.height_px, request.grid.width_px)
    if clear.shape != want:
        raise CubeBuildError(
            f"the cloud mask {mask.describe()} returned shape {clear.shape}, expected {want}"
        )

    times = np.array([_naive(it.datetime) for it in items], dtype="datetime64[ns]")
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
    day_of = pd.DatetimeIndex(times).normalize()
    kept = set(pd.DatetimeIndex(prepared[TIME].values).normalize())
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
    return prepared.astype(np.float32), {"dates": dates}


def _s1_piece(items: list[Any], request: CubeRequest) -> tuple[xr.DataArray, dict[str, Any]]:
    grid = request.grid
    if not items:
        empty = np.zeros((0, S1.n_bands, grid.height_px, grid.width_px), np.float32)
        return xr.DataArray(
            empty,
            dims=CUBE_DIMS,
            coords={TIME: np.array([], "datetime64[ns]"), BAND: list(S1.bands), Y: grid.y, X: grid.x},
        ), {"dates": []}
    keys = [_asset_key(items[0], b) for b in S1.bands]
    ds = _load(items, keys, request, {"*": request.resampling}, what=f"S1 assets of {len(items)} items")
    layers = []
    for k in keys:
        a = ds[k].values.astype(np.float32)
        nodata = ds[k].attrs.get("nodata")
        if nodata is not None and np.isfinite(float(nodata)):
            a = np.where(a == float(nodata), np.nan, a)
        layers.append(a)
    linear = np.stack(layers, axis=1)
    times = np.array([_naive(it.datetime) for it in items], dtype="datetime64[ns]")
    (linear,), merged_times = merge_same_day([linear], times, np.all(np.isfinite(linear), axis=1))
    day_of = pd.DatetimeIndex(times).normalize()
    dates = []
    for day in pd.DatetimeIndex(merged_times).normalize():
        idx = np.flatnonzero(day_of == day)
        dates.append(
            {
                "date": str(day.date()),
                "items": [items[i].id for i in idx],
                "orbit_state": [_orbit_state(items[i]) for i in idx],
            }
        )
    da = xr.DataArray(
        linear, dims=CUBE_DIMS, coords={TIME: merged_times, BAND: list(S1.bands), Y: grid.y, X: grid.x}
    )
    return da, {"dates": dates}


def _naive(t: Any) -> np.datetime64:
    ts = pd.Timestamp(t)
    return (ts.tz_convert(None) if ts.tzinfo is not None else ts).to_datetime64()


def _read_pieces(
    stage: Path, pieces: list[Piece], sensor: str
) -> tuple[xr.DataArray | None, list[dict[str, Any]]]:
    parts, meta = [], []
    for piece in pieces:
        ds = xr.open_zarr(_piece_store(stage, piece, sensor), consolidated=False, chunks=None)
        meta.extend(json.loads(ds.attrs["meta"])["dates"])
        if ds.sizes[TIME]:
            da = ds["values"].load()
            parts.append(da.assign_coords({BAND: [str(b) for b in da[BAND].values]}))
    if not parts:
        return None, meta
    return xr.concat(parts, dim=TIME), meta


def _assemble(
    stage: Path, pieces: list[Piece], request: CubeRequest, orbit: str, notes: list[str]
) -> tuple[Scene, dict[str, int]]:
    grid = request.grid
    s2, s2_meta = _read_pieces(stage, pieces, "s2")
    s1_linear, s1_meta = _read_pieces(stage, pieces, "s1")
    n_s2 = 0 if s2 is None else s2.sizes[TIME]
    if s2 is None or n_s2 < request.min_dates:
        raise CubeBuildError(
            f"the period is too short for a window: {n_s2} S2 dates have >= {request.min_valid_fraction:.0%} valid "
            f"pixels (of {len(s2_meta)} acquisition dates), a cube needs at least {request.min_dates}; fix: extend "
            "--start/--end (or lower --min-valid-fraction)"
        )
    if s1_linear is None or not bool(np.isfinite(s1_linear.values).any()):
        raise CubeBuildError(
            f"no S1 coverage: the {orbit} S1 items hold no valid value over the area; fix: check the area, "
            "--s1-orbit and --s1-collection"
        )
    s1 = prepare_s1(s1_linear)
    t1 = pd.DatetimeIndex(s1[TIME].values).asi8
    t2 = pd.DatetimeIndex(s2[TIME].values).asi8
    gaps = np.min(np.abs(t2[:, None] - t1[None, :]), axis=1) / 86_400e9
    with_s1 = int((gaps <= request.s1_max_gap_days).sum())
    if with_s1 == 0:
        raise CubeBuildError(
            f"no S1 coverage: none of the {n_s2} S2 dates has an S1 date within {request.s1_max_gap_days:g} days; "
            "fix: raise --s1-max-gap-days or try --s1-orbit both"
        )
    if with_s1 < n_s2:
        notes.append(
            f"{n_s2 - with_s1} of {n_s2} S2 dates have no S1 date within {request.s1_max_gap_days:g} days"
        )

    common = {
        "source": "STAC",
        "builder": "stembed.cube_build.build_cube",
        "catalog": request.catalog,
        "grid": grid.to_dict(),
        "period": [request.start, request.end],
        "pieces": [p.name for p in pieces],
        "notes": notes,
        "versions": _versions(),
    }
    s2_prov = common | {
        "collection": request.s2_collection,
        "items": [i for d in s2_meta for i in d["items"]],
        "processing_baselines": sorted({str(b) for d in s2_meta for b in d["processing_baseline"]}),
        "dates": s2_meta,
        "product": "Sentinel-2 L2A; reflectance = (DN + BOA_ADD_OFFSET) * 1e-4 (offset -1000 from processing "
        f"baseline 04.00); 10 m bands as read, 20 m bands resampled ({request.resampling}) to the 10 m grid; "
        "same-day items merged (first clear item per pixel)",
        "cloud_mask": request.cloud_mask.describe(),
        "brdf": (
            {
                "method": "sen2nbar c-factor (Roy et al. 2008/2016) from each item's MTD_TL.xml angle grids",
                "B8A": "B08 coefficients (MODIS NIR 841-876 nm) with B8A's own view angles",
            }
            if request.brdf
            else "none"
        ),
        "min_valid_fraction": request.min_valid_fraction,
    }
    s1_prov = common | {
        "collection": request.s1_collection,
        "items": [i for d in s1_meta for i in d["items"]],
        "orbit_direction": orbit,
        "dates": s1_meta,
        "product": "Sentinel-1 RTC gamma0, linear power; same-day slices merged; 3-frame centred rolling mean in "
        "linear power on the S1 dates, dB, clip [-30, 5], (dB + 30) / 35",
        "s1_max_gap_days": request.s1_max_gap_days,
        "s2_dates_with_s1_within_gap": with_s1,
    }

    def cube(da: xr.DataArray, sensor: str, prov: dict[str, Any]) -> xr.DataArray:
        return make_cube(
            da.values,
            times=da[TIME].values,
            bands=da[BAND].values,
            y=grid.y,
            x=grid.x,
            crs=grid.crs,
            sensor=sensor,
            site=request.site,
            provenance=prov,
        )

    scene = Scene(site=request.site, s2=cube(s2, "s2", s2_prov), s1=cube(s1, "s1", s1_prov))
    return scene, {"s2": n_s2, "s1": int(s1.sizes[TIME]), "s2_with_s1": with_s1}


def _versions() -> dict[str, str]:
    out = {}
    for name in (
        "stembed",
        "pystac",
        "pystac-client",
        "odc-stac",
        "odc-geo",
        "sen2nbar",
        "rasterio",
        "planetary-computer",
        "numpy",
        "xarray",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    try:
        import rasterio

        out["gdal"] = str(rasterio.__gdal_version__)
    except ImportError:
        out["gdal"] = "not installed"
    return out


# ----------------------------------------------------------------------------- many sites in one call
def build_cubes(
    requests: Sequence[CubeRequest],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    workers: int | None = None,
    scheduler: str | None = None,
    connect_timeout_s: float = 30.0,
    on_done: Callable[[SiteOutcome], None] | None = None,
) -> list[SiteOutcome]:
    """Build the scene store ``OUT_DIR/<site>.zarr`` of every request, one dask task per site.

    Each task is :func:`build_site`: :func:`build_cube` as for one site (locked, staged, resumable,
    atomic), so a site that fails is reported in its :class:`SiteOutcome` and the others go on. A site
    whose store exists is skipped (``already built``) unless ``overwrite``; if that store was built for
    another grid, period or catalog it is reported as failed instead (never silently kept). Sites left
    to build run on a LocalCluster of ``workers`` processes (default: one per site, at most 4) or on
    the running cluster at ``scheduler`` (whose workers must see ``out_dir``); none starts if all are
    built. The outcomes come back in the order of ``requests``; ``on_done`` hears each as it ends.

    Raises:
        ClusterError: ``scheduler`` cannot be reached (nothing was built).
    """
    from stembed.cluster import cluster_client

    out_dir = Path(out_dir)
    say = on_done or (lambda outcome: None)
    outcomes: dict[str, SiteOutcome] = {}
    todo: list[CubeRequest] = []
    for request in requests:
        out = store_path(out_dir, request.site)
        if not overwrite and is_stembed_store(out, "scene"):
            outcomes[request.site] = _existing_store(request, out)
            say(outcomes[request.site])
        else:
            todo.append(request)
    if not todo:
        return [outcomes[r.site] for r in requests]

    from distributed import as_completed

    n_workers = workers if workers is not None else min(len(todo), 4)
    run = uuid.uuid4().hex[:8]
    with cluster_client(scheduler, n_workers, connect_timeout_s) as client:
        futures = {
            client.submit(
                build_site, request, store_path(out_dir, request.site), overwrite=overwrite,
                key=f"stembed-site-{request.site}-{run}", pure=False,
            ): request
            for request in todo
        }
        for future in as_completed(list(futures), loop=client.loop):
            request = futures[future]
            if future.status == "error":  # build_site reports every error itself: its worker was lost
                err = future.exception()
                outcome = SiteOutcome(
                    request.site, "failed", store_path(out_dir, request.site),
                    error=f"the worker building it was lost ({type(err).__name__}: {err}); fix: check the "
                    "worker's memory and logs, then rerun the same command to resume",
                )
            else:
                outcome = future.result()
            outcomes[request.site] = outcome
            say(outcome)
    return [outcomes[r.site] for r in requests]


def build_site(request: CubeRequest, out: str | Path, *, overwrite: bool = False) -> SiteOutcome:
    """One site of :func:`build_cubes` (a dask task): :func:`build_cube`, with any error reported, not raised.

    A stembed error (:class:`~stembed.errors.UserError`: empty search, too few dates, failed reads
    after retries, a locked or foreign output) or an ``OSError`` is reported by its message; any other
    exception is a bug, reported with its type and traceback. ``KeyboardInterrupt`` still stops it.
    """
    import time
    import traceback

    import dask

    out = Path(out)
    t0 = time.perf_counter()
    try:
        # odc-stac's reads run on threads in this worker, as in a single-site build; on the cluster's own
        # scheduler they would wait for a worker slot that this very task holds
        with dask.config.set(scheduler="threads"):
            res = build_cube(request, out, overwrite=overwrite, progress=False)
    except (UserError, OSError) as e:
        return SiteOutcome(request.site, "failed", out, seconds=time.perf_counter() - t0, error=str(e))
    except Exception as e:  # the per-site boundary: one site's bug must not stop the others; shown in full
        return SiteOutcome(
            request.site, "failed", out, seconds=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}",
            traceback=traceback.format_exc(),
        )
    return SiteOutcome(
        request.site, "built", res.path, res.s2_dates, res.s1_dates, res.pieces_reused,
        time.perf_counter() - t0, notes=res.notes,
    )


def _existing_store(request: CubeRequest, out: Path) -> SiteOutcome:
    """``already built`` if the scene store at ``out`` was built for ``request``'s site, grid, period and
    catalog; otherwise ``failed``, saying what differs (``--overwrite`` rebuilds it)."""
    try:
        scene = open_scene(out, check_values=False)
        prov = json.loads(str(scene.s2.attrs.get("provenance", "{}")))
    except (UserError, OSError, KeyError, ValueError) as e:
        return SiteOutcome(
            request.site, "failed", out,
            error=f"{out} is not a readable scene store ({e}); fix: rerun with --overwrite to rebuild it",
        )
    wanted = {
        "site": request.site, "grid": json.loads(json.dumps(request.grid.to_dict())),
        "period": [request.start, request.end], "catalog": request.catalog,
        "collection": request.s2_collection,
    }
    stored = {"site": scene.site} | {k: prov.get(k) for k in wanted if k != "site"}
    diffs = [f"{k} {stored[k]!r}, not {wanted[k]!r}" for k in wanted if stored[k] != wanted[k]]
    if diffs:
        return SiteOutcome(
            request.site, "failed", out,
            error=f"{out} was built with other settings ({'; '.join(diffs)}); fix: pass --overwrite to "
            "rebuild it, or choose another --out-dir",
        )
    return SiteOutcome(request.site, "already built", out, scene.s2.sizes[TIME], scene.s1.sizes[TIME])
