"""``stembed embed --extend``: grow an embedding store with the dates its cube gained (:func:`extend_embeddings`).

A scene store grows at its end (``stembed cube --extend`` appends dates and rewrites none). Its embedding store
then lacks the new dates, and some of its old pixel-dates would come out otherwise in a whole run on the grown
cube, because what they read changed:

* the paper's fusion embeds date t from the stage-1 window of ``n_frames`` consecutive dates centred on t,
  reflected at the series' ends: the last ``n_frames // 2`` old dates read reflected dates that are now real;
* a centred context fusion reads the pixel's observed dates within its window (which may now take a new date)
  and each slot date's centred stage-1 latent (changed for the last ``n_frames // 2`` old dates);
* a trailing context fusion reads nothing after t and the latents as they stood on t: no old pixel-date changes;
* with any model, a new S1 (or companion) date may now be the nearest match of an old S2 date near the end
  (matching takes the nearest date on either side, :func:`stembed.preprocess.match_s1_to_s2`).

**The rule** (:func:`changed_set`, one for the three): an observed old pixel-date is recomputed iff the dates it
reads (the date and its window's dates, on the old series vs on the new) differ, or the stage-1 window of one
of them, as the model reads it, differs or holds a date whose matched sensors moved (:func:`moved_dates`). For a
trailing window it comes out empty unless a match moved (tested).

**The steps**, under the lock ``OUT.lock`` a run of ``stembed embed`` holds, each idempotent: check (the same
bundle and settings, the same grid, the store's dates the cube's first), journal (attribute ``extending``: the
target and the step reached), grow the time axis (:func:`stembed.io.embeddings.grow_time`), run the tiles (each:
its changed set, only those targets embedded, merged into its stored rows from its first changed date on, its
error stats added, ``extension_tile`` marked), finalise (fingerprint, ``extensions`` record, journal dropped,
complete). A kill at any point leaves a store that readers refuse until the same command finishes it, with the
bits an uninterrupted run gives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from stembed.cluster import cluster_client
from stembed.config import EmbedConfig, WindowConfig
from stembed.contract import Scene
from stembed.data.windows import asof_depth, asof_window_days, min_dates, window_dates, window_days
from stembed.inference.blocks import embed_tile
from stembed.inference.claim import check_fingerprint, claim_existing, sensor_dates
from stembed.inference.engine import centre_valid, resolve_device
from stembed.inference.plan import EmbedPlan, check_cube_values, fusion_of, plan_embedding
from stembed.inference.workers import TileJob, load_tile, raise_tile_failure, release_tiles, tile_jobs
from stembed.io import embeddings as store
from stembed.io.embeddings import EmbeddingStoreError, EmbedError
from stembed.io.sinks import ExtendableSink
from stembed.preprocess import match_s1_to_s2
from stembed.sensors import ANCHOR
from stembed.types import CUBE_DIMS, TIME, X, Y

_GROWN = "fix: --extend needs the cube the store was embedded from, grown by `stembed cube --extend` (which appends dates)"


# ----------------------------------------------------------------------------- the rule (numpy)
def matched_times(times: np.ndarray, s2_times: np.ndarray, max_gap_days: float, trailing: bool = False) -> np.ndarray:
    """The date of a sensor (``times``) matched to each S2 date, NaT where none is close enough: the rule of
    :func:`stembed.preprocess.match_s1_to_s2` (``trailing``: on or before the date), run on the dates alone."""
    if len(times) == 0:
        return np.full(len(s2_times), np.datetime64("NaT", "ns"))
    dates = xr.DataArray(np.zeros((len(times), 1, 1, 1), np.float32), dims=CUBE_DIMS, coords={TIME: times})
    return np.asarray(match_s1_to_s2(dates, s2_times, max_gap_days=max_gap_days, trailing=trailing)["s1_time"].values)


def moved_dates(
    s2_times: np.ndarray, old: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray],
    max_gap_days: Mapping[str, float], trailing: bool = False,
) -> np.ndarray:
    """``(n_old,)`` bool: the old S2 dates ``s2_times`` whose matched date of some sensor differs between the sensor's
    old dates (``old``, by sensor) and its new ones (``new``); ``max_gap_days``: each sensor's tolerance;
    ``trailing``: the model matches each sensor on or before the S2 date only."""
    moved = np.zeros(len(s2_times), dtype=bool)
    for key, gap in max_gap_days.items():
        a, b = matched_times(old[key], s2_times, gap, trailing), matched_times(new[key], s2_times, gap, trailing)
        moved |= ~((a == b) | (np.isnat(a) & np.isnat(b)))
    return moved


def _window_changed(
    old: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray], moved: np.ndarray
) -> bool:
    """A stage-1 window (frame dates, frame days) reads otherwise on the new series, or holds a moved date."""
    (f_old, d_old), (f_new, d_new) = old, new
    same = np.array_equal(f_old, f_new) and np.array_equal(d_old, d_new)
    return not same or bool(moved[f_old].any())


def stage1_changed(days_old: np.ndarray, days_new: np.ndarray, n_frames: int, moved: np.ndarray) -> np.ndarray:
    """``(n_new,)`` bool: the dates whose centred stage-1 window (:func:`~stembed.data.windows.window_days`) reads
    otherwise on the new series than on the old, or holds a date whose matched sensors moved; every new date."""
    out = np.ones(len(days_new), dtype=bool)
    for s in range(len(days_old)):
        out[s] = _window_changed(window_days(days_old, s, n_frames), window_days(days_new, s, n_frames), moved)
    return out


def asof_changed(days_old: np.ndarray, days_new: np.ndarray, n_frames: int, moved: np.ndarray) -> np.ndarray:
    """``(n_old, n_frames // 2 + 1)`` bool, ``[t, j]``: the stage-1 window of date ``t - j`` as it stood on t (what a
    trailing window reads, :func:`~stembed.data.windows.asof_window_days`) changed as in :func:`stage1_changed`;
    False for the dates with too little history to be embedded."""
    depth = asof_depth(n_frames)
    out = np.zeros((len(days_old), depth + 1), dtype=bool)
    for t in range(min_dates(n_frames) - 1, len(days_old)):
        for j in range(depth + 1):
            out[t, j] = _window_changed(asof_window_days(days_old, t, j, n_frames),
                                        asof_window_days(days_new, t, j, n_frames), moved)
    return out


def changed_set(
    window: WindowConfig | None, n_frames: int, days_old: np.ndarray, days_new: np.ndarray, observed: np.ndarray,
    moved: np.ndarray, *, batch: int = 4096,
) -> np.ndarray:
    """``(n_old, P)`` bool: the old pixel-dates whose embedding reads otherwise on the new series than on the old.

    Args:
        window: the context fusion's window (None: the paper's fusion, which reads its date's stage-1 window).
        n_frames: the stage-1 window's length.
        days_old: ``(n_old,)`` S2 day numbers of the old series.
        days_new: ``(n_new,)`` those of the new series, which starts with the old.
        observed: ``(n_new, P)`` bool, each of P pixels' S2 centre is observed (the pixel-dates a run embeds).
        moved: ``(n_old,)`` bool, the old dates whose matched sensors moved (:func:`moved_dates`).
        batch: pixels per window computation.

    An observed old pixel-date is changed iff its slots (the date and its window's dates) differ between the two
    series, or a slot's stage-1 latent, as the model reads it (centred: :func:`stage1_changed`; trailing, as of the
    date: :func:`asof_changed`), changed. A trailing window's first ``n_frames // 2`` dates are never embedded.
    """
    n_old = len(days_old)
    if len(days_new) < n_old or not np.array_equal(days_new[:n_old], days_old):
        raise ValueError("the new series must start with the old one")
    centred = stage1_changed(days_old, days_new, n_frames, moved)
    if window is None:
        return centred[:n_old, None] & observed[:n_old]
    asof = asof_changed(days_old, days_new, n_frames, moved) if window.side == "trailing" else None
    out = np.zeros((n_old, observed.shape[1]), dtype=bool)
    for t in range(min_dates(n_frames) - 1 if asof is not None else 0, n_old):
        pixels = np.flatnonzero(observed[t])
        for i in range(0, pixels.size, batch):
            p = pixels[i : i + batch]
            out[t, p] = _slots_changed(window, t, days_old, days_new, observed[:, p].T, centred, asof)
    return out


def _slots_changed(
    window: WindowConfig, t: int, days_old: np.ndarray, days_new: np.ndarray, observed: np.ndarray,
    centred: np.ndarray, asof: np.ndarray | None,
) -> np.ndarray:
    """``(B,)`` for B pixels observed on old date t (``observed`` ``(B, n_new)``): their window's dates differ between
    the series, or a slot's latent changed (a trailing window reads the latents of its last dates as of t)."""
    at = np.full(observed.shape[0], t)
    old = window_dates(window, days_old, observed[:, : len(days_old)], at)
    new = window_dates(window, days_new, observed, at)
    slots = np.concatenate([at[:, None], new], axis=1)  # (B, 1 + dates), -1: empty
    filled = slots >= 0
    s = np.where(filled, slots, 0)
    latent = centred[s]
    if asof is not None:  # slot date t - j with j <= n_frames // 2: its latent as of t (engine.context_inputs)
        j = t - s
        near = filled & (j >= 0) & (j < asof.shape[1])
        latent = np.where(near, asof[t, np.clip(j, 0, asof.shape[1] - 1)], latent)
    return np.asarray((old != new).any(axis=1) | (latent & filled).any(axis=1))


# ----------------------------------------------------------------------------- one tile
@dataclass(frozen=True)
class ExtendTask:
    """One tile of an extension (plain, picklable values): the tile's ordinary job and the extension's facts."""

    job: TileJob
    number: int  # the extension's number (1 = the first)
    old_dates: int  # the store's dates before it
    moved: tuple[int, ...]  # the old dates whose matched sensors moved (moved_dates)


def extend_tile(task: ExtendTask) -> tuple[int, int]:
    """Recompute one tile's changed old pixel-dates and embed its new dates, merged into its stored rows from its
    first changed date on (no other value rewritten), then mark it done for the extension. Runs on a dask worker,
    or here."""
    job, n_old = task.job, task.old_dates
    sink = job.sink
    if not isinstance(sink, ExtendableSink):  # pragma: no cover - the zarr store is one
        raise EmbedError(f"{type(sink).__name__} cannot grow a store (not an ExtendableSink)")
    model, device, block = load_tile(job)
    fusion = fusion_of(model)
    observed = centre_valid(block[ANCHOR].values, fusion.anchor.cfg.context_px)  # (n_new, h, w)
    n_new, h, w = observed.shape
    days = block[ANCHOR].days
    moved = np.zeros(n_old, dtype=bool)
    moved[list(task.moved)] = True
    changed = changed_set(fusion.cfg.window, fusion.anchor.cfg.n_frames, days[:n_old], days,
                          observed.reshape(n_new, -1), moved).reshape(n_old, h, w)
    rows = np.flatnonzero(changed.any(axis=(1, 2)))
    first = int(rows[0]) if rows.size else n_old
    values, _ = embed_tile(model, block, batch_size=job.batch_size, device=device, precision=job.precision,
                           daily=None, features=job.features, targets=np.concatenate([changed, observed[n_old:]]))
    take = np.ones((n_new - first, h, w), dtype=bool)  # the pixel-dates written: changed ones, every new one
    take[: n_old - first] = changed[first:]
    values = values[first:]
    codes_new = job.quant.encode(values)
    codes, valid, ext = sink.read_rows(job.grid, job.tile, slice(first, n_new))
    sink.write_rows(
        job.grid, job.tile, first, np.where(take[:, None], codes_new, codes),
        np.where(take, np.isfinite(values).all(axis=1), valid), np.where(take, task.number, ext).astype(np.uint8),
        job.quant.error_stats(values, codes_new),
    )
    sink.mark_extended(job.tile, task.number)  # last: a kill before it leaves the tile to the rerun
    return job.tile


# ----------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class ExtendOutcome:
    """What an extension did (:func:`extend_embeddings`)."""

    dates_added: int
    tiles_written: int
    tiles_skipped: int
    recomputed: int  # old pixel-dates written again (their inputs changed)
    storage_error: dict[str, Any]
    notes: tuple[str, ...]


def extend_embeddings(
    cube: str | Path, bundle_path: str | Path, out: str | Path, cfg: EmbedConfig, *, scheduler: str | None,
    progress: bool, owned: contextlib.ExitStack,
) -> ExtendOutcome:
    """Grow the complete embedding store ``out`` with the dates the scene store ``cube`` gained after the store's
    last, and recompute the old pixel-dates whose inputs changed (:func:`changed_set`); or finish an interrupted
    extension. Every check runs before anything is written; the lock ``OUT.lock`` is held by ``owned``.

    Raises:
        BundleError, CubeError: the bundle or the cube is unusable.
        EmbeddingStoreError: ``out`` is missing, unfinished, made with another bundle, settings or grid, its dates
            are not the cube's first, or it is mid-extension to another cube.
        EmbedError: a daily store or ``daily``, an unreachable scheduler, a failed tile (rerun to finish).
        OutputError: another live run holds ``out``.
    """
    out = Path(out)
    if cfg.daily:
        raise EmbedError(_daily_refusal(out))
    plan = plan_embedding(cube, bundle_path, cfg, scheduler=scheduler)
    attrs = claim_existing(out, owned)
    journal, notes = _check_extension(plan, out, attrs)
    n_tiles = len(plan.grid.tiles())
    if journal is None:
        return ExtendOutcome(0, 0, n_tiles, 0, attrs.get("storage_error", {}), (*plan.notes, *notes))
    if journal["step"] == "checked":
        check_cube_values(_new_part(plan.scene, journal["old_dates"]), plan.cube)
        resolve_device(cfg.device)
    sink = store.ZarrEmbeddingStore(str(out.resolve()))
    here = scheduler is None and cfg.workers == 1
    with contextlib.nullcontext() if here else cluster_client(scheduler, cfg.workers, cfg.connect_timeout_s) as client:
        if journal["step"] == "checked":
            journal = journal_extension(out, journal)
        if journal["step"] == "journaled":
            grow_store(out, plan)
        written = _run_tiles(plan, sink, journal, client, progress=progress)
    summary, recomputed = finalise_extension(out, plan, journal)
    return ExtendOutcome(journal["new_dates"] - journal["old_dates"], written, n_tiles - written, recomputed, summary,
                         (*plan.notes, *notes))


def _daily_refusal(out: Path) -> str:
    return (
        f"--extend does not grow daily stores yet ({out}, --daily): a day's fill reads later dates, so old days "
        "would change; fix: embed the grown cube into a new store (or --overwrite this one) with --daily"
    )


def _new_part(scene: Scene, old_dates: int) -> Scene:
    """The scene's dates after the store's last S2 date, each sensor's (the ones whose values no run checked)."""
    last = scene.s2[TIME].values[old_dates - 1]
    return Scene(site=scene.site, sensors={k: c.isel({TIME: np.flatnonzero(c[TIME].values > last)})
                                           for k, c in scene.sensors.items()})


def _check_extension(
    plan: EmbedPlan, out: Path, attrs: dict[str, Any]
) -> tuple[dict[str, Any] | None, tuple[str, ...]]:
    """The extension's journal (its step ``checked`` when none runs yet; the stored one when it continues one), or
    None when the cube has no new date; with notes for the user. Writes nothing."""
    fingerprint = attrs.get("fingerprint", {})
    if fingerprint.get("daily") is not None:
        raise EmbedError(_daily_refusal(out))
    check_fingerprint(out, fingerprint, plan.fingerprint, option="--extend", action="grow", skip=("cube_fingerprint",))
    new_times = plan.scene.s2[TIME].values
    journal = attrs.get(store.EXTENDING_ATTR)
    if journal is not None:
        if journal.get("cube_fingerprint") != plan.fingerprint["cube_fingerprint"]:
            raise EmbeddingStoreError(
                f"{out} is mid-extension to the {journal.get('new_dates')} dates of {journal.get('cube')} as it was "
                f"then, not to {plan.cube} with {new_times.size}; fix: rerun `stembed embed --extend` with that cube "
                "unchanged, or replace the store with --overwrite"
            )
        return dict(journal), tuple(journal.get("notes", ()))
    _check_complete_on_grid(plan, out, attrs)
    old_times = store.store_times(out)
    _check_prefix(out, plan.cube, old_times, new_times)
    if new_times.size == old_times.size:
        return None, ()
    old_sensors, notes = _old_sensor_times(plan, out, attrs, old_times)
    new_sensors = {k: plan.scene.sensors[k][TIME].values for k in plan.max_gap_days}
    moved = moved_dates(old_times, old_sensors, new_sensors, plan.max_gap_days, plan.model.cfg.trailing)
    journal = {
        "number": len(attrs.get("extensions", [])) + 1, "old_dates": int(old_times.size),
        "new_dates": int(new_times.size), "cube": str(plan.cube.resolve()),
        "cube_fingerprint": plan.fingerprint["cube_fingerprint"], "moved": [int(i) for i in np.flatnonzero(moved)],
        "sensor_dates": sensor_dates(plan), "notes": list(notes), "step": "checked",
    }
    return journal, notes


def _check_complete_on_grid(plan: EmbedPlan, out: Path, attrs: dict[str, Any]) -> None:
    """Refuse an unfinished store, and a cube on another grid or CRS than the store's."""
    if not attrs.get("complete") or not store.tiles_done(out).all():
        raise EmbeddingStoreError(
            f"{out} is an unfinished embedding run, and --extend grows complete stores only; fix: finish it first "
            "with `stembed embed ... --resume` and the cube it was started on"
        )
    s2 = plan.scene.s2
    with xr.open_zarr(out, consolidated=False) as ds:
        why = store.grid_mismatch(xr.Dataset(coords={Y: ds[Y].values, X: ds[X].values}), s2, "cube")
    if why is None and str(attrs.get("crs")) != str(s2.attrs.get("crs")):
        why = f"the cube's CRS {s2.attrs.get('crs')} is not the store's {attrs.get('crs')}"
    if why is not None:
        raise EmbeddingStoreError(f"{out} and {plan.cube} are not on one grid ({why}); --extend adds dates, not area; "
                                  + _GROWN)


def _check_prefix(out: Path, cube: Path, old: np.ndarray, new: np.ndarray) -> None:
    """Refuse a cube whose first dates are not the store's, naming the first that differs."""
    n = min(old.size, new.size)
    differ = np.flatnonzero(old[:n] != new[:n])
    if differ.size:
        i = int(differ[0])
        raise EmbeddingStoreError(
            f"{cube} does not start with the dates of {out}: the store's date {i + 1} is {_day(old[i])}, the cube's "
            f"{_day(new[i])}; {_GROWN}"
        )
    if new.size < old.size:
        raise EmbeddingStoreError(
            f"{cube} ends on {_day(new[-1])}, before the last date of {out} ({_day(old[-1])}; its date {n + 1}, "
            f"{_day(old[n])}, is not in the cube); {_GROWN}"
        )


def _day(t: Any) -> str:
    return str(np.datetime_as_string(np.datetime64(t, "s")))


def _old_sensor_times(
    plan: EmbedPlan, out: Path, attrs: dict[str, Any], old_s2: np.ndarray
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Each matched sensor's dates when the store was embedded: the first as many as it recorded (checked against the
    last it recorded), or, for a store that records none, those up to its last S2 date (with a note)."""
    recorded = attrs.get("sensor_dates") or {}
    old, notes = {}, []
    for key in plan.max_gap_days:
        times = plan.scene.sensors[key][TIME].values
        rec = recorded.get(key)
        if rec is None:
            old[key] = times[times <= old_s2[-1]]
            notes.append(f"{out} does not record its cube's {key} dates (it predates --extend): taken as those up "
                         "to its last S2 date")
            continue
        n = int(rec["count"])
        if n > times.size or (n and str(times[n - 1]) != rec["last"]):
            raise EmbeddingStoreError(
                f"{plan.cube}'s {key} dates do not start with the {n} that {out} was embedded from (the last was "
                f"{rec['last']}); {_GROWN}"
            )
        old[key] = times[:n]
    return old, tuple(notes)


def journal_extension(out: Path, journal: dict[str, Any]) -> dict[str, Any]:
    """Step 1: write the journal (``extending``, step ``journaled``); the journal."""
    journal = {**journal, "started": _now(), "step": "journaled"}
    store.begin_extension(out, journal)
    return journal


def grow_store(out: Path, plan: EmbedPlan) -> None:
    """Step 2: grow the store's time axis to the cube's dates (idempotent), then record the step."""
    store.grow_time(out, plan.scene.s2[TIME].values)
    store.set_extension_step(out, "resized")


def _run_tiles(
    plan: EmbedPlan, sink: store.ZarrEmbeddingStore, journal: dict[str, Any], client: Any, *, progress: bool
) -> int:
    """Step 3: every tile the extension has not finished, here one after another or on the cluster; how many."""
    from tqdm.auto import tqdm

    number = int(journal["number"])
    done = sink.tiles_extended(number)
    todo = [t for t in plan.grid.tiles() if not done[t]]
    tasks = [ExtendTask(job=job, number=number, old_dates=int(journal["old_dates"]), moved=tuple(journal["moved"]))
             for job in tile_jobs(plan, sink, todo, sink.quantisation(), topic=None)]
    with tqdm(total=len(tasks), desc="tiles", disable=not progress) as bar:
        if client is None:
            threads = torch.get_num_threads()
            try:
                for task in tasks:
                    _named(task)
                    bar.update()
            finally:
                release_tiles(threads)
        else:
            _run_on_cluster(client, tasks, bar)
    return len(todo)


def _named(task: ExtendTask) -> None:
    """:func:`extend_tile` here, a failure reported as a worker's is: named, with how to finish."""
    try:
        extend_tile(task)
    except Exception as err:
        raise_tile_failure(err, _RERUN)


_RERUN = "rerun the same `stembed embed --extend` command"


def _run_on_cluster(client: Any, tasks: list[ExtendTask], bar: Any) -> None:
    from distributed import as_completed

    futures = [
        client.submit(extend_tile, t, key=f"stembed-extend-{t.number}-{t.job.tile[0]}-{t.job.tile[1]}-"
                      f"{t.job.bundle_sha256[:8]}", pure=False)
        for t in tasks
    ]
    for fut in as_completed(futures, loop=client.loop):
        if fut.status == "error":
            raise_tile_failure(fut.exception(), _RERUN, futures)
        bar.update()


def finalise_extension(out: Path, plan: EmbedPlan, journal: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Step 4: record the extension (``extensions``), take the new cube's fingerprint and sensor dates, drop the
    journal and mark the store complete, in one write; the storage-error summary and the old pixel-dates
    recomputed."""
    number, n_old = int(journal["number"]), int(journal["old_dates"])
    counts = store.extension_counts(out, number, n_old)
    times = plan.scene.s2[TIME].values
    recomputed = {_day(times[i]): int(c) for i, c in enumerate(counts) if c}
    attrs = store.read_attrs(out)
    record = {
        "number": number, "started": journal["started"], "finished": _now(), "old_dates": n_old,
        "new_dates": int(journal["new_dates"]), "cube": journal["cube"], "cube_fingerprint": journal["cube_fingerprint"],
        "recomputed": recomputed, "recomputed_total": int(sum(recomputed.values())),
    }
    summary = store.finish_extension(out, {
        "fingerprint": {**attrs["fingerprint"], "cube_fingerprint": journal["cube_fingerprint"]},
        "sensor_dates": journal["sensor_dates"],
        "extensions": [*attrs.get("extensions", []), record],
    })
    return summary, record["recomputed_total"]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
