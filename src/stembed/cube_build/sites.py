"""``stembed cube --sites``: many scene stores in one call, one dask task per site, each a resumable
:func:`~stembed.cube_build.build.build_cube` whose failure is reported, not raised."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stembed.config import CubeConfig
from stembed.cube_build.build import build_cube
from stembed.cube_build.request import CubeRequest, shared_settings
from stembed.errors import CubeBuildError, UserError
from stembed.io.cube import open_scene
from stembed.io.outputs import check_file_output, check_output_folder, is_stembed_store, lock_output
from stembed.io.sites import REPORT_NAME, SiteOutcome, read_sites, store_path, write_report
from stembed.types import TIME


@dataclass(frozen=True)
class SitesRun:
    """What :func:`build_sites_table` did: every site's outcome, in the table's order, and the report it wrote."""

    outcomes: list[SiteOutcome]
    report: Path

    @property
    def failed(self) -> list[SiteOutcome]:
        """The sites that failed (their errors, fixes and tracebacks are in their outcomes)."""
        return [o for o in self.outcomes if o.failed]

    def count(self, status: str) -> int:
        """How many sites ended with ``status`` (``built``, ``already built``, ``failed``)."""
        return sum(o.status == status for o in self.outcomes)


def build_sites_table(
    table: str | Path,
    out_dir: str | Path,
    cfg: CubeConfig,
    *,
    start: str | None = None,
    end: str | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    scheduler: str | None = None,
    on_done: Callable[[SiteOutcome], None] | None = None,
) -> SitesRun:
    """``stembed cube --sites``: the scene store ``OUT_DIR/<site>.zarr`` of every row of the sites ``table`` (its
    area and period; ``start``/``end`` for rows without one) with the settings of ``cfg``, by :func:`build_cubes`.

    The options, the whole table and ``out_dir`` are checked before any site starts. One such run per ``out_dir``
    at a time (it holds the report's lock); the report ``OUT_DIR/sites_report.csv`` is rewritten as each site ends
    (then ``on_done`` hears it), so a run cut short still says which sites finished.

    Raises:
        CubeBuildError, SitesError, OutputError, ClusterError: a bad option, setting or table, an unusable or
            locked ``out_dir``, an unreachable scheduler (nothing was built).
    """
    _check_cluster_options(workers, scheduler)
    out_dir = Path(out_dir)
    report_csv = out_dir / REPORT_NAME
    shared = shared_settings(cfg)
    rows = read_sites(table, start=start, end=end, piece_months=cfg.piece_months)
    requests = [CubeRequest(grid=r.grid, start=r.start, end=r.end, site=r.site, **shared) for r in rows]
    check_output_folder(out_dir, option="--out-dir")
    check_file_output(report_csv, overwrite=True, what="report", option="--out-dir")
    done: list[SiteOutcome] = []

    def record(outcome: SiteOutcome) -> None:
        done.append(outcome)
        write_report(done, report_csv)  # so far: a run cut short still says which sites finished
        if on_done is not None:
            on_done(outcome)

    # one --sites run per --out-dir at a time (each site's store has its own lock besides)
    with lock_output(report_csv, command="cube --sites", option="--out-dir"):
        outcomes = build_cubes(
            requests, out_dir, overwrite=overwrite, workers=workers, scheduler=scheduler, on_done=record
        )
        write_report(outcomes, report_csv)
    return SitesRun(outcomes, report_csv)


def _check_cluster_options(workers: int | None, scheduler: str | None) -> None:
    if workers is not None and scheduler is not None:
        raise CubeBuildError("--workers starts a local cluster and --scheduler uses a running one; fix: pass one")
    if workers is not None and workers < 1:
        raise CubeBuildError(f"--workers is {workers}; fix: use at least 1")


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
    if todo:
        n_workers = workers if workers is not None else min(len(todo), 4)
        outcomes |= _build_on_cluster(todo, out_dir, overwrite, scheduler, n_workers, connect_timeout_s, say)
    return [outcomes[r.site] for r in requests]


def _build_on_cluster(
    todo: list[CubeRequest], out_dir: Path, overwrite: bool, scheduler: str | None, n_workers: int,
    connect_timeout_s: float, say: Callable[[SiteOutcome], None],
) -> dict[str, SiteOutcome]:
    """:func:`build_site` of each request on a cluster, by site; ``say`` hears each outcome as it ends."""
    from distributed import as_completed

    from stembed.cluster import cluster_client

    outcomes: dict[str, SiteOutcome] = {}
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
            outcome = _lost(request, out_dir, future) if future.status == "error" else future.result()
            outcomes[request.site] = outcome
            say(outcome)
    return outcomes


def _lost(request: CubeRequest, out_dir: Path, future: Any) -> SiteOutcome:
    """The outcome of a site whose task failed: :func:`build_site` reports every error itself, so its worker was
    lost."""
    err = future.exception()
    return SiteOutcome(
        request.site, "failed", store_path(out_dir, request.site),
        error=f"the worker building it was lost ({type(err).__name__}: {err}); fix: check the "
        "worker's memory and logs, then rerun the same command to resume",
    )


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
