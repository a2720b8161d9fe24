"""Embedding speed and peak memory: the per-patch reference vs the tiled ``stembed embed``, at two sizes.

One run measures both paths on two seeded synthetic cubes whose areas differ x16 (default 12x12 and
48x48 px, ``--days 60`` giving 10-12 S2 dates), with the same fusion bundle and the same batch size:

- ``reference``: :func:`stembed.inference.reference.embed_reference` on the scene read from the
  saved scene store with :func:`stembed.io.cube.open_scene` and loaded into memory (the load is
  timed apart, ``load_s``; ``seconds`` is the ``embed_reference`` call alone);
- ``embed``: :func:`stembed.inference.tiles.embed_cube` on the same store, ``workers=1``,
  ``--tile-px`` tiles, float32 output. Its ``seconds`` is the whole call, so it INCLUDES starting the
  LocalCluster, the worker process importing torch and stembed, loading the bundle on the worker
  and writing the zarr store. That start-up is measured once on its own (``cluster_startup_s``: a
  LocalCluster of one worker started and a task that imports ``stembed.inference.tiles`` and loads
  the bundle run on it) so readers can see what is fixed cost and what scales with the cube.

Each (path, size) case runs in a fresh subprocess (this script re-invoked with ``--case``); the
parent samples the summed RSS of that subprocess and all its descendants (the dask worker and
helper processes) every ~50 ms and reports the peak in MiB (``peak_rss_mib``; shared pages are
counted once per process, so it is an upper bound). ``baseline_rss_mib`` is the case process alone
right after its imports and the bundle load, before any embedding: the part of the peak that is the
Python/torch runtime rather than the cube. ``pixel_dates`` counts valid pixel-dates (S2 centre pixel
with at least one finite band); ``pixel_dates_per_s`` is that over ``seconds``. The ratios compare
embed/reference speed at each size, large/small peak RSS per path and embed/reference peak RSS at
each size. As a side result the embed store is compared to the reference embeddings at each size
(max abs difference over pixel-dates finite in both, and the count whose NaN pattern differs).

The model is an untrained random-weight fusion bundle (:func:`stembed.testing.random_fusion_bundle`,
only the arithmetic matters for speed): ``--preset small`` and, by default, ``--tiny`` (shrunk
channels, to keep the run affordable on CPU); ``--no-tiny`` runs the full channels. The output names
the model that ran. On an otherwise idle 2-core machine the default run takes ~2.5 min.

    .venv/bin/python benchmarks/embed.py [--size 12] [--days 60] [--tile-px 16] [--batch-size 64]
        [--preset small] [--tiny | --no-tiny] [--device auto|cpu|cuda]

Last line: one JSON object.
"""

from __future__ import annotations

# Only light imports at module level: dask's spawned worker processes import this module as
# __mp_main__, and the case processes' baseline RSS should be their own imports.
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20
GAP_DAYS = 6.0  # S1 matching window, passed explicitly to both paths
SAMPLE_S = 0.05


# ----------------------------------------------------------------------------- case processes
def _own_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MIB


def _case_reference(a: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from stembed.inference.reference import embed_reference
    from stembed.io.cube import open_scene
    from stembed.models.bundle import load_bundle

    bundle = load_bundle(a.bundle, expect_kind="fusion")
    baseline = _own_rss_mib()
    t = time.perf_counter()
    scene = open_scene(a.cube)
    scene.s2.load()
    scene.s1.load()
    if scene.labels is not None:
        scene.labels.load()
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    ds = embed_reference(scene, bundle, max_gap_days=GAP_DAYS, batch_size=a.batch_size, device=a.device)
    seconds = time.perf_counter() - t
    np.save(a.save, ds["embedding"].values)
    return {"seconds": seconds, "load_s": load_s, "baseline_rss_mib": baseline,
            "torch_threads": torch.get_num_threads()}


def _case_embed(a: argparse.Namespace) -> dict:
    import distributed  # noqa: F401 - imported by embed_cube; counted in the baseline like torch

    from stembed.config import EmbedConfig
    from stembed.inference.tiles import embed_cube
    from stembed.models.bundle import load_bundle

    load_bundle(a.bundle, expect_kind="fusion")
    baseline = _own_rss_mib()
    cfg = EmbedConfig(tile_px=a.tile_px, batch_size=a.batch_size, workers=1, device=a.device,
                      s1_max_gap_days=GAP_DAYS, dtype="float32")
    t = time.perf_counter()
    res = embed_cube(a.cube, a.bundle, a.out, cfg, progress=False)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "result_seconds": res.seconds, "tiles_written": res.tiles_written,
            "baseline_rss_mib": baseline}


def _worker_warmup(bundle: str, device: str) -> None:
    """On the worker: what the first tile pays before its compute (imports, bundle hash and load)."""
    from stembed.inference.engine import resolve_device
    from stembed.inference.tiles import _worker_model
    from stembed.repro import file_sha256

    _worker_model(bundle, file_sha256(bundle), resolve_device(device))


def _case_startup(a: argparse.Namespace) -> dict:
    import logging

    from distributed import Client, LocalCluster

    import stembed.inference.tiles  # noqa: F401 - the client side is imported before timing, as in embed

    t = time.perf_counter()
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=logging.ERROR)
    client = Client(cluster, set_as_default=False)
    started = time.perf_counter() - t
    try:
        client.submit(_worker_warmup, str(Path(a.bundle).resolve()), a.device, pure=False).result()
        total = time.perf_counter() - t
    finally:
        client.close()
        cluster.close()
    return {"cluster_start_s": started, "cluster_startup_s": total}


CASES = {"reference": _case_reference, "embed": _case_embed, "startup": _case_startup}


def run_case(a: argparse.Namespace) -> None:
    out = CASES[a.case](a)
    Path(a.result).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- parent side
def _tree_rss(proc) -> tuple[int, int]:
    """RSS (bytes) of ``proc`` and the sum over its live descendants."""
    import psutil

    try:
        main = proc.memory_info().rss
        kids = proc.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0, 0
    rest = 0
    for k in kids:
        try:
            rest += k.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return main, rest


def spawn_case(case: str, tmp: Path, tag: str, a: argparse.Namespace, **paths: str) -> dict:
    """Run one case in a fresh subprocess, sampling its process tree's RSS; return its result."""
    import psutil

    result = tmp / f"{tag}.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--result", str(result),
           "--batch-size", str(a.batch_size), "--tile-px", str(a.tile_px), "--device", a.device]
    for k, v in paths.items():
        cmd += [f"--{k}", v]
    log = tmp / f"{tag}.log"
    peak = peak_main = peak_rest = 0
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        proc = psutil.Process(p.pid)
        while p.poll() is None:
            main, rest = _tree_rss(proc)
            peak, peak_main, peak_rest = max(peak, main + rest), max(peak_main, main), max(peak_rest, rest)
            time.sleep(SAMPLE_S)
    if p.returncode != 0:
        sys.stderr.write(log.read_text()[-6000:])
        raise SystemExit(f"case {case} ({tag}) failed with exit status {p.returncode}")
    out = json.loads(result.read_text())
    out.update({"peak_rss_mib": peak / MIB, "peak_main_rss_mib": peak_main / MIB,
                "peak_descendants_rss_mib": peak_rest / MIB})
    return out


def compare(ref_npy: Path, store: Path) -> tuple[float, int]:
    """Max abs difference where both are finite, and the count of values finite in only one."""
    import numpy as np

    from stembed.io.embeddings import open_embeddings

    ref = np.load(ref_npy)
    emb = open_embeddings(store)["embedding"].values
    if ref.shape != emb.shape:
        raise SystemExit(f"shape mismatch: reference {ref.shape}, embed {emb.shape}")
    fr, fe = np.isfinite(ref), np.isfinite(emb)
    both = fr & fe
    diff = float(np.abs(ref[both] - emb[both]).max()) if both.any() else 0.0
    return diff, int((fr != fe).sum())


def describe_model(bundle_path: Path, a: argparse.Namespace) -> dict:
    from stembed.inference.engine import resolve_device
    from stembed.models.bundle import load_bundle

    model = load_bundle(bundle_path, expect_kind="fusion").build_model()
    return {
        "bundle": "random_fusion_bundle (untrained, seed 0)",
        "preset": a.preset,
        "tiny": a.tiny,
        "parameters": sum(p.numel() for p in model.parameters()),
        "patch_px": model.s2.cfg.patch_px,
        "n_frames": model.s2.cfg.n_frames,
        "embed_dim": model.cfg.embed_dim,
        "device": str(resolve_device(a.device)),
    }


def _r(x: float, n: int = 3) -> float:
    return round(float(x), n)


def main_parent(a: argparse.Namespace) -> None:
    import numpy as np

    from stembed.io.cube import save_scene
    from stembed.testing import random_fusion_bundle, synthetic_scene

    t_all = time.perf_counter()
    sizes = (a.size, 4 * a.size)
    cases: list[dict] = []
    equality: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="stembed-bench-embed-") as d:
        tmp = Path(d)
        bundle = Path(random_fusion_bundle(tmp / "bundle.pt", seed=0, preset=a.preset, tiny=a.tiny))
        model = describe_model(bundle, a)
        label = (f"fusion preset={a.preset}{' tiny' if a.tiny else ''} ({model['parameters']:,} parameters, "
                 f"patch {model['patch_px']} px, {model['n_frames']} frames, "
                 f"embed_dim {model['embed_dim']}, {model['device']})")
        print(f"model: {label}", flush=True)
        startup = spawn_case("startup", tmp, "startup", a, bundle=str(bundle))
        print(f"cluster start-up (LocalCluster + worker imports + bundle load): "
              f"{startup['cluster_startup_s']:.1f} s", flush=True)
        for size in sizes:
            scene = synthetic_scene(seed=a.seed, height_px=size, width_px=size, n_days=a.days)
            cube = tmp / f"cube_{size}.zarr"
            save_scene(scene, cube)
            n_dates = int(scene.s2.sizes["time"])
            pixel_dates = int(np.isfinite(scene.s2.values).any(axis=1).sum())
            del scene
            ref_npy, out = tmp / f"reference_{size}.npy", tmp / f"embed_{size}.zarr"
            for path in ("reference", "embed"):
                extra = {"save": str(ref_npy)} if path == "reference" else {"out": str(out)}
                r = spawn_case(path, tmp, f"{path}_{size}", a, cube=str(cube), bundle=str(bundle), **extra)
                case = {"path": path, "size_px": size, "n_dates": n_dates, "pixel_dates": pixel_dates,
                        "seconds": _r(r["seconds"]), "pixel_dates_per_s": _r(pixel_dates / r["seconds"], 1),
                        "peak_rss_mib": _r(r["peak_rss_mib"], 1),
                        "baseline_rss_mib": _r(r["baseline_rss_mib"], 1),
                        "peak_main_rss_mib": _r(r["peak_main_rss_mib"], 1),
                        "peak_descendants_rss_mib": _r(r["peak_descendants_rss_mib"], 1)}
                if path == "reference":
                    case["load_s"] = _r(r["load_s"])
                    ref_threads = r["torch_threads"]
                else:
                    case["tiles"] = r["tiles_written"]
                cases.append(case)
                print(f"  {path:>9} {size}x{size} px: {case['seconds']:.2f} s, "
                      f"peak {case['peak_rss_mib']:.0f} MiB", flush=True)
            diff, nan_mismatch = compare(ref_npy, out)
            equality[str(size)] = {"max_abs_diff": diff, "nan_pattern_mismatches": nan_mismatch}

    by = {(c["path"], c["size_px"]): c for c in cases}
    small, large = sizes
    ratios = {
        "embed_over_reference_speed": {str(s): _r(by["embed", s]["pixel_dates_per_s"]
                                              / by["reference", s]["pixel_dates_per_s"]) for s in sizes},
        "large_over_small_peak_rss": {p: _r(by[p, large]["peak_rss_mib"] / by[p, small]["peak_rss_mib"])
                                      for p in ("reference", "embed")},
        "embed_over_reference_peak_rss": {str(s): _r(by["embed", s]["peak_rss_mib"]
                                                 / by["reference", s]["peak_rss_mib"]) for s in sizes},
    }
    threads = {"reference": ref_threads,
               "embed_worker": max(1, len(os.sched_getaffinity(0)) // 1)}  # what embed_cube sets, workers=1

    print()
    print(f"model: {label}; batch_size {a.batch_size}, tile_px {a.tile_px}, days {a.days}, "
          f"torch threads: reference {threads['reference']}, embed worker {threads['embed_worker']}")
    head = (f"{'path':>9} {'size':>7} {'dates':>5} {'px-dates':>9} {'seconds':>8} {'px-dates/s':>10} "
            f"{'baseline MiB':>12} {'peak MiB':>9} {'(main':>7} {'+ desc.)':>8}")
    print(head)
    print("-" * len(head))
    for c in cases:
        print(f"{c['path']:>9} {str(c['size_px']) + 'x' + str(c['size_px']):>7} {c['n_dates']:>5} "
              f"{c['pixel_dates']:>9} {c['seconds']:>8.2f} {c['pixel_dates_per_s']:>10.1f} "
              f"{c['baseline_rss_mib']:>12.0f} {c['peak_rss_mib']:>9.0f} {c['peak_main_rss_mib']:>7.0f} "
              f"{c['peak_descendants_rss_mib']:>8.0f}")
    print(f"embed seconds include cluster start-up, measured alone at {startup['cluster_startup_s']:.1f} s "
          f"(LocalCluster {startup['cluster_start_s']:.1f} s + worker imports and bundle load)")
    print()
    print(f"{'ratio':<34} {f'{small}x{small}':>9} {f'{large}x{large}':>9}")
    print(f"{'embed/reference speed':<34} {ratios['embed_over_reference_speed'][str(small)]:>9.2f} "
          f"{ratios['embed_over_reference_speed'][str(large)]:>9.2f}")
    print(f"{'embed/reference peak RSS':<34} {ratios['embed_over_reference_peak_rss'][str(small)]:>9.2f} "
          f"{ratios['embed_over_reference_peak_rss'][str(large)]:>9.2f}")
    print(f"{'ratio':<34} {'reference':>9} {'embed':>9}")
    print(f"{'large/small peak RSS (x16 area)':<34} {ratios['large_over_small_peak_rss']['reference']:>9.2f} "
          f"{ratios['large_over_small_peak_rss']['embed']:>9.2f}")
    for s in sizes:
        e = equality[str(s)]
        print(f"embed vs reference at {s}x{s}: max abs difference {e['max_abs_diff']:.3g}, "
              f"NaN-pattern mismatches {e['nan_pattern_mismatches']}")
    total = time.perf_counter() - t_all
    print(f"total benchmark time {total:.0f} s")
    print(json.dumps({
        "model": {**model, "label": label},
        "settings": {"size_px": list(sizes), "days": a.days, "tile_px": a.tile_px, "batch_size": a.batch_size,
                     "workers": 1, "seed": a.seed, "s1_max_gap_days": GAP_DAYS,
                     "cpus": len(os.sched_getaffinity(0))},
        "torch_threads": threads,
        "cluster_startup_s": _r(startup["cluster_startup_s"]),
        "cases": cases,
        "ratios": ratios,
        "max_abs_diff": equality[str(small)]["max_abs_diff"],
        "equality": equality,
        "total_s": _r(total, 1),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=12, help="small cube edge in px; the large is 4x this edge")
    ap.add_argument("--days", type=int, default=60, help="synthetic period in days (60: ~10-12 S2 dates)")
    ap.add_argument("--tile-px", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=True,
                    help="shrunk channels (default); --no-tiny runs the preset's full channels")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic scenes")
    # internal: one case in this (fresh) process
    ap.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    for k in ("cube", "bundle", "out", "save"):
        ap.add_argument(f"--{k}", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        run_case(a)
    else:
        main_parent(a)


if __name__ == "__main__":
    main()
