"""``stembed cube --sites``: many scene stores in one call, one dask task per site, each a resumable
:func:`~stembed.cube_build.build.build_cube` whose failure is reported, not raised."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from stembed.cube_build.build import build_cube
from stembed.cube_build.request import CubeRequest
from stembed.errors import UserError
from stembed.io.cube import open_scene
from stembed.io.outputs import is_stembed_store
from stembed.io.sites import SiteOutcome, store_path
from stembed.types import TIME


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
