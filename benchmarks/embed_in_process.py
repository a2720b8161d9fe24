"""One local worker: `stembed embed` in this process vs on a LocalCluster of one worker process started for the run.

``workers: 1`` without ``--scheduler`` runs the tiles in the calling process (:mod:`stembed.inference.workers`); before,
it started a one-worker LocalCluster, whose process start and imports cost seconds per run. Both cases here embed the
same seeded synthetic cube with the same random-weight bundle and the same torch thread count (all cores), and the
outputs are compared. The cluster case's seconds include starting and closing its cluster, as a run did.

    .venv/bin/python benchmarks/embed_in_process.py [--sizes 24] [--days 200] [--repeats 2]

The bundle is the untrained ``tiny`` (per-patch) preset: larger sizes take minutes per case on 2 cores.

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def _case(cube: Path, bundle: Path, out: Path, threads: int, cluster: bool) -> float:
    from stembed.cluster import connect
    from stembed.config import EmbedConfig
    from stembed.inference.run import embed_cube

    t0 = time.perf_counter()
    cfg = EmbedConfig(tile_px=32, threads_per_worker=threads)
    if cluster:
        client, local = connect(None, 1, 60)
        try:
            embed_cube(cube, bundle, out, cfg, scheduler=local.scheduler_address, progress=False)
        finally:
            client.close()
            local.close()
    else:
        embed_cube(cube, bundle, out, cfg, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    """Embed each cube size in both ways, print a line per size and the JSON summary."""
    import numpy as np

    from stembed.io.cube import save_scene
    from stembed.io.embeddings import open_embeddings
    from stembed.testing import random_fusion_bundle, synthetic_scene

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[24], help="cube edges (px)")
    ap.add_argument("--days", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per case (the best is kept)")
    args = ap.parse_args()
    threads = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        bundle = random_fusion_bundle(d / "bundle.pt", tiny=True)
        for size in args.sizes:
            cube = d / f"scene{size}.zarr"
            save_scene(synthetic_scene(seed=0, height_px=size, width_px=size, n_days=args.days), cube)
            best: dict[str, float] = {}
            for r in range(args.repeats):
                for name, cluster in (("in_process", False), ("cluster_1_worker", True)):
                    s = _case(cube, bundle, d / f"{name}_{size}_{r}.zarr", threads, cluster)
                    best[name] = min(best.get(name, float("inf")), s)
            a = open_embeddings(d / f"in_process_{size}_0.zarr")["embedding"].values
            b = open_embeddings(d / f"cluster_1_worker_{size}_0.zarr")["embedding"].values
            row = {"size_px": size, "dates": int(open_embeddings(d / f"in_process_{size}_0.zarr").sizes["time"]),
                   **{f"{k}_s": round(v, 2) for k, v in best.items()},
                   "speedup": round(best["cluster_1_worker"] / best["in_process"], 2),
                   "identical": bool(np.array_equal(a, b, equal_nan=True))}
            print(f"{size:4d} px  in process {best['in_process']:6.2f} s   one-worker cluster "
                  f"{best['cluster_1_worker']:6.2f} s   ratio {row['speedup']:.2f}x   identical: {row['identical']}",
                  flush=True)
            rows.append(row)
    print(json.dumps({"threads": threads, "days": args.days, "rows": rows}))


if __name__ == "__main__":  # dask's spawned workers import this module: no work at import
    main()
