"""``stembed embed``: every pixel and date of a scene store, tile by tile, on dask.distributed (or, with one
local worker, in this process).

Each tile is an independent task: read the tile plus a halo of ``context_px`` pixels (real
neighbours inside the cube, reflected pixels beyond its edge, exactly what the per-patch reference
sees), embed it (:func:`stembed.inference.engine.embed_block_dense` for a ``dense`` bundle, else
per patch with :func:`~stembed.inference.engine.embed_block`), write its chunk-aligned region of
the output, then its done flag. So memory is bounded by the tile (all dates of ``tile_px`` +
halo squared pixels per worker), a killed run resumes at the first unfinished tile, and a rerun of a
finished output writes nothing.

Workers open the cube and the bundle themselves, so with ``--scheduler`` they must see the same
paths (a shared filesystem). With ``workers: 1`` and no scheduler no cluster starts: the tiles run one after
another in this process, through the same :func:`run_tile` a worker runs (a local worker process takes
seconds to start, longer than a small area takes to embed; ``benchmarks/embed_in_process.py``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from stembed.cluster import cluster_client
from stembed.config import EmbedConfig, dump_config
from stembed.contract import CubeError, Scene, cube_transform, value_problems
from stembed.data.build import match_gap_days, matched_arrays, sensor_arrays
from stembed.data.datasets import SensorArrays, fold_index
from stembed.data.sampling import day_numbers
from stembed.data.windows import min_dates
from stembed.inference.daily import (
    FLAG_MEANINGS,
    FLAG_MODEL,
    FLAG_NONE,
    FLAG_OBSERVED,
    check_savgol,
    daily_dates,
    fill_daily,
)
from stembed.inference.engine import embed_any, resolve_device
from stembed.inference.reference import check_bundle_for_scene
from stembed.io import embeddings as store
from stembed.io.cube import open_scene
from stembed.io.embeddings import EmbedError
from stembed.io.outputs import (
    check_store_output,
    discard_store,
    lock_output,
    remove_leftovers,
)
from stembed.io.sinks import EmbeddingSink
from stembed.models.bundle import Bundle, load_bundle
from stembed.models.context import ContextFusionModel
from stembed.models.fusion import FusionBase
from stembed.models.gapfill import GapFillModel
from stembed.pretrained import resolve_bundle
from stembed.repro import file_sha256, provenance
from stembed.runtime import tune_allocator
from stembed.sensors import SENSORS, SensorSpec, know_spec
from stembed.types import TIME, X, Y


@dataclass(frozen=True)
class EmbedResult:
    """What a run did: tiles written now, tiles already done before it, the measured storage error."""

    out: Path
    tiles_written: int
    tiles_skipped: int
    storage_error: dict[str, Any]
    seconds: float
    notes: tuple[str, ...] = ()  # what the user should know about the output (e.g. a fill that was off)


@dataclass(frozen=True)
class TileJob:
    """Everything a worker needs for one tile (plain, picklable values)."""

    cube: str
    cube_fingerprint: str
    bundle: str
    bundle_sha256: str
    sink: EmbeddingSink  # where the tile is written (a path inside: picklable)
    grid: store.TileGrid
    tile: tuple[int, int]
    quant: store.Quantisation
    # every sensor but the S2 anchor -> how far (days) its date may lie from an S2 date (S1, then companions)
    max_gap_days: tuple[tuple[str, float], ...]
    batch_size: int
    device: str
    threads: int | None
    precision: str = "float32"
    companion_specs: tuple[SensorSpec, ...] = ()  # the companion sensors' specs, from the bundle
    daily: DailyJob | None = None
    progress_topic: str | None = None  # dask event topic the worker reports embedded pixel-dates to
    features: int | None = None  # write the first that many features (a nested prefix); None: all


@dataclass(frozen=True)
class DailyJob:
    """What a ``--daily`` tile does beyond the per-date embedding (see :mod:`stembed.inference.daily`)."""

    method: str
    savgol_window_days: int
    savgol_order: int
    model_fill: bool
    first_day: int
    last_day: int


# ----------------------------------------------------------------------------- reading a tile
def _block_index(
    scene: Scene, rows: slice, cols: slice, halo: int
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Row and column indices of a block with its halo (reflected at the cube's edges), and the
    bounding box ``(y0, y1, x0, x1)`` of the cube rows and columns they touch."""
    height, width = scene.s2.sizes[Y], scene.s2.sizes[X]
    yi = fold_index(rows.start - halo, rows.stop + halo, 0, height)
    xi = fold_index(cols.start - halo, cols.stop + halo, 0, width)
    return yi, xi, (int(yi.min()), int(yi.max()) + 1, int(xi.min()), int(xi.max()) + 1)


def read_block(
    scene: Scene, rows: slice, cols: slice, halo: int, max_gap_days: Mapping[str, float]
) -> dict[str, SensorArrays]:
    """Every sensor's values of a block with its halo, on the S2 dates, and their day numbers.

    Only the block and halo are read from the (lazy) cubes. Returns, by sensor name, S2's own values
    ``(time, band, h+2r, w+2r)`` and days, then each sensor of ``max_gap_days`` (S1, companions) matched to
    the S2 dates within its tolerance (days: the matched dates', see :func:`stembed.data.build.matched_arrays`).

    Raises:
        CubeError: a value in the block breaks the cube contract (named, with the block).
    """
    yi, xi, (y0, y1, x0, x1) = _block_index(scene, rows, cols, halo)
    window = {Y: slice(y0, y1), X: slice(x0, x1)}
    sub = Scene(site=scene.site, sensors={k: scene.sensors[k].isel(window) for k in ("s2", "s1", *max_gap_days)})
    arrays = {"s2": sensor_arrays(sub, "s2")}
    arrays |= {k: matched_arrays(sub, k, gap) for k, gap in max_gap_days.items() if k != "s2"}
    take = np.ix_(yi - y0, xi - x0)
    out = {}
    for key, arr in arrays.items():
        problems = value_problems(xr.DataArray(arr.values), SENSORS[key], allow_all_nan=True)
        if problems:
            raise CubeError(
                f"{key} cube rows {y0}:{y1}, columns {x0}:{x1} break the cube contract: " + "; ".join(problems)
            )
        out[key] = SensorArrays(np.ascontiguousarray(arr.values[:, :, take[0], take[1]]), arr.days)
    return out


def embed_tile(
    model: FusionBase | GapFillModel,
    block: Mapping[str, SensorArrays],
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    daily: DailyJob | None,
    features: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """A block's embeddings ``(time, feature, h, w)`` on the S2 dates, or with ``daily`` on every day
    from ``first_day`` to ``last_day`` together with their flags ``(day, h, w)``; ``features``: only the first
    that many (a nested prefix).

    ``progress`` is called with the number of pixel-dates of each batch of the per-date pass."""
    fusion = model.fusion if isinstance(model, GapFillModel) else model
    kw: dict[str, Any] = {"batch_size": batch_size, "device": device, "precision": precision}
    values = embed_any(fusion, block, progress=progress, **kw)[:, :features]
    if daily is None:
        return values, None
    observed = np.isfinite(values).all(axis=1)  # (time, h, w)
    flags = np.where(observed, FLAG_OBSERVED, FLAG_NONE).astype(np.uint8)
    filler = model.filler if isinstance(model, GapFillModel) else model if isinstance(model, ContextFusionModel) else None
    if daily.model_fill and filler is not None:
        cloudy = ~observed
        filled = embed_any(filler, block, targets=cloudy, hide_s2_centre=True, **kw)[:, :features]
        got = cloudy & np.isfinite(filled).all(axis=1)
        values = np.where(got[:, None], filled, values)
        flags[got] = FLAG_MODEL
    out, out_flags, _ = fill_daily(
        values, flags, block["s2"].days, method=daily.method, savgol_window_days=daily.savgol_window_days,
        savgol_order=daily.savgol_order, first_day=daily.first_day, last_day=daily.last_day,
    )
    return out, out_flags


# ----------------------------------------------------------------------------- worker side
_MODELS: dict[tuple[str, str, str], FusionBase | GapFillModel] = {}
_SCENES: dict[tuple[str, str], Scene] = {}


def _worker_model(path: str, sha256: str, device: torch.device) -> FusionBase | GapFillModel:
    key = (path, sha256, str(device))
    if key not in _MODELS:
        if file_sha256(path) != sha256:
            raise EmbedError(
                f"the bundle {path} changed during the run (sha256 differs); fix: restore it, or start "
                "again with --overwrite"
            )
        model = load_bundle(path, expect_kind=("fusion", "gapfill")).build_model()
        if not isinstance(model, (FusionBase, GapFillModel)):  # pragma: no cover - kind checked by load_bundle
            raise TypeError("expected a fusion or gap-fill model")
        _MODELS[key] = model.to(device).eval()
    return _MODELS[key]


def run_tile(job: TileJob, report: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Embed one tile and write it (region, error stats, done flag). Runs on a dask worker, or in this process
    (:func:`_run_tiles_here`, which passes ``report``: called with each batch's embedded pixel-dates)."""
    tune_allocator()  # dask workers start with an aggressive malloc trim threshold
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    device = resolve_device(job.device)
    model = _worker_model(job.bundle, job.bundle_sha256, device)
    for spec in job.companion_specs:  # a fresh worker never ran the plugin's registration
        know_spec(spec)
    key = (job.cube, job.cube_fingerprint)
    if key not in _SCENES:
        scene = open_scene(job.cube, check_values=False)
        if cube_fingerprint(scene) != job.cube_fingerprint:
            raise EmbedError(
                f"the cube {job.cube} changed during the run; fix: restore it, or start again with --overwrite"
            )
        _SCENES[key] = scene
    rows, cols = job.grid.bounds(*job.tile)
    halo = _fusion(model).anchor.cfg.context_px
    block = read_block(_SCENES[key], rows, cols, halo, dict(job.max_gap_days))
    values, flags = embed_tile(
        model, block, batch_size=job.batch_size, device=device, precision=job.precision,
        daily=job.daily, features=job.features,
        progress=report if job.progress_topic is None else _Reporter(job.progress_topic, job.tile),
    )
    codes = job.quant.encode(values)
    valid = np.isfinite(values).all(axis=1)
    job.sink.write_tile(job.grid, job.tile, codes, valid, job.quant.error_stats(values, codes), flags)
    job.sink.mark_done(job.tile)  # last: a worker killed before it leaves the tile to the resume
    return job.tile


_REPORT_EVERY_S = 0.5  # how often a worker sends its tile's progress to the client


class _Reporter:
    """Worker side of the progress bar: sends ``(tile, pixel-dates)`` to the client at most twice a second."""

    def __init__(self, topic: str, tile: tuple[int, int]) -> None:
        from distributed import get_worker

        self.worker, self.topic, self.tile = get_worker(), topic, [int(tile[0]), int(tile[1])]
        self.pending, self.last = 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self.pending += int(n)
        if time.monotonic() - self.last >= _REPORT_EVERY_S:
            self.worker.log_event(self.topic, [*self.tile, self.pending])
            self.pending, self.last = 0, time.monotonic()


class _ProgressBar:
    """Client side: counts pixel-dates (S2 dates x pixels) as workers report them, and tiles as they finish.

    A tile's pixel-dates that were not embedded (no observed S2 centre) are counted when it finishes,
    so the bar ends at the total; reports that arrive after their tile finished are ignored.
    """

    def __init__(self, bar: Any, per_tile: dict[tuple[int, int], int], n_tiles: int, n_done: int) -> None:
        self.bar, self.per_tile, self.n_tiles, self.n_done = bar, per_tile, n_tiles, n_done
        self.reported: dict[tuple[int, int], int] = {}
        self.finished: set[tuple[int, int]] = set()
        self.lock = threading.Lock()
        self.bar.set_postfix_str(f"tiles {n_done}/{n_tiles}")

    def on_event(self, event: tuple[float, Any]) -> None:
        _, (iy, ix, n) = event
        tile = (int(iy), int(ix))
        with self.lock:
            if tile in self.finished or tile not in self.per_tile:
                return
            add = max(0, min(int(n), self.per_tile[tile] - self.reported.get(tile, 0)))
            self.reported[tile] = self.reported.get(tile, 0) + add
            self.bar.update(add)

    def finish(self, tile: tuple[int, int]) -> None:
        with self.lock:
            self.finished.add(tile)
            self.bar.update(self.per_tile[tile] - self.reported.get(tile, 0))
            self.n_done += 1
            self.bar.set_postfix_str(f"tiles {self.n_done}/{self.n_tiles}")


def _n_px(grid: store.TileGrid, tile: tuple[int, int]) -> int:
    rows, cols = grid.bounds(*tile)
    return (rows.stop - rows.start) * (cols.stop - cols.start)


def _fusion(model: FusionBase | GapFillModel) -> FusionBase:
    return model.fusion if isinstance(model, GapFillModel) else model


# ----------------------------------------------------------------------------- the run
def cube_fingerprint(scene: Scene) -> str:
    """sha256 of what identifies a scene store's content cheaply: dates, bands, grid, CRS, provenance."""
    parts = {}
    for key, cube in (("s2", scene.s2), ("s1", scene.s1)):
        parts[key] = {
            "time": [str(t) for t in cube[TIME].values],
            "band": [str(b) for b in cube["band"].values],
            "shape": list(cube.shape),
            "y0": float(cube[Y].values[0]),
            "x0": float(cube[X].values[0]),
            "crs": str(cube.attrs.get("crs")),
            "provenance": str(cube.attrs.get("provenance")),
        }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def check_cube_values(scene: Scene, path: Path) -> None:
    """The value contract over each whole cube of ``scene`` (dtype, range, no infinities, not all NaN),
    read in blocks of one date, so a bad value is refused before a store exists, not by a tile mid-run.

    A tile whose window holds no observation is fine (it gets NaN embeddings); only a cube with no
    value at all is refused.

    Raises:
        CubeError: a cube breaks the value contract (every problem of it, one line each).
    """
    for key, cube in scene.sensors.items():
        blocks = cube.chunk({TIME: 1, Y: min(cube.sizes[Y], 1024), X: min(cube.sizes[X], 1024)})
        problems = value_problems(blocks, SENSORS[key])
        if problems:
            raise CubeError(f"{path}: the {key} cube breaks the cube contract: " + "; ".join(problems))


def _calibrate(
    model: FusionBase, scene: Scene, cfg: EmbedConfig, max_gap_days: dict[str, float], device: torch.device,
) -> store.Quantisation:
    """float16/int8 scale and offset from embeddings of random 4x4 blocks (all dates), seeded."""
    n_features = cfg.features or model.cfg.embed_dim
    if cfg.dtype == "float32":
        return store.Quantisation.identity(n_features)
    rng = np.random.default_rng(cfg.seed)
    height, width = scene.s2.sizes[Y], scene.s2.sizes[X]
    b = 4
    r = model.anchor.cfg.context_px
    samples: list[np.ndarray] = []
    n = 0
    for _ in range(64):
        y0, x0 = int(rng.integers(0, max(1, height - b + 1))), int(rng.integers(0, max(1, width - b + 1)))
        rows, cols = slice(y0, min(y0 + b, height)), slice(x0, min(x0 + b, width))
        block = read_block(scene, rows, cols, r, max_gap_days)
        e = embed_any(model, block, batch_size=cfg.batch_size, device=device, precision=cfg.precision)[:, :n_features]
        e = e.transpose(0, 2, 3, 1).reshape(-1, n_features)
        e = e[np.isfinite(e).all(axis=1)]
        samples.append(e)
        n += len(e)
        if n >= cfg.calibration_samples:
            break
    return store.Quantisation.calibrate(cfg.dtype, np.concatenate(samples), cfg.calibration_margin)


def embed_cube(
    cube: str | Path,
    bundle_path: str | Path,
    out: str | Path,
    cfg: EmbedConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    scheduler: str | None = None,
    progress: bool = True,
) -> EmbedResult:
    """Embed every pixel and valid date of the scene store ``cube`` into the embedding store ``out``.

    The run owns ``out`` through the lock file ``OUT.lock`` (:func:`stembed.io.outputs.lock_output`)
    from its first decision about ``out`` until it ends, however it ends. Checks and errors: see
    :func:`_embed_cube`.
    """
    with contextlib.ExitStack() as owned:
        return _embed_cube(
            cube, bundle_path, out, cfg, resume=resume, overwrite=overwrite, scheduler=scheduler,
            progress=progress, owned=owned,
        )


@dataclass(frozen=True)
class EmbedPlan:
    """What one ``stembed embed`` run computes, decided and checked before anything is written.

    Built by :func:`plan_embedding` from the inputs alone; ``fingerprint`` is what a resumed run must
    match (bundle, cube, tiling, arithmetic), ``notes`` what the user should know about the output.
    """

    cube: Path
    bundle_path: Path
    bundle: Bundle
    bundle_sha256: str
    scene: Scene
    model: FusionBase
    cfg: EmbedConfig
    max_gap_days: dict[str, float]  # every sensor but the S2 anchor -> its matching tolerance (read_block)
    daily: DailyJob | None
    threads: int | None
    fingerprint: dict[str, Any]
    notes: tuple[str, ...]

    @property
    def grid(self) -> store.TileGrid:
        """The tiles the scene is cut into (the store's chunks and the units of work)."""
        return store.TileGrid(self.scene.s2.sizes[Y], self.scene.s2.sizes[X], self.cfg.tile_px)


def plan_embedding(
    cube: str | Path, bundle_path: str | Path, cfg: EmbedConfig, *, scheduler: str | None, scene: Scene | None = None,
) -> EmbedPlan:
    """Load and check the bundle and the cube's structure, and decide what the run computes (no writes).

    ``scene``: an in-memory scene, already checked for structure (:func:`stembed.api.embed`), used instead of
    opening ``cube``, which then only names it in messages.

    Raises:
        BundleError, CubeError, EmbedError: the bundle or the cube is unusable, or a setting does not fit it.
    """
    cube, bundle_path = Path(cube), resolve_bundle(bundle_path)
    bundle = load_bundle(bundle_path, expect_kind=("fusion", "gapfill"))
    if scene is None:
        scene = open_scene(cube, check_values=False)
    check_bundle_for_scene(scene, bundle)
    full_model = bundle.build_model()
    if not isinstance(full_model, (FusionBase, GapFillModel)):  # pragma: no cover - kind checked by load_bundle
        raise TypeError("expected a fusion or gap-fill model")
    model = _fusion(full_model)
    _check_fits(cube, bundle_path, scene, model, cfg)
    gap_days = cfg.s1_max_gap_days if cfg.s1_max_gap_days is not None else bundle.cfg.s1_gap_days
    max_gap_days = match_gap_days(model.sensors, gap_days)
    daily, notes = _daily_job(scene, bundle_path, cfg,
                              with_gapfill=isinstance(full_model, (GapFillModel, ContextFusionModel)))
    bundle_sha = file_sha256(bundle_path)
    # torch threads per worker: a dense model's sums round differently with another thread count, so a
    # resume must use the same (the worker count matters only through it: --workers splits the cores)
    threads = cfg.threads_per_worker or (
        max(1, len(os.sched_getaffinity(0)) // cfg.workers) if scheduler is None else None
    )
    fingerprint = {
        "format": store.EMBEDDING_FORMAT,
        "bundle_sha256": bundle_sha,
        "cube_fingerprint": cube_fingerprint(scene),
        "tile_px": cfg.tile_px,
        "time_chunk": cfg.time_chunk,
        "batch_size": cfg.batch_size,
        "precision": cfg.precision,
        "dtype": cfg.dtype,
        "s1_max_gap_days": gap_days,
        "calibration": [cfg.calibration_samples, cfg.calibration_margin, cfg.seed],
        "daily": None if daily is None else asdict(daily),
        "threads_per_worker": threads,
        "features": n_features(model, cfg),
    }
    return EmbedPlan(cube=cube, bundle_path=bundle_path, bundle=bundle, bundle_sha256=bundle_sha, scene=scene,
                     model=model, cfg=cfg, max_gap_days=max_gap_days, daily=daily, threads=threads,
                     fingerprint=fingerprint, notes=notes)


def n_features(model: FusionBase, cfg: EmbedConfig) -> int:
    """The features a run writes: ``cfg.features`` (a nested prefix of the model's) or all of them.

    Raises:
        EmbedError: ``cfg.features`` is not one of the sizes the model was trained to give whole.
    """
    if cfg.features is None:
        return model.cfg.embed_dim
    if cfg.features not in model.prefixes:
        raise EmbedError(
            f"--features {cfg.features}: this bundle gives complete embeddings of {list(model.prefixes)} features "
            f"(its nested prefixes); fix: pass one of those, or leave --features out for all {model.cfg.embed_dim}"
        )
    return cfg.features


def _check_fits(cube: Path, bundle_path: Path, scene: Scene, model: FusionBase, cfg: EmbedConfig) -> None:
    """Refuse a precision the encoder cannot run, and a cube too short or too small for the model's window."""
    n_features(model, cfg)
    n_frames, input_px = model.anchor.cfg.n_frames, model.anchor.cfg.input_px
    n_time, height, width = scene.s2.sizes[TIME], scene.s2.sizes[Y], scene.s2.sizes[X]
    if cfg.precision in ("bfloat16", "float16") and model.anchor.cfg.variant != "dense":
        raise EmbedError(
            f"precision {cfg.precision!r} is for dense bundles; {bundle_path} holds the per-patch ('patch') "
            "encoder, which runs in float32: drop --set precision=..."
        )
    if n_time < min_dates(n_frames):
        raise CubeError(
            f"{cube} has {n_time} S2 dates, too short in time for a window: an {n_frames}-frame window "
            f"reflected at the ends needs at least {min_dates(n_frames)}; fix: build the cube over a longer period"
        )
    halo = model.anchor.cfg.context_px
    if min(height, width) <= halo:
        raise CubeError(
            f"{cube} is {height}x{width} px; reflecting the {halo} px halo of the model's {input_px} px window "
            f"needs at least {halo + 1} px each way; fix: build a larger cube"
        )


def _daily_job(
    scene: Scene, bundle_path: Path, cfg: EmbedConfig, *, with_gapfill: bool
) -> tuple[DailyJob | None, tuple[str, ...]]:
    """The ``--daily`` settings of the run (None without ``daily``), and a note if the model fill is off."""
    if not cfg.daily:
        return None, ()
    if cfg.daily_fill == "savgol":
        check_savgol(cfg.savgol_window_days, cfg.savgol_order)  # before anything is written
    notes = []
    with_model = cfg.model_fill and with_gapfill
    if cfg.model_fill and not with_model:
        notes.append(
            f"{bundle_path} has no gap-fill layers, so cloudy S2 dates are filled by {cfg.daily_fill} "
            "interpolation like days without an S2 date; train them with `stembed train gapfill`"
        )
    s2_days = day_numbers(scene.s2[TIME].values)
    daily = DailyJob(method=cfg.daily_fill, savgol_window_days=cfg.savgol_window_days,
                     savgol_order=cfg.savgol_order, model_fill=with_model, first_day=int(s2_days[0]),
                     last_day=int(s2_days[-1]))
    return daily, tuple(notes)


def _claim_output(plan: EmbedPlan, out: Path, *, resume: bool, overwrite: bool,
                  owned: contextlib.ExitStack) -> tuple[bool | None, dict[str, Any]]:
    """Own ``out`` (its lock, held by ``owned``) and decide what happens there: True to create a new store
    (replacing ours with ``overwrite``), False to resume an unfinished one, None if it is already complete;
    with the attributes of the store found there (empty if none).

    Raises:
        FileExistsError: ``out`` exists and neither ``resume`` nor ``overwrite`` is set.
        EmbeddingStoreError: ``out`` is foreign, damaged, or was made with other settings.
        OutputError: another live run holds ``out``.
    """
    if out.is_file() or not out.exists():
        # a file at --out is refused (never deleted); a new store needs a writable parent folder
        check_store_output(out, "embeddings", overwrite=False)
    elif overwrite:  # only a stembed embedding store is ever deleted
        check_store_output(out, "embeddings", overwrite=True)
    # from here on this run owns --out (OUT.lock): a second run into it refuses, and every decision about
    # what is at --out (resume, replace, create) is taken while no other run can change it
    owned.enter_context(lock_output(out, command="embed"))
    remove_leftovers(out)  # what a run killed while it created or replaced the store left
    if not out.exists():
        return True, {}
    if not (resume or overwrite):
        raise FileExistsError(
            f"{out} already exists; fix: pass --resume to finish or check it, --overwrite to replace it, "
            "or choose another --out"
        )
    attrs = store.read_attrs(out)  # refuses foreign or corrupt stores, so --overwrite never deletes them
    if not resume:
        return True, attrs
    _check_fingerprint(out, attrs.get("fingerprint", {}), plan.fingerprint)
    try:
        done = store.tiles_done(out)
    except (KeyError, OSError, ValueError) as e:
        raise store.EmbeddingStoreError(
            f"{out} is a damaged embedding store ({type(e).__name__}: {e}); fix: rerun with --overwrite"
        ) from e
    return (None if attrs.get("complete") and done.all() else False), attrs


def _store_attrs(plan: EmbedPlan) -> dict[str, Any]:
    """What an embedding store records about its run: fingerprint, config, bundle, input, software, edges."""
    s2, model, daily = plan.scene.s2, plan.model, plan.daily
    attrs: dict[str, Any] = {
        "fingerprint": plan.fingerprint,
        "config": dump_config(plan.cfg),
        "bundle": {"path": str(plan.bundle_path.resolve()), "sha256": plan.bundle_sha256,
                   "provenance": plan.bundle.provenance},
        "input": {
            "cube": str(plan.cube.resolve()),
            "site": plan.scene.site,
            "s2_provenance": str(s2.attrs.get("provenance")),
            "s1_provenance": str(plan.scene.s1.attrs.get("provenance")),
        },
        "software": provenance([plan.scene.site]),
        "edges": (
            "time: each date's window reflects the series at its ends (frame -k = date k); "
            f"space: windows of border pixels read the cube reflected by {model.anchor.cfg.context_px} pixels "
            "(context_px)"
        ),
        "method": _method(model),
        "companion_sensors": list(model.companions),
        # which dates each embedding read around its date (None: the paper's 11 consecutive dates), and the
        # sizes that are complete embeddings of their own (the probe's baselines and `stembed info` read both)
        "window": None if model.cfg.window is None else dump_config(model.cfg.window),
        "nested": [n for n in model.prefixes if n <= n_features(model, plan.cfg)],
    }
    if daily is not None:
        attrs["daily"] = {
            **asdict(daily),
            "flags": "see the flag variable: " + ", ".join(f"{i} {m}" for i, m in enumerate(FLAG_MEANINGS)),
            "model_based": (
                ("cloudy S2 dates embedded by the context fusion from the date's S1 and its window, the date's own "
                 "S2 hidden (stembed.models.context)" if isinstance(model, ContextFusionModel) else
                 "cloudy S2 dates embedded by the bundle's gap-fill layers with the S2 centre frame hidden "
                 "(stembed.models.gapfill)") if daily.model_fill else "off"
            ),
            "notes": list(plan.notes),
        }
    return attrs


def _method(model: FusionBase) -> str:
    if isinstance(model, ContextFusionModel):
        return "context (every pixel-date's stage-1 latents once per tile, each date fused with its window's)"
    return "dense (each frame encoded once per tile)" if model.anchor.cfg.variant == "dense" else "per patch"


def _create_store(plan: EmbedPlan, out: Path, sink: EmbeddingSink, quant: store.Quantisation) -> None:
    """Create the empty store through ``sink`` (aside, then renamed: a kill leaves no half store at ``out``);
    an existing store at ``out`` (ours, ``--overwrite``) is discarded only now that every check passed."""
    if out.exists():
        discard_store(out)
    s2, daily = plan.scene.s2, plan.daily
    times = s2[TIME].values if daily is None else daily_dates(np.arange(daily.first_day, daily.last_day + 1))
    sink.create(
        time=times, y=s2[Y].values, x=s2[X].values,
        features=[f"E{i + 1}" for i in range(n_features(plan.model, plan.cfg))], crs=str(s2.attrs["crs"]),
        transform=list(cube_transform(s2)), quant=quant, tile_px=plan.cfg.tile_px,
        time_chunk=plan.cfg.time_chunk, attrs=_store_attrs(plan),
        flag_meanings=None if daily is None else FLAG_MEANINGS,
    )


def _tile_jobs(plan: EmbedPlan, sink: EmbeddingSink, todo: list[tuple[int, int]], quant: store.Quantisation,
               topic: str | None) -> list[TileJob]:
    cfg = plan.cfg
    return [
        TileJob(
            cube=str(plan.cube.resolve()), cube_fingerprint=plan.fingerprint["cube_fingerprint"],
            bundle=str(plan.bundle_path.resolve()), bundle_sha256=plan.bundle_sha256, sink=sink,
            grid=plan.grid, tile=t, quant=quant, max_gap_days=tuple(plan.max_gap_days.items()),
            batch_size=cfg.batch_size, device=cfg.device, threads=plan.threads, precision=cfg.precision,
            companion_specs=tuple(plan.bundle.sensors[k] for k in plan.model.companions), daily=plan.daily,
            progress_topic=topic, features=n_features(plan.model, cfg),
        )
        for t in todo
    ]


def _run_tiles(plan: EmbedPlan, sink: EmbeddingSink, client: Any, *, progress: bool) -> int:
    """Embed every tile ``sink`` still lacks on the cluster, with a pixel-date progress bar; returns how many.

    Raises:
        CubeError, EmbedError: a tile failed (the others are cancelled; tiles written so far are kept).
    """
    from distributed import as_completed
    from tqdm.auto import tqdm

    grid, quant, done = plan.grid, sink.quantisation(), sink.tiles_done()
    todo = [t for t in grid.tiles() if not done[t]]
    topic = f"stembed-progress-{uuid.uuid4().hex[:12]}" if progress else None
    jobs = _tile_jobs(plan, sink, todo, quant, topic)
    futures = [
        client.submit(run_tile, job, key=f"stembed-tile-{job.tile[0]}-{job.tile[1]}-{plan.bundle_sha256[:8]}",
                      pure=False)
        for job in jobs
    ]
    n_dates = plan.scene.s2.sizes[TIME]
    per_tile = {t: n_dates * _n_px(grid, t) for t in grid.tiles()}
    with tqdm(total=sum(per_tile.values()), initial=sum(per_tile[t] for t in grid.tiles() if done[t]),
              desc="pixel-dates", unit="", unit_scale=True, disable=not progress) as bar:
        tracker = _ProgressBar(bar, per_tile, len(grid.tiles()), len(grid.tiles()) - len(todo))
        if topic is not None:
            client.subscribe_topic(topic, tracker.on_event)
        tile_of = {f.key: job.tile for f, job in zip(futures, jobs, strict=True)}
        for fut in as_completed(futures, loop=client.loop):
            if fut.status == "error":
                err = fut.exception()
                for f in futures:
                    f.cancel()
                if isinstance(err, (CubeError, EmbedError)):
                    raise err
                raise EmbedError(
                    f"a tile failed ({type(err).__name__}: {err}); the tiles written so far are kept: fix the "
                    f"problem and rerun with --resume"
                ) from err
            tracker.finish(tile_of[fut.key])
        if topic is not None:
            client.unsubscribe_topic(topic)
    return len(todo)


def _report_here(tracker: _ProgressBar, tile: tuple[int, int], n: int) -> None:
    tracker.on_event((0.0, (tile[0], tile[1], n)))


def _run_tiles_here(plan: EmbedPlan, sink: EmbeddingSink, *, progress: bool) -> int:
    """:func:`_run_tiles` without a cluster (``workers: 1``, no scheduler): the same tile jobs, run here one after
    another; torch's thread count is the caller's again afterwards, and the tiles' model and scene are dropped."""
    from tqdm.auto import tqdm

    grid, quant, done = plan.grid, sink.quantisation(), sink.tiles_done()
    todo = [t for t in grid.tiles() if not done[t]]
    jobs = _tile_jobs(plan, sink, todo, quant, topic=None)
    n_dates = plan.scene.s2.sizes[TIME]
    per_tile = {t: n_dates * _n_px(grid, t) for t in grid.tiles()}
    threads = torch.get_num_threads()
    with tqdm(total=sum(per_tile.values()), initial=sum(per_tile[t] for t in grid.tiles() if done[t]),
              desc="pixel-dates", unit="", unit_scale=True, disable=not progress) as bar:
        tracker = _ProgressBar(bar, per_tile, len(grid.tiles()), len(grid.tiles()) - len(todo))
        try:
            for job in jobs:
                try:
                    run_tile(job, report=functools.partial(_report_here, tracker, job.tile))
                except (CubeError, EmbedError):
                    raise
                except Exception as err:  # as a worker's failure is reported: named, with the resume
                    raise EmbedError(
                        f"a tile failed ({type(err).__name__}: {err}); the tiles written so far are kept: fix the "
                        f"problem and rerun with --resume"
                    ) from err
                tracker.finish(job.tile)
        finally:
            torch.set_num_threads(threads)
            _MODELS.clear()
            _SCENES.clear()
    return len(todo)


def _embed_cube(
    cube: str | Path,
    bundle_path: str | Path,
    out: str | Path,
    cfg: EmbedConfig,
    *,
    resume: bool,
    overwrite: bool,
    scheduler: str | None,
    progress: bool,
    owned: contextlib.ExitStack,
) -> EmbedResult:
    """Embed every pixel and valid date of the scene store ``cube`` into the embedding store ``out``:
    plan (:func:`plan_embedding`), claim ``out``, check the values, then create the store and run the tiles.

    Every check runs before anything is written: a bad bundle, a cube value that breaks the contract
    (checked over each whole cube), a bad or locked ``out``, or an unreachable scheduler leaves an
    existing ``out`` untouched. A tile whose window has no observation gets NaN embeddings.

    Raises:
        BundleError, CubeError: the bundle or the cube is unusable (named, with the fix).
        FileExistsError: ``out`` exists and neither ``resume`` nor ``overwrite`` is set.
        EmbeddingStoreError: ``out`` is not a stembed embedding store, or was made with other settings.
        EmbedError: the scheduler is unreachable, or a tile failed (tiles written so far are kept).
        OutputError: another live run holds ``out`` (its lock file ``OUT.lock``).
    """
    t_start = time.perf_counter()
    out = Path(out)
    if resume and overwrite:
        raise EmbedError("--resume and --overwrite contradict each other; pass one")
    plan = plan_embedding(cube, bundle_path, cfg, scheduler=scheduler)
    fresh, found = _claim_output(plan, out, resume=resume, overwrite=overwrite, owned=owned)
    n_tiles = len(plan.grid.tiles())
    if fresh is None:  # a finished store, resumed: nothing to do
        return EmbedResult(out, 0, n_tiles, found.get("storage_error", {}), time.perf_counter() - t_start,
                           plan.notes)
    check_cube_values(plan.scene, plan.cube)  # before the store exists: no tile finds a bad value mid-run
    resolve_device(cfg.device)  # a device that is not there is refused before the cluster starts
    sink = store.ZarrEmbeddingStore(str(out.resolve()))  # the tiles write only through it
    here = scheduler is None and cfg.workers == 1  # no cluster to start: the tiles run in this process
    with contextlib.nullcontext() if here else cluster_client(scheduler, cfg.workers, cfg.connect_timeout_s) as client:
        if fresh:
            device = resolve_device(cfg.device)
            quant = _calibrate(plan.model.to(device), plan.scene, cfg, plan.max_gap_days, device)
            _create_store(plan, out, sink, quant)
        written = (_run_tiles_here(plan, sink, progress=progress) if client is None
                   else _run_tiles(plan, sink, client, progress=progress))
        summary = sink.finalise()
    return EmbedResult(out, written, n_tiles - written, summary, time.perf_counter() - t_start, plan.notes)


# How to get back to a stored setting, for the settings a user cannot simply pass with --set NAME=VALUE
_RESUME_HINTS = {
    "bundle_sha256": "the same bundle file",
    "cube_fingerprint": "the same --cube store",
    "format": "the stembed version that wrote it",
    "threads_per_worker": "the same --workers on the same machine, or --set threads_per_worker=N",
    "calibration": "--set calibration_samples=, calibration_margin= and seed= as stored",
    "daily": "the same daily settings (--daily and its --set options)",
    "features": "the same --features",
}


def _check_fingerprint(out: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse a --resume whose settings differ from the store's, naming each setting that differs and how to
    get back to it."""
    differ = [k for k in wanted if stored.get(k) != wanted[k]]
    if differ:
        diffs = [f"{k}: stored {stored.get(k)!r}, now {wanted[k]!r}" for k in differ]
        hints = [f"{k}: {_RESUME_HINTS.get(k, f'--set {k}=<stored value>')}" for k in differ]
        raise store.EmbeddingStoreError(
            f"{out} was written by a different run, so --resume cannot continue it ("
            + "; ".join(diffs)
            + "); fix: rerun with the settings it was made with (" + "; ".join(hints) + "), or pass --overwrite "
            "to replace it"
        )
