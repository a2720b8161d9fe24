"""``stembed cube --extend STORE --end NEW_DATE``: a scene store that grows, for monitoring (issue #26).

**The settings are the store's.** Everything that decides a value is read from the store's provenance
(:func:`recorded_settings`: grid, CRS and site, catalog, collections, cloud mask, BRDF, valid fraction, the S1
orbit direction used, the tolerance, the resampling). Settings given with ``--extend`` are compared with them,
and one that differs is refused; the fetch settings ``--retries`` and ``--piece-months`` may differ (they change
no value). The area, site, start and output come from the store: the command refuses those options outright.

**What is appended.** Sentinel-2: the items from the day after the store's last S2 acquisition date (kept, or
dropped by the cloud filter) to ``NEW_DATE``, processed as a build does; each S2 date is processed on its own, so
the new dates equal those of a single build over the whole period. Sentinel-1: the 3-frame *centred* rolling mean
(:func:`stembed.preprocess.prepare_s1`) reads each date's neighbours, so the S1 items are fetched from the day of
the store's last S1 acquisition: the first new date's mean then uses the real acquisition before it, and every
new S1 date equals a whole-period build's. That old last acquisition is fetched for its neighbour only and is
**not rewritten** (append-only: a monitoring store never changes its past): in a whole-period build its own mean
would take the first new date in; in the store it keeps the two-frame mean it was written with. So an extended
store differs from a single build of the whole period in exactly one place, the S1 values of the store's last S1
date before the extension. Dates already in the store are never rewritten; items that reach the catalog late
for a day the store has considered already (S2: up to its last S2 acquisition date; S1: up to its last S1 date)
are not added.

**Atomic, resumable, locked.** The run owns ``STORE.lock`` (as ``stembed cube`` and ``embed`` do). Searches and
pieces are staged in ``STORE.extend-staging/`` (:func:`extend_staging_dir`), so an interrupted run resumes
there; the new part is then appended in place under a journal (:mod:`stembed.cube_build.append`), so a kill at
any point leaves either the old store, readable, or a store that readers refuse until the same command is run
again and finishes it. Each extension is recorded in the store's root attribute ``extensions`` and in each
cube's provenance (when, old end, new end, dates added), and the cubes' ``period``, ``items`` and ``dates``
are extended.

**Not an error:** no new date (the store records the new end, 0 dates added); rerunning the last extension
(``NEW_DATE`` equal to the end it recorded: nothing to do). **Refused** with one line naming the fix, the store
untouched: ``NEW_DATE`` not after the store's end; a setting that differs from the store's; a store without the
provenance of ``stembed cube``; a store locked by another run; a store mid-extension to another end.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from stembed.config import CubeConfig
from stembed.contract import provenance_json
from stembed.cube_build import append
from stembed.cube_build.build import drop_empty_staging, s2_dates_near_s1, staged_search, tool_versions
from stembed.cube_build.pieces import build_piece, piece_done, read_pieces, select_orbit
from stembed.cube_build.request import MIN_DATES_DEFAULT, CubeRequest
from stembed.errors import CubeBuildError
from stembed.geometry import GridSpec
from stembed.io.cube import EXTENDING_ATTR, open_scene
from stembed.io.outputs import is_stembed_store, lock_output
from stembed.io.stac import PLANETARY_COMPUTER, Piece, RetryPolicy, http_session, period_pieces
from stembed.io.stac_load import configure_gdal
from stembed.preprocess import CloudMask, SCLMask, load_cloud_mask, prepare_s1
from stembed.types import TIME, X, Y

EXTENSIONS_ATTR = "extensions"
"""Root attribute (and provenance key) of a scene store: one record per extension, oldest first."""
_BUILDER = "stembed.cube_build.build_cube"
_REQUIRED = {
    "s2": ("builder", "grid", "catalog", "collection", "period", "cloud_mask", "brdf", "min_valid_fraction"),
    "s1": ("collection", "period", "orbit_direction", "s1_max_gap_days"),
}
_FETCH_ONLY = {"stage", "retries", "piece_months"}  # CubeConfig fields that change no value


@dataclass(frozen=True)
class ExtendResult:
    """What :func:`extend_store` did."""

    path: Path
    old_end: str  # the store's end before the extension
    end: str  # its end now
    s2_dates_added: int
    s1_dates_added: int
    s2_dates: int  # in the store now
    s1_dates: int
    finished_interrupted: bool  # a killed run's extension was finished
    notes: tuple[str, ...]
    up_to_date: bool = False  # extended to ``end`` before: nothing done

    def summary(self) -> str:
        """One line for the command line."""
        if self.up_to_date:
            return (f"{self.path} is extended to {self.end} already: nothing to do ({self.s2_dates} S2, "
                    f"{self.s1_dates} S1 dates)")
        done = " (finished an interrupted extension)" if self.finished_interrupted else ""
        return (
            f"extended {self.path} from {self.old_end} to {self.end}{done}: {self.s2_dates_added} S2 and "
            f"{self.s1_dates_added} S1 dates added (now {self.s2_dates} S2, {self.s1_dates} S1 dates)"
        )


@dataclass(frozen=True)
class Recorded:
    """The settings a store was built with (read from its provenance), as the request that built it."""

    request: CubeRequest  # start/end: the store's period
    orbit: str  # the S1 orbit direction it used
    provenance: dict[str, dict[str, Any]]  # "s2"/"s1"


@dataclass(frozen=True)
class ExtendPlan:
    """What one extension fetches: S2 from ``s2_from``, S1 from ``s1_from`` (the old last S1 day), to ``end``."""

    request: CubeRequest  # the store's settings, with this run's fetch settings
    end: str
    s2_from: str
    s1_from: str
    s2_pieces: list[Piece]
    s1_pieces: list[Piece]
    identity: dict[str, Any]  # what a staged extension must match to be resumed


def extend_staging_dir(store: str | Path) -> Path:
    """Where an unfinished extension of ``store`` keeps its searches, pieces and staged new part."""
    store = Path(store)
    return store.with_name(store.name + ".extend-staging")


def extend_store(
    store: str | Path,
    end: str,
    *,
    config: CubeConfig | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> ExtendResult:
    """``stembed cube --extend STORE --end END``: append to the scene store ``store`` (built by ``stembed cube``) the
    dates after its last one up to ``end``, with the store's own settings (see the module docstring: the S1 rolling
    mean, append-only semantics, the journal).

    Args:
        config: settings the caller gives (only the fields set in it count: ``CubeConfig(min_dates=4)`` gives one);
            each must equal the store's, except ``retries`` and ``piece_months``, which this run uses.

    Raises:
        CubeBuildError: ``end`` not after the store's end, a setting differing from the store's, a store without
            ``stembed cube``'s provenance or mid-extension to another end, and every error of a build's fetch.
        OutputError: another run holds the store's lock.
    """
    store = Path(store)
    end = _date(end)
    if not is_stembed_store(store, "scene"):
        raise CubeBuildError(
            f"--extend {store}: there is no stembed scene store there; fix: check the path, or build one with "
            "stembed cube --out"
        )
    with lock_output(store, command="cube --extend", option="--extend", echo=echo):
        return _extend_owned(store, end, config, progress, echo or (lambda msg: None))


def _date(text: str) -> str:
    try:
        return pd.Timestamp(text).strftime("%Y-%m-%d")
    except ValueError as e:
        raise CubeBuildError(f"--end {text!r} is not a date; fix: use YYYY-MM-DD") from e


def _extend_owned(
    store: Path, end: str, config: CubeConfig | None, progress: bool, say: Callable[[str], None]
) -> ExtendResult:
    recorded = recorded_settings(store, config)
    stage = extend_staging_dir(store)
    marker = append.root_attrs(store).get(EXTENDING_ATTR)
    if marker is not None:
        return _finish(store, stage, end, marker, say)
    scene = _open_checked(store, recorded)
    old_end = recorded.request.end
    if end <= old_end:
        return _nothing_to_do(store, scene, old_end, end, stage)
    plan = plan_extension(recorded, scene, end)
    journal = _staged_part(store, plan, recorded, scene, progress, say)
    return _apply(store, stage, journal, finished_interrupted=False)


# ----------------------------------------------------------------------------- the store's settings
def recorded_settings(store: Path, config: CubeConfig | None = None) -> Recorded:
    """The settings ``store`` was built with, from its cubes' provenance; the fields set in ``config`` must equal
    them (except the fetch settings).

    Raises:
        CubeBuildError: the store lacks ``stembed cube``'s provenance, or ``config`` sets a different value.
    """
    prov = {sensor: _provenance(store, sensor) for sensor in ("s2", "s1")}
    p2, p1 = prov["s2"], prov["s1"]
    missing = [f"{s}.{k}" for s, keys in _REQUIRED.items() for k in keys if k not in prov[s]]
    if missing or p2.get("builder") != _BUILDER:
        raise CubeBuildError(
            f"--extend {store}: the store has no provenance of stembed cube to extend from (builder "
            f"{p2.get('builder')!r}, missing {', '.join(missing) or 'nothing'}); only stores built by stembed cube "
            "from STAC can grow; fix: build one with stembed cube --out STORE --start ... --end ..."
        )
    mask, differences = _recorded_mask(store, p2["cloud_mask"], config)
    differences += _differences(p2, p1, config)
    if differences:
        raise CubeBuildError(
            f"--extend {store}: {'; '.join(differences)}; an extension appends with the store's own settings; "
            "fix: drop those options (or --config/--set keys), or build a new store with stembed cube --out"
        )
    piece_months, retries = _fetch_settings(p2, config)
    request = CubeRequest(
        grid=GridSpec(**p2["grid"]), start=p2["period"][0], end=p2["period"][1],
        site=str(append.root_attrs(store).get("site")), catalog=p2["catalog"], s2_collection=p2["collection"],
        s1_collection=p1["collection"], cloud_mask=mask, brdf=p2["brdf"] != "none",
        min_valid_fraction=p2["min_valid_fraction"], min_dates=p2.get("min_dates", MIN_DATES_DEFAULT),
        s1_orbit=p2.get("s1_orbit", p1["orbit_direction"]), s1_max_gap_days=p1["s1_max_gap_days"],
        piece_months=piece_months, resampling=_resampling(p2), retry=RetryPolicy(retries=retries),
    )
    return Recorded(request=request, orbit=str(p1["orbit_direction"]), provenance=prov)


def _fetch_settings(p2: dict[str, Any], config: CubeConfig | None) -> tuple[int, int]:
    """``piece_months`` and ``retries`` for this run: as given in ``config``, else as the store was built."""
    given = config.model_fields_set if config is not None else set()
    piece_months = config.piece_months if config is not None and "piece_months" in given else p2.get("piece_months")
    retries = config.retries if config is not None and "retries" in given else p2.get("retries")
    defaults = CubeConfig()
    return (int(piece_months if piece_months is not None else defaults.piece_months),
            int(retries if retries is not None else defaults.retries))


def _provenance(store: Path, sensor: str) -> dict[str, Any]:
    """The provenance attribute of the store's ``sensor`` cube, read from its zarr metadata ({} if absent)."""
    try:
        meta = json.loads((store / sensor / sensor / "zarr.json").read_text())
        prov = json.loads(meta["attributes"]["provenance"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return {}
    return prov if isinstance(prov, dict) else {}


def _resampling(p2: dict[str, Any]) -> str:
    """The recorded resampling (stores from before it was recorded: named in the product text; else nearest)."""
    if "resampling" in p2:
        return str(p2["resampling"])
    found = re.search(r"resampled \((\w+)\)", str(p2.get("product", "")))
    return found.group(1) if found else "nearest"


def _recorded_mask(
    store: Path, described: dict[str, Any], config: CubeConfig | None
) -> tuple[CloudMask, list[str]]:
    """The store's cloud mask, rebuilt (SCL) or taken from ``config`` (which must describe itself the same); and the
    difference, if any.

    Raises:
        CubeBuildError: the store's mask is a plug-in and ``config`` names none.
    """
    given = config.model_fields_set & {"cloud_mask", "scl_classes"} if config is not None else set()
    if given and config is not None:
        mask = load_cloud_mask(config.cloud_mask, scl_classes=config.scl_classes)
        if json.loads(json.dumps(mask.describe())) != described:
            return mask, [f"the cloud mask given is {mask.describe()}, the store's is {described}"]
        return mask, []
    if described.get("kind") == "scl":
        return SCLMask(tuple(int(c) for c in described["masked_classes"]), asset=str(described["asset"])), []
    raise CubeBuildError(
        f"--extend {store}: the store's cloud mask is a plug-in ({described}), which stembed cannot rebuild from "
        "its description; fix: pass the same --cloud-mask module:Name the store was built with"
    )


def _differences(p2: dict[str, Any], p1: dict[str, Any], config: CubeConfig | None) -> list[str]:
    """Each setting set in ``config`` that differs from the store's (fetch settings are never compared)."""
    if config is None:
        return []
    stored = {
        "catalog": p2["catalog"], "s2_collection": p2["collection"], "s1_collection": p1["collection"],
        "brdf": p2["brdf"] != "none", "min_valid_fraction": p2["min_valid_fraction"],
        "min_dates": p2.get("min_dates", MIN_DATES_DEFAULT), "s1_orbit": p2.get("s1_orbit", p1["orbit_direction"]),
        "s1_max_gap_days": p1["s1_max_gap_days"],
    }
    out = []
    for key in sorted(config.model_fields_set - _FETCH_ONLY - {"cloud_mask", "scl_classes"}):
        value = getattr(config, key)
        value = (value or PLANETARY_COMPUTER) if key == "catalog" else value
        if value != stored[key] and not (key == "s1_orbit" and value == p1["orbit_direction"]):
            option = "--no-brdf" if key == "brdf" else "--" + key.replace("_", "-")
            out.append(f"{option} ({key}) is {value!r} but the store was built with {stored[key]!r}")
    return out


def _open_checked(store: Path, recorded: Recorded) -> Any:
    """The store as a scene (checked by :func:`open_scene`), on the grid its provenance records, without companions."""
    scene = open_scene(store, check_values=False)
    grid = recorded.request.grid
    same = scene.s2.sizes[Y] == grid.height_px and scene.s2.sizes[X] == grid.width_px and np.allclose(
        scene.s2[X].values, grid.x, atol=1e-3) and np.allclose(scene.s2[Y].values, grid.y, atol=1e-3)
    if not same:
        raise CubeBuildError(
            f"--extend {store}: the store's grid is not the grid its provenance records (cropped or rewritten?), "
            "so new dates cannot be fetched onto it; fix: build a new store with stembed cube --out"
        )
    if scene.extra:
        raise CubeBuildError(
            f"--extend {store}: the store holds companion-sensor cubes ({', '.join(scene.extra)}), which an "
            "extension cannot grow; fix: extend a store of S2 and S1 only, then add the companions again"
        )
    return scene


# ----------------------------------------------------------------------------- what to fetch
def plan_extension(recorded: Recorded, scene: Any, end: str) -> ExtendPlan:
    """S2 from the day after the store's last S2 acquisition date (kept or not), S1 from the day of its last S1 date.

    Raises:
        StacError: a bad ``--piece-months``.
    """
    request = dataclasses.replace(recorded.request, end=end)
    considered = [d["date"] for d in recorded.provenance["s2"].get("dates", []) if "date" in d]
    last_s2 = max([pd.Timestamp(t).normalize() for t in (*considered, scene.s2[TIME].values[-1])])
    s2_from = (last_s2 + pd.Timedelta(days=1)).strftime("%Y-%m-%d")
    s1_from = pd.Timestamp(scene.s1[TIME].values[-1]).strftime("%Y-%m-%d")
    months = request.piece_months
    identity = {
        "format": 1, "settings": request.identity() | {"start": s2_from, "piece_months": months},
        "old_end": recorded.request.end, "s1_from": s1_from, "orbit": recorded.orbit,
        "dates": [int(scene.s2.sizes[TIME]), int(scene.s1.sizes[TIME])],
    }
    return ExtendPlan(
        request=request, end=end, s2_from=s2_from, s1_from=s1_from,
        s2_pieces=period_pieces(s2_from, end, months=months), s1_pieces=period_pieces(s1_from, end, months=months),
        identity=identity,
    )


def _nothing_to_do(store: Path, scene: Any, old_end: str, end: str, stage: Path) -> ExtendResult:
    """``end`` is not after the store's end: the rerun of its last extension is done already; anything else is
    refused."""
    last = (append.root_attrs(store).get(EXTENSIONS_ATTR) or [{}])[-1]
    if end == old_end and isinstance(last, dict) and last.get("new_end") == end:
        shutil.rmtree(stage, ignore_errors=True)  # what a run killed after its commit left
        return ExtendResult(
            path=store, old_end=str(last.get("old_end")), end=end, s2_dates_added=0, s1_dates_added=0,
            s2_dates=int(scene.s2.sizes[TIME]), s1_dates=int(scene.s1.sizes[TIME]), finished_interrupted=False,
            notes=(), up_to_date=True,
        )
    raise CubeBuildError(
        f"--end {end} is not after the store's end {old_end}: an extension appends the dates after it; fix: pass "
        f"a later --end (an earlier period is a new store: stembed cube --out NEW.zarr --start ... --end ...)"
    )


# ----------------------------------------------------------------------------- staging the new part
def _staged_part(
    store: Path, plan: ExtendPlan, recorded: Recorded, scene: Any, progress: bool, say: Callable[[str], None]
) -> dict[str, Any]:
    """The journal of the new part, staged (resumed from an earlier run's staging of the same extension)."""
    stage = extend_staging_dir(store)
    _open_stage(stage, plan.identity, say)
    journal = append.load_journal(stage)
    if journal is not None:
        return journal
    shutil.rmtree(stage / append.NEW_PART, ignore_errors=True)  # not complete: made again
    try:
        fetch_pieces(stage, plan, recorded.orbit, progress)
        cubes, metas, notes = _new_dates(stage, plan, scene)
        journal = make_journal(store, plan, recorded, scene, cubes, metas, notes)
        append.save_new_part(stage, cubes, journal)
    except BaseException:
        drop_empty_staging(stage)
        raise
    return journal


def _open_stage(stage: Path, identity: dict[str, Any], say: Callable[[str], None]) -> None:
    """Make ``stage`` the staging folder of this extension: a staged extension of the same identity is kept (to
    resume), another one discarded; a folder that is not a staging folder is refused."""
    if stage.exists() or stage.is_symlink():
        if not stage.is_dir() or not (stage / "request.json").is_file():
            raise CubeBuildError(
                f"{stage} exists but is not a staged stembed cube extension (no request.json); fix: move it away"
            )
        try:
            staged = json.loads((stage / "request.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            staged = None
        if staged == json.loads(json.dumps(identity)):
            return
        say(f"note: discarding {stage}, staged for another extension")
        shutil.rmtree(stage)
    tmp = stage.with_name(f".{stage.name}.tmp-{uuid.uuid4().hex[:8]}")
    (tmp / "search").mkdir(parents=True)
    (tmp / "pieces").mkdir()
    (tmp / "request.json").write_text(json.dumps(identity, indent=1, sort_keys=True))
    tmp.rename(stage)


def fetch_pieces(stage: Path, plan: ExtendPlan, orbit: str, progress: bool) -> None:
    """Search and stage each S2 and S1 piece of the extension (a piece staged by an earlier run is kept)."""
    from tqdm.auto import tqdm

    request = plan.request
    session = http_session(request.retry)
    configure_gdal(request.retry)
    work = [("s2", p, request.s2_collection) for p in plan.s2_pieces]
    work += [("s1", p, request.s1_collection) for p in plan.s1_pieces]
    for sensor, piece, collection in tqdm(work, disable=not progress, desc="stembed cube --extend", unit="piece"):
        if piece_done(stage, piece, sensor):
            continue
        items = staged_search(stage, piece, sensor, collection, request)
        build_piece(stage, piece, sensor, select_orbit(items, orbit) if sensor == "s1" else items, request, session)


def _new_dates(
    stage: Path, plan: ExtendPlan, scene: Any
) -> tuple[dict[str, xr.DataArray], dict[str, list[dict[str, Any]]], list[str]]:
    """The new dates of each sensor (S1 prepared with its old last acquisition as the first new date's neighbour,
    which is then left out), with their per-date provenance, and notes."""
    notes: list[str] = []
    s2, s2_meta = read_pieces(stage, plan.s2_pieces, "s2")
    s1_linear, s1_meta = read_pieces(stage, plan.s1_pieces, "s1")
    last_s1 = pd.Timestamp(plan.s1_from)
    s1 = None
    if s1_linear is not None:
        days = pd.DatetimeIndex(s1_linear[TIME].values).normalize()
        if not (days == last_s1).any():
            notes.append(
                f"the store's last S1 acquisition ({plan.s1_from}) was not found again, so the first new S1 date's "
                "rolling mean is without it"
            )
        s1 = prepare_s1(s1_linear).isel({TIME: np.flatnonzero(days > last_s1)})
    cubes = {"s2": _or_empty(s2, scene.s2), "s1": _or_empty(s1, scene.s1)}
    metas = {"s2": s2_meta, "s1": [d for d in s1_meta if pd.Timestamp(d["date"]) > last_s1]}
    return cubes, metas, notes


def _or_empty(da: xr.DataArray | None, like: xr.DataArray) -> xr.DataArray:
    """``da``, or no date on the grid and bands of ``like``."""
    if da is not None:
        return da.astype(np.float32)
    return like.isel({TIME: slice(0, 0)}).load().drop_attrs()


def make_journal(
    store: Path, plan: ExtendPlan, recorded: Recorded, scene: Any, cubes: dict[str, xr.DataArray],
    metas: dict[str, list[dict[str, Any]]], notes: list[str],
) -> dict[str, Any]:
    """The store's target state after the extension (:mod:`stembed.cube_build.append`), and its record."""
    old = {s: scene.sensors[s] for s in cubes}
    times = {s: pd.DatetimeIndex(np.concatenate([old[s][TIME].values, cubes[s][TIME].values])) for s in cubes}
    gap = recorded.request.s1_max_gap_days
    near = s2_dates_near_s1(cubes["s2"][TIME].values, times["s1"], gap)
    if not near.all():
        notes.append(f"{int((~near).sum())} of the {near.size} new S2 dates have no S1 date within {gap:g} days")
    record = {
        "when": pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ"), "old_end": recorded.request.end,
        "new_end": plan.end, "s2_dates_added": int(cubes["s2"].sizes[TIME]),
        "s1_dates_added": int(cubes["s1"].sizes[TIME]), "s2_searched_from": plan.s2_from,
        "s1_fetched_from": plan.s1_from, "s1_kept_as_written": plan.s1_from, "notes": list(notes),
        "versions": tool_versions(),
    }
    groups = {}
    for sensor in ("s2", "s1"):
        prov = _extended_provenance(recorded.provenance[sensor], plan.end, metas[sensor], record)
        if sensor == "s1":
            prov["s2_dates_with_s1_within_gap"] = int(s2_dates_near_s1(times["s2"], times["s1"], gap).sum())
        groups[sensor] = {
            "n_old": int(old[sensor].sizes[TIME]), "n_new": int(cubes[sensor].sizes[TIME]),
            "time_ns": times[sensor].asi8.tolist(), "provenance": provenance_json(prov),
        }
    root = append.root_attrs(store)
    root[EXTENSIONS_ATTR] = [*root.get(EXTENSIONS_ATTR, []), record]
    return {"format": append.JOURNAL_FORMAT, "end": plan.end, "old_end": recorded.request.end, "groups": groups,
            "root_attrs": root, "record": record}


def _extended_provenance(
    prov: dict[str, Any], end: str, meta: list[dict[str, Any]], record: dict[str, Any]
) -> dict[str, Any]:
    """A cube's provenance after the extension: its period to ``end``, the new dates' items and per-date facts, the
    record of the extension."""
    out = dict(prov)
    out["period"] = [prov["period"][0], end]
    out["items"] = [*prov.get("items", []), *(i for d in meta for i in d["items"])]
    out["dates"] = [*prov.get("dates", []), *meta]
    if "processing_baselines" in prov:
        new = {str(b) for d in meta for b in d.get("processing_baseline", [])}
        out["processing_baselines"] = sorted({*map(str, prov["processing_baselines"]), *new})
    out[EXTENSIONS_ATTR] = [*prov.get(EXTENSIONS_ATTR, []), record]
    return out


# ----------------------------------------------------------------------------- changing the store
def _apply(store: Path, stage: Path, journal: dict[str, Any], *, finished_interrupted: bool) -> ExtendResult:
    """Mark, append, commit (:mod:`stembed.cube_build.append`), then remove the staging folder."""
    if append.root_attrs(store).get(EXTENDING_ATTR) is None:
        append.mark_extending(store, {
            "end": journal["end"], "old_end": journal["old_end"], "started": journal["record"]["when"],
            "staging": str(stage),
        })
    append.apply_journal(store, stage, journal)
    append.commit_extension(store, journal)
    remove_stage(stage)
    record, groups = journal["record"], journal["groups"]
    return ExtendResult(
        path=store, old_end=journal["old_end"], end=journal["end"], s2_dates_added=record["s2_dates_added"],
        s1_dates_added=record["s1_dates_added"], s2_dates=len(groups["s2"]["time_ns"]),
        s1_dates=len(groups["s1"]["time_ns"]), finished_interrupted=finished_interrupted,
        notes=tuple(record["notes"]),
    )


def _finish(store: Path, stage: Path, end: str, marker: Any, say: Callable[[str], None]) -> ExtendResult:
    """Finish the extension a killed run began (the store is marked): the same ``end`` only."""
    target = marker.get("end") if isinstance(marker, dict) else None
    if target != end:
        raise CubeBuildError(
            f"{store} is mid-extension to {target} (a run was interrupted); fix: finish that one first with the same "
            f"command: stembed cube --extend {store} --end {target}"
        )
    journal = append.load_journal(stage)
    if journal is None or journal.get("end") != end:
        raise CubeBuildError(
            f"{store} is mid-extension to {end}, but the staged new dates ({stage / append.NEW_PART}) are gone, so "
            f"it cannot be finished; fix: restore {stage}, or build the store again with stembed cube --out"
        )
    say(f"note: finishing the interrupted extension of {store} to {end}")
    return _apply(store, stage, journal, finished_interrupted=True)


def remove_stage(stage: Path) -> None:
    """Remove the staging folder of a finished extension."""
    shutil.rmtree(stage, ignore_errors=True)
