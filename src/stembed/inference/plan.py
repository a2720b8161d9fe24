"""What one ``stembed embed`` run computes, decided and checked before anything is written: :func:`plan_embedding`.

The plan fixes the model, the sensors' matching tolerances, the ``--daily`` settings, the torch threads per
worker, and the fingerprint a resumed run must match; :func:`check_cube_values` checks a cube's values whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stembed.config import EmbedConfig
from stembed.contract import CubeError, Scene, value_problems
from stembed.data.build import match_gap_days
from stembed.data.sampling import day_numbers
from stembed.data.windows import min_dates
from stembed.inference.daily import (
    check_savgol,
)
from stembed.inference.reference import check_bundle_for_scene
from stembed.io import embeddings as store
from stembed.io.cube import open_scene
from stembed.io.embeddings import EmbedError
from stembed.models.bundle import Bundle, load_bundle
from stembed.models.context import ContextFusionModel
from stembed.models.fusion import FusionBase
from stembed.models.gapfill import GapFillModel
from stembed.pretrained import resolve_bundle
from stembed.repro import file_sha256
from stembed.sensors import SCENE_SENSORS, SENSORS
from stembed.types import TIME, X, Y


@dataclass(frozen=True)
class DailyJob:
    """What a ``--daily`` tile does beyond the per-date embedding (see :mod:`stembed.inference.daily`)."""

    method: str
    savgol_window_days: int
    savgol_order: int
    model_fill: bool
    first_day: int
    last_day: int


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
    model = fusion_of(full_model)
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


def cube_fingerprint(scene: Scene) -> str:
    """sha256 of what identifies a scene store's content cheaply: dates, bands, grid, CRS, provenance."""
    parts = {}
    for key in SCENE_SENSORS:
        cube = scene.sensors[key]
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


def fusion_of(model: FusionBase | GapFillModel) -> FusionBase:
    """The fusion a bundle's model embeds with (a gap-fill model's own fusion)."""
    return model.fusion if isinstance(model, GapFillModel) else model
