"""The tiles of a ``stembed embed`` run: one :class:`TileJob` per tile, run by :func:`run_tile` on a dask worker
(:func:`run_tiles`) or one after another in this process (:func:`run_tiles_here`, ``workers: 1`` and no scheduler:
a local worker process takes seconds to start, longer than a small area takes to embed;
``benchmarks/embed_in_process.py``).

Each tile reads its block and halo, embeds it, writes its chunk-aligned region of the output, then its done flag,
so memory is bounded by the tile, a killed run resumes at the first unfinished tile, and a rerun of a finished
output writes nothing. Workers open the cube and the bundle themselves (once per worker), so with ``--scheduler``
they must see the same paths (a shared filesystem).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import torch

from stembed.contract import CubeError, Scene
from stembed.data.datasets import SensorArrays
from stembed.inference.blocks import embed_tile, read_block
from stembed.inference.engine import resolve_device
from stembed.inference.plan import DailyJob, EmbedPlan, cube_fingerprint, fusion_of, n_features
from stembed.inference.progress import ProgressBar, Reporter
from stembed.io import embeddings as store
from stembed.io.cube import open_scene
from stembed.io.embeddings import EmbedError
from stembed.io.sinks import EmbeddingSink
from stembed.models.bundle import load_bundle
from stembed.models.fusion import FusionBase
from stembed.models.gapfill import GapFillModel
from stembed.repro import file_sha256
from stembed.runtime import tune_allocator
from stembed.sensors import SensorSpec, know_spec
from stembed.types import TIME


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


def load_tile(job: TileJob) -> tuple[FusionBase | GapFillModel, torch.device, dict[str, SensorArrays]]:
    """A tile's model (on its device, loaded once per worker), device and block with its halo, for this worker's
    thread count; the bundle and the cube are checked against their sha256 and fingerprint."""
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
    halo = fusion_of(model).anchor.cfg.context_px
    return model, device, read_block(_SCENES[key], rows, cols, halo, dict(job.max_gap_days),
                                     trailing=fusion_of(model).cfg.trailing)


def release_tiles(threads: int) -> None:
    """After tiles ran in this process: torch's thread count back to ``threads``, the tiles' models and scenes
    dropped."""
    torch.set_num_threads(threads)
    _MODELS.clear()
    _SCENES.clear()


def run_tile(job: TileJob, report: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Embed one tile and write it (region, error stats, done flag). Runs on a dask worker, or in this process
    (:func:`run_tiles_here`, which passes ``report``: called with each batch's embedded pixel-dates)."""
    model, device, block = load_tile(job)
    values, flags = embed_tile(
        model, block, batch_size=job.batch_size, device=device, precision=job.precision,
        daily=job.daily, features=job.features,
        progress=report if job.progress_topic is None else Reporter(job.progress_topic, job.tile),
    )
    codes = job.quant.encode(values)
    valid = np.isfinite(values).all(axis=1)
    job.sink.write_tile(job.grid, job.tile, codes, valid, job.quant.error_stats(values, codes), flags)
    job.sink.mark_done(job.tile)  # last: a worker killed before it leaves the tile to the resume
    return job.tile


def _n_px(grid: store.TileGrid, tile: tuple[int, int]) -> int:
    rows, cols = grid.bounds(*tile)
    return (rows.stop - rows.start) * (cols.stop - cols.start)


def tile_jobs(plan: EmbedPlan, sink: EmbeddingSink, todo: list[tuple[int, int]], quant: store.Quantisation,
               topic: str | None) -> list[TileJob]:
    """The jobs of the tiles ``todo`` of a run (``topic``: the dask event topic of the progress bar, or None)."""
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


RESUME = "rerun with --resume"


def raise_tile_failure(err: BaseException | None, rerun: str, futures: Sequence[Any] = ()) -> NoReturn:
    """Stop a run at a failed tile: cancel the other ``futures``; a CubeError or EmbedError as it is, anything else
    as an EmbedError that names it and says how to finish the output (``rerun``)."""
    for f in futures:
        f.cancel()
    if isinstance(err, (CubeError, EmbedError)):
        raise err
    raise EmbedError(
        f"a tile failed ({type(err).__name__}: {err}); the tiles written so far are kept: fix the problem and {rerun}"
    ) from err


def run_tiles(plan: EmbedPlan, sink: EmbeddingSink, client: Any, *, progress: bool) -> int:
    """Embed every tile ``sink`` still lacks on the cluster, with a pixel-date progress bar; returns how many.

    Raises:
        CubeError, EmbedError: a tile failed (the others are cancelled; tiles written so far are kept).
    """
    from distributed import as_completed
    from tqdm.auto import tqdm

    grid, quant, done = plan.grid, sink.quantisation(), sink.tiles_done()
    todo = [t for t in grid.tiles() if not done[t]]
    topic = f"stembed-progress-{uuid.uuid4().hex[:12]}" if progress else None
    jobs = tile_jobs(plan, sink, todo, quant, topic)
    futures = [
        client.submit(run_tile, job, key=f"stembed-tile-{job.tile[0]}-{job.tile[1]}-{plan.bundle_sha256[:8]}",
                      pure=False)
        for job in jobs
    ]
    n_dates = plan.scene.s2.sizes[TIME]
    per_tile = {t: n_dates * _n_px(grid, t) for t in grid.tiles()}
    with tqdm(total=sum(per_tile.values()), initial=sum(per_tile[t] for t in grid.tiles() if done[t]),
              desc="pixel-dates", unit="", unit_scale=True, disable=not progress) as bar:
        tracker = ProgressBar(bar, per_tile, len(grid.tiles()), len(grid.tiles()) - len(todo))
        if topic is not None:
            client.subscribe_topic(topic, tracker.on_event)
        tile_of = {f.key: job.tile for f, job in zip(futures, jobs, strict=True)}
        for fut in as_completed(futures, loop=client.loop):
            if fut.status == "error":
                raise_tile_failure(fut.exception(), RESUME, futures)
            tracker.finish(tile_of[fut.key])
        if topic is not None:
            client.unsubscribe_topic(topic)
    return len(todo)


def _report_here(tracker: ProgressBar, tile: tuple[int, int], n: int) -> None:
    tracker.on_event((0.0, (tile[0], tile[1], n)))


def run_tiles_here(plan: EmbedPlan, sink: EmbeddingSink, *, progress: bool) -> int:
    """:func:`run_tiles` without a cluster (``workers: 1``, no scheduler): the same tile jobs, run here one after
    another; torch's thread count is the caller's again afterwards, and the tiles' model and scene are dropped."""
    from tqdm.auto import tqdm

    grid, quant, done = plan.grid, sink.quantisation(), sink.tiles_done()
    todo = [t for t in grid.tiles() if not done[t]]
    jobs = tile_jobs(plan, sink, todo, quant, topic=None)
    n_dates = plan.scene.s2.sizes[TIME]
    per_tile = {t: n_dates * _n_px(grid, t) for t in grid.tiles()}
    threads = torch.get_num_threads()
    with tqdm(total=sum(per_tile.values()), initial=sum(per_tile[t] for t in grid.tiles() if done[t]),
              desc="pixel-dates", unit="", unit_scale=True, disable=not progress) as bar:
        tracker = ProgressBar(bar, per_tile, len(grid.tiles()), len(grid.tiles()) - len(todo))
        try:
            for job in jobs:
                try:
                    run_tile(job, report=functools.partial(_report_here, tracker, job.tile))
                except Exception as err:  # as a worker's failure is reported: named, with the resume
                    raise_tile_failure(err, RESUME)
                tracker.finish(job.tile)
        finally:
            release_tiles(threads)
    return len(todo)
