"""``stembed embed``: every pixel and date of a scene store, tile by tile, on dask.distributed (or, with one
local worker, in this process): :func:`embed_cube`.

The steps, each in its module: plan the run from the inputs alone (:mod:`~stembed.inference.plan`), claim the
output (:mod:`~stembed.inference.claim`), check the cube's values, create the store, then run the tiles
(:mod:`~stembed.inference.workers`; a tile reads and embeds its block with :mod:`~stembed.inference.blocks`,
and reports to the bar of :mod:`~stembed.inference.progress`). ``--extend`` grows a store with the dates its
cube gained (:mod:`~stembed.inference.extend`). Each tile embeds with
:func:`stembed.inference.engine.embed_block_dense` for a ``dense`` bundle, else per patch with
:func:`~stembed.inference.engine.embed_block`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stembed.cluster import cluster_client
from stembed.config import EmbedConfig
from stembed.contract import Scene
from stembed.inference.blocks import read_block
from stembed.inference.claim import claim_output, create_store
from stembed.inference.engine import embed_any, resolve_device
from stembed.inference.extend import extend_embeddings
from stembed.inference.plan import check_cube_values, plan_embedding
from stembed.inference.workers import run_tiles, run_tiles_here
from stembed.io import embeddings as store
from stembed.io.embeddings import EmbedError
from stembed.models.fusion import FusionBase
from stembed.types import X, Y


@dataclass(frozen=True)
class EmbedResult:
    """What a run did: tiles written now, tiles already done before it, the measured storage error."""

    out: Path
    tiles_written: int
    tiles_skipped: int
    storage_error: dict[str, Any]
    seconds: float
    notes: tuple[str, ...] = ()  # what the user should know about the output (e.g. a fill that was off)
    dates_added: int | None = None  # --extend: the dates appended (None: not an extension)
    pixel_dates_recomputed: int = 0  # --extend: old pixel-dates written again (their inputs changed)


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
    extend: bool = False,
) -> EmbedResult:
    """Embed every pixel and valid date of the scene store ``cube`` into the embedding store ``out``.

    The run owns ``out`` through the lock file ``OUT.lock`` (:func:`stembed.io.outputs.lock_output`)
    from its first decision about ``out`` until it ends, however it ends. Checks and errors: see
    :func:`_embed_cube`. ``extend``: grow the complete store ``out`` with the dates ``cube`` gained after its
    last (``stembed embed --extend``; :func:`stembed.inference.extend.extend_embeddings`).
    """
    with contextlib.ExitStack() as owned:
        if extend:
            return _extend(cube, bundle_path, out, cfg, resume=resume, overwrite=overwrite, scheduler=scheduler,
                           progress=progress, owned=owned)
        return _embed_cube(
            cube, bundle_path, out, cfg, resume=resume, overwrite=overwrite, scheduler=scheduler,
            progress=progress, owned=owned,
        )


def _extend(
    cube: str | Path, bundle_path: str | Path, out: str | Path, cfg: EmbedConfig, *, resume: bool, overwrite: bool,
    scheduler: str | None, progress: bool, owned: contextlib.ExitStack,
) -> EmbedResult:
    """``embed_cube(..., extend=True)``: refuse ``resume``/``overwrite`` (why, in one line), then extend."""
    t_start = time.perf_counter()
    if resume:
        raise EmbedError(
            "--extend finishes an interrupted extension itself, and --resume only a first run; fix: drop --resume "
            "(or drop --extend to finish an interrupted first run)"
        )
    if overwrite:
        raise EmbedError("--extend grows the store in place and --overwrite replaces it; fix: pass one")
    done = extend_embeddings(cube, bundle_path, out, cfg, scheduler=scheduler, progress=progress, owned=owned)
    return EmbedResult(Path(out), done.tiles_written, done.tiles_skipped, done.storage_error,
                       time.perf_counter() - t_start, done.notes, dates_added=done.dates_added,
                       pixel_dates_recomputed=done.recomputed)


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
    fresh, found = claim_output(plan, out, resume=resume, overwrite=overwrite, owned=owned)
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
            create_store(plan, out, sink, quant)
        written = (run_tiles_here(plan, sink, progress=progress) if client is None
                   else run_tiles(plan, sink, client, progress=progress))
        summary = sink.finalise()
    return EmbedResult(out, written, n_tiles - written, summary, time.perf_counter() - t_start, plan.notes)


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
        block = read_block(scene, rows, cols, r, max_gap_days, trailing=model.cfg.trailing)
        e = embed_any(model, block, batch_size=cfg.batch_size, device=device, precision=cfg.precision)[:, :n_features]
        e = e.transpose(0, 2, 3, 1).reshape(-1, n_features)
        e = e[np.isfinite(e).all(axis=1)]
        samples.append(e)
        n += len(e)
        if n >= cfg.calibration_samples:
            break
    return store.Quantisation.calibrate(cfg.dtype, np.concatenate(samples), cfg.calibration_margin)
