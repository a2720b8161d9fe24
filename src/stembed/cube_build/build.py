"""``stembed cube`` for one site: a scene store (S2 L2A + S1 RTC on one UTM 10 m grid) for any place and
period, from STAC.

The steps (this module orchestrates; each step's work lives in its layer):

1. **Search** (:mod:`stembed.io.stac`): S2 and S1 items per *piece* of the period (calendar years by
   default), with retries; the item lists are staged as JSON, so a resumed build reuses the very same items.
2. **Load** (:func:`stembed.io.stac_load.load_items`, odc-stac): every item onto the one grid
   (``groupby="id"``: one slice per item), dask-chunked; 10 m bands need no resampling, 20 m bands and
   masks are resampled with ``nearest`` (exact 2 x 2 repetition on the Sentinel-2 tile grid). A failed
   asset read stops the piece with a :class:`CubeBuildError` naming it; nothing is zero-filled.
3. **Sentinel-2** per item (:func:`stembed.cube_build.pieces.s2_piece`; the radiometry is
   :mod:`stembed.preprocess.s2_radiometry`): DN 0 = no data; ``BOA_ADD_OFFSET`` (-1000 for processing
   baseline >= 04.00, read from ``s2:processing_baseline``) added; reflectance = (DN + offset) * 1e-4; a
   cloud/shadow mask from a :class:`~stembed.preprocess.CloudMask` (default
   :class:`~stembed.preprocess.SCLMask`); BRDF nadir normalisation with sen2nbar's c-factor
   (:func:`~stembed.preprocess.nbar_c_factor`) from the angle grids of the item's own granule metadata
   (``MTD_TL.xml``, fetched by :mod:`stembed.io.stac_load` and handed to sen2nbar as a local file:
   sen2nbar never touches the network). **B8A**: sen2nbar has no coefficients for it; B8A is corrected
   with B08's coefficients (both come from the same MODIS NIR band, 841-876 nm, which B8A's 865 nm lies
   in) and B8A's own view angles. Then same-day items are merged (first valid item per pixel) and
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
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from stembed.config import CubeConfig
from stembed.contract import Scene, make_cube
from stembed.cube_build.pieces import build_piece, orbit_state, piece_done, read_pieces, select_orbit
from stembed.cube_build.request import BuildResult, CubeRequest, shared_settings
from stembed.errors import CubeBuildError
from stembed.io.cube import save_scene
from stembed.io.outputs import check_store_output, lock_output
from stembed.io.stac import Piece, http_session, period_pieces, search_items, utm_grid
from stembed.io.stac_load import configure_gdal
from stembed.preprocess import prepare_s1
from stembed.types import BAND, TIME


def staging_dir(out: str | Path) -> Path:
    """Where an unfinished build of ``out`` keeps its searched items and finished pieces."""
    out = Path(out)
    return out.with_name(out.name + ".staging")


def build_area(
    cfg: CubeConfig,
    out: str | Path,
    *,
    start: str,
    end: str,
    bbox: tuple[float, float, float, float] | None = None,
    point: tuple[float, float] | None = None,
    size_m: float | None = None,
    site: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> BuildResult:
    """``stembed cube --out``: the scene store ``out`` of an area (``bbox`` W S E N, or ``point`` and ``size_m``)
    from ``start`` to ``end`` with the settings of ``cfg``; the site id is ``site``, else ``out``'s stem.

    Raises:
        CubeBuildError, StacError: a bad area or setting, and every error of :func:`build_cube`.
    """
    out = Path(out)
    request = CubeRequest(
        grid=utm_grid(bbox=bbox, point=point, size_m=size_m), start=start, end=end,
        site=site or out.name.removesuffix(".zarr"), **shared_settings(cfg),
    )
    return build_cube(request, out, overwrite=overwrite, progress=progress, echo=echo)


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
    configure_gdal(request.retry)
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
                items[piece.name, sensor] = staged_search(stage, piece, sensor, collection, request)
                bar.update()
        orbit = _check_search(request, pieces, items, notes, say)

        loaded = reused = 0
        for piece in pieces:
            for sensor in ("s2", "s1"):
                bar.set_postfix_str(f"load {sensor} {piece.name}")
                if piece_done(stage, piece, sensor):
                    reused += 1
                else:
                    piece_items = items[piece.name, sensor]
                    if sensor == "s1":
                        piece_items = select_orbit(piece_items, orbit)
                    build_piece(stage, piece, sensor, piece_items, request, session)
                    loaded += 1
                bar.update()

        bar.set_postfix_str("assemble")
        scene, counts = _assemble(stage, pieces, request, orbit, notes)
        check_store_output(out, "scene", overwrite=overwrite)  # again: --out may have changed meanwhile
        save_scene(scene, out, overwrite=overwrite)
        bar.update()
    except BaseException:
        drop_empty_staging(stage)
        raise
    finally:
        bar.close()
    shutil.rmtree(stage, ignore_errors=True)
    return BuildResult(
        path=out, s2_dates=counts["s2"], s1_dates=counts["s1"], s2_dates_with_s1=counts["s2_with_s1"],
        s1_max_gap_days=request.s1_max_gap_days, s1_orbit=orbit, pieces_loaded=loaded, pieces_reused=reused,
        notes=tuple(notes),
    )


def drop_empty_staging(stage: Path) -> None:
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


def staged_search(
    stage: Path, piece: Piece, sensor: str, collection: str, request: CubeRequest
) -> list[Any]:
    """The items of ``collection`` for one piece: searched once, then read back from the staged JSON (a resume
    uses the very same items)."""
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
        counts[orbit_state(it)] = counts.get(orbit_state(it), 0) + 1
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


def _assemble(
    stage: Path, pieces: list[Piece], request: CubeRequest, orbit: str, notes: list[str]
) -> tuple[Scene, dict[str, int]]:
    grid = request.grid
    s2, s2_meta = read_pieces(stage, pieces, "s2")
    s1_linear, s1_meta = read_pieces(stage, pieces, "s1")
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
    with_s1 = _s2_dates_with_s1(s2, s1, request, notes)
    s2_prov, s1_prov = _provenance(request, pieces, orbit, notes, s2_meta, s1_meta, with_s1)

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

    scene = Scene(site=request.site, sensors={"s2": cube(s2, "s2", s2_prov), "s1": cube(s1, "s1", s1_prov)})
    return scene, {"s2": n_s2, "s1": int(s1.sizes[TIME]), "s2_with_s1": with_s1}


def _s2_dates_with_s1(s2: xr.DataArray, s1: xr.DataArray, request: CubeRequest, notes: list[str]) -> int:
    """How many S2 dates have an S1 date within ``s1_max_gap_days`` (none is an error; fewer than all, a note)."""
    n_s2 = s2.sizes[TIME]
    with_s1 = int(s2_dates_near_s1(s2[TIME].values, s1[TIME].values, request.s1_max_gap_days).sum())
    if with_s1 == 0:
        raise CubeBuildError(
            f"no S1 coverage: none of the {n_s2} S2 dates has an S1 date within {request.s1_max_gap_days:g} days; "
            "fix: raise --s1-max-gap-days or try --s1-orbit both"
        )
    if with_s1 < n_s2:
        notes.append(
            f"{n_s2 - with_s1} of {n_s2} S2 dates have no S1 date within {request.s1_max_gap_days:g} days"
        )
    return with_s1


def s2_dates_near_s1(s2_times: Any, s1_times: Any, max_gap_days: float) -> np.ndarray:
    """Per S2 date, whether an S1 date lies within ``max_gap_days`` (bool, one per S2 date; all False without S1)."""
    t2 = pd.DatetimeIndex(s2_times).asi8
    t1 = pd.DatetimeIndex(s1_times).asi8
    if not len(t1):
        return np.zeros(len(t2), bool)
    gaps = np.min(np.abs(t2[:, None] - t1[None, :]), axis=1) / 86_400e9
    return np.asarray(gaps <= max_gap_days)


def _provenance(
    request: CubeRequest, pieces: list[Piece], orbit: str, notes: list[str], s2_meta: list[dict[str, Any]],
    s1_meta: list[dict[str, Any]], with_s1: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The S2 and S1 cubes' provenance: what was searched, read and done to the values."""
    grid = request.grid
    common = {
        "source": "STAC",
        "builder": "stembed.cube_build.build_cube",
        "catalog": request.catalog,
        "grid": grid.to_dict(),
        "period": [request.start, request.end],
        "pieces": [p.name for p in pieces],
        "notes": notes,
        "versions": tool_versions(),
        # with the entries below, every CubeConfig setting is recorded ("s1_orbit" as asked; "orbit_direction": used)
        "min_dates": request.min_dates,
        "s1_orbit": request.s1_orbit,
        "piece_months": request.piece_months,
        "retries": request.retry.retries,
        "resampling": request.resampling,  # of the 20 m bands (and S1) onto the grid
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
    return s2_prov, s1_prov


def tool_versions() -> dict[str, str]:
    """The versions of stembed and the libraries that decide a cube's values, for the provenance."""
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
