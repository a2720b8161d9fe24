"""Dense vs per-patch embedding: speed, FLOPs, share of the matmul peak, and peak RSS at two cube sizes.

One run, one random-weight fusion bundle of a ``dense`` preset (default ``dense``: the paper's
widths; :func:`stembed.testing.random_fusion_bundle`, untrained: only the arithmetic matters), on
seeded synthetic cubes (:func:`stembed.testing.synthetic_scene`):

1. **matmul peak**: the best of 5 timed fp32 ``torch.mm`` of 2048 x 2048 matrices on all cores,
   measured before and after the compute cases (the larger one is the reference for shares).
2. **compute, in this process**, on one ``--tile-px`` tile with its halo and all dates:
   ``dense`` = :func:`stembed.inference.engine.embed_block_dense` on the whole tile;
   ``reference`` = :func:`~stembed.inference.engine.embed_block` (every window encoded on its own,
   the same weights) on a ``--ref-px`` square inside it; ``paper_per_patch`` = the same per-patch path
   with the paper's ``patch`` encoder at the same widths (different, random weights: the cost a user
   paid before the dense variant). Each is timed once, and its FLOPs are counted in a separate call
   with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention; elementwise
   work is not counted, so GFLOP/s is the useful-arithmetic rate). The dense and reference outputs are
   compared on the reference's pixel-dates.
3. **end to end**: ``stembed embed`` (:func:`stembed.inference.run.embed_cube`, one worker,
   ``--tile-px`` tiles) on cubes of ``--size`` and 4 x ``--size`` px (area x16; or ``--e2e-sizes``), each in a fresh
   subprocess whose process tree's RSS is sampled every ~50 ms (peak, MiB; an upper bound, as shared
   pages count once per process). One worker runs the tiles in that process (no LocalCluster: see
   ``benchmarks/embed_in_process.py``); its seconds include the imports.

    .venv/bin/python benchmarks/embed.py [--preset dense] [--tile-px 64] [--size 64] [--days 40]
        [--ref-px 2] [--batch-size 1024] [--precision float32] [--device auto|cpu|cuda]

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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psutil

MIB = 1 << 20
GAP_DAYS = 6.0  # S1 matching window, passed explicitly to both paths
SAMPLE_S = 0.05


# ----------------------------------------------------------------------------- case processes
def _own_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MIB


def _case_embed(a: argparse.Namespace) -> dict[str, Any]:
    import distributed  # noqa: F401 - imported by embed_cube; counted in the baseline like torch

    from stembed.config import EmbedConfig
    from stembed.inference.run import embed_cube
    from stembed.models.bundle import load_bundle

    load_bundle(a.bundle, expect_kind="fusion")
    baseline = _own_rss_mib()
    cfg = EmbedConfig(
        tile_px=a.tile_px,
        batch_size=a.batch_size,
        workers=1,
        device=a.device,
        s1_max_gap_days=GAP_DAYS,
        dtype="float32",
        precision=a.precision,
    )
    t = time.perf_counter()
    res = embed_cube(a.cube, a.bundle, a.out, cfg, progress=False)
    seconds = time.perf_counter() - t
    return {
        "seconds": seconds,
        "result_seconds": res.seconds,
        "tiles_written": res.tiles_written,
        "baseline_rss_mib": baseline,
    }


CASES = {"embed": _case_embed}


def run_case(a: argparse.Namespace) -> None:
    """In a case process: run the case ``--case`` and write its result to ``--result``."""
    out = CASES[a.case](a)
    Path(a.result).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- parent side
def _tree_rss(proc: psutil.Process) -> tuple[int, int]:
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


def spawn_case(case: str, tmp: Path, tag: str, a: argparse.Namespace, **paths: str) -> dict[str, Any]:
    """Run one case in a fresh subprocess, sampling its process tree's RSS; return its result."""
    import psutil

    result = tmp / f"{tag}.json"
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--case",
        case,
        "--result",
        str(result),
        "--batch-size",
        str(a.batch_size),
        "--tile-px",
        str(a.tile_px),
        "--device",
        a.device,
        "--precision",
        a.precision,
    ]
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
    out.update(
        {
            "peak_rss_mib": peak / MIB,
            "peak_main_rss_mib": peak_main / MIB,
            "peak_descendants_rss_mib": peak_rest / MIB,
        }
    )
    return out


def _r(x: float, n: int = 3) -> float:
    return round(float(x), n)


# ----------------------------------------------------------------------------- compute, in process
def matmul_peak_gflops(threads: int) -> float:
    """This machine's fp32 matmul rate now: best of 5 timed 2048^3 ``torch.mm`` after a warm-up."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(5))
    return 2 * 2048**3 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def count_flops(fn: Callable[[], object]) -> tuple[int, int]:
    """FLOPs torch's FlopCounterMode counts for ``fn()`` (matmul, conv, attention; not elementwise): the
    total, and the part inside the dense frame CNN (``DenseFrameCNN`` modules; 0 for the patch encoder)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts()
    return int(counter.get_total_flops()), int(sum(counts.get("DenseFrameCNN", {}).values()))


def compute_cases(a: argparse.Namespace, tmp: Path, dense_bundle: Path, paper_bundle: Path) -> list[dict[str, Any]]:
    """Per-patch reference vs dense on one tile (same weights), plus the paper model per patch."""
    import numpy as np
    import torch

    from stembed.inference.blocks import read_block
    from stembed.inference.engine import Block, embed_block, embed_block_dense, resolve_device
    from stembed.models.bundle import load_bundle
    from stembed.models.fusion import FusionModel
    from stembed.runtime import tune_allocator
    from stembed.testing import synthetic_scene

    tune_allocator()
    device = resolve_device(a.device)
    dense = load_bundle(dense_bundle).build_model().to(device)
    paper = load_bundle(paper_bundle).build_model().to(device)
    if not isinstance(dense, FusionModel) or not isinstance(paper, FusionModel):
        raise TypeError("random_fusion_bundle writes the paper's fusion model, with a dense or patch encoder")
    scene = synthetic_scene(seed=a.seed, height_px=a.tile_px, width_px=a.tile_px, n_days=a.days)
    tile = slice(0, a.tile_px)
    sub = slice(a.tile_px // 2, a.tile_px // 2 + a.ref_px)  # the reference's few pixels, inside the tile

    def block(model: FusionModel, rows: slice, cols: slice) -> Block:
        return read_block(scene, rows, cols, model.anchor.cfg.context_px, {"s1": GAP_DAYS})

    def valid(arrays: Block, model: FusionModel) -> int:
        r = model.anchor.cfg.context_px
        s2 = arrays["s2"].values
        s2 = s2[:, :, r : s2.shape[2] - r, r : s2.shape[3] - r]
        return int(np.isfinite(s2).any(axis=1).sum())

    runs: dict[str, tuple[FusionModel, Block, Callable[[FusionModel, Block], np.ndarray]]] = {
        "dense": (
            dense,
            block(dense, tile, tile),
            lambda m, b: embed_block_dense(
                m, b, batch_size=a.batch_size, device=device, precision=a.precision
            ),
        ),
        "reference": (
            dense,
            block(dense, sub, sub),
            lambda m, b: embed_block(m, b, batch_size=a.ref_batch_size, device=device),
        ),
        "paper_per_patch": (
            paper,
            block(paper, sub, sub),
            lambda m, b: embed_block(m, b, batch_size=a.ref_batch_size, device=device),
        ),
    }
    outputs: dict[str, np.ndarray] = {}
    cases: list[dict[str, Any]] = []
    for name, (model, arrays, fn) in runs.items():
        n = valid(arrays, model)
        flops, cnn_flops = count_flops(lambda: fn(model, arrays))  # noqa: B023 - called right here
        seconds = _timed(lambda: outputs.__setitem__(name, fn(model, arrays)))  # noqa: B023
        cases.append(
            {
                "path": name,
                "pixel_dates": n,
                "seconds": _r(seconds),
                "pixel_dates_per_s": _r(n / seconds, 2),
                "flops_per_pixel_date": _r(flops / n, 0),
                "frame_cnn_flops_per_pixel_date": _r(cnn_flops / n, 0),  # dense frame CNN (halo, cloudy dates)
                "gflops_per_s": _r(flops / seconds / 1e9, 2),
            }
        )
        print(
            f"  {name:>16}: {n} pixel-dates in {seconds:.2f} s, {flops / n / 1e6:,.1f} MFLOP per pixel-date",
            flush=True,
        )
    off = a.tile_px // 2
    d = outputs["dense"][:, :, off : off + a.ref_px, off : off + a.ref_px]
    ref = outputs["reference"]
    both = np.isfinite(d) & np.isfinite(ref)
    cases.append(
        {
            "path": "dense_vs_reference",
            "max_abs_diff": float(np.abs(d[both] - ref[both]).max()),
            "nan_pattern_mismatches": int((np.isfinite(d) != np.isfinite(ref)).sum()),
        }
    )
    torch.set_num_threads(torch.get_num_threads())
    return cases


def describe(bundle_path: Path) -> dict[str, Any]:
    """The size and shape of a fusion bundle's model, for the JSON."""
    from stembed.models.bundle import load_bundle
    from stembed.models.fusion import FusionBase

    model = load_bundle(bundle_path, expect_kind="fusion").build_model()
    if not isinstance(model, FusionBase):
        raise TypeError(f"{bundle_path} holds no fusion model")
    cfg = model.anchor.cfg
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "variant": cfg.variant,
        "input_px": cfg.input_px,
        "n_frames": cfg.n_frames,
        "embed_dim": model.cfg.embed_dim,
        "stem_channels": cfg.stem_channels,
    }


def main_parent(a: argparse.Namespace) -> None:
    """Run the matmul peak, the compute cases and the end-to-end cases; print them, then the JSON."""
    import numpy as np
    import torch

    from stembed.inference.engine import resolve_device
    from stembed.io.cube import save_scene
    from stembed.testing import random_fusion_bundle, synthetic_scene

    t_all = time.perf_counter()
    threads = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="stembed-bench-embed-") as d:
        tmp = Path(d)
        dense_bundle = Path(random_fusion_bundle(tmp / "dense.pt", seed=0, preset=a.preset))
        paper_base = a.preset.removesuffix("-dense") if a.preset != "dense" else "paper"
        paper_bundle = Path(random_fusion_bundle(tmp / "paper.pt", seed=0, preset=paper_base))
        models = {"dense": describe(dense_bundle), "paper_per_patch": describe(paper_bundle)}
        print(
            f"models: {a.preset} {models['dense']} / {paper_base} {models['paper_per_patch']}; "
            f"device {resolve_device(a.device)}",
            flush=True,
        )
        peak = matmul_peak_gflops(threads)
        print(f"fp32 matmul peak (2048^3 torch.mm, {threads} threads): {peak:.1f} GFLOP/s", flush=True)
        compute = compute_cases(a, tmp, dense_bundle, paper_bundle)
        peak_after = matmul_peak_gflops(threads)
        print(f"fp32 matmul peak again after the compute cases: {peak_after:.1f} GFLOP/s", flush=True)

        sizes = tuple(a.e2e_sizes) if a.e2e_sizes else (a.size, 4 * a.size)
        e2e = []
        for size in sizes:
            scene = synthetic_scene(seed=a.seed, height_px=size, width_px=size, n_days=a.days)
            cube = tmp / f"cube_{size}.zarr"
            save_scene(scene, cube)
            pixel_dates = int(np.isfinite(scene.s2.values).any(axis=1).sum())
            n_dates = int(scene.s2.sizes["time"])
            del scene
            r = spawn_case(
                "embed",
                tmp,
                f"embed_{size}",
                a,
                cube=str(cube),
                bundle=str(dense_bundle),
                out=str(tmp / f"embed_{size}.zarr"),
            )
            e2e.append(
                {
                    "size_px": size,
                    "n_dates": n_dates,
                    "pixel_dates": pixel_dates,
                    "seconds": _r(r["seconds"]),
                    "pixel_dates_per_s": _r(pixel_dates / r["seconds"], 1),
                    "tiles": r["tiles_written"],
                    "peak_rss_mib": _r(r["peak_rss_mib"], 1),
                    "baseline_rss_mib": _r(r["baseline_rss_mib"], 1),
                }
            )
            print(
                f"  stembed embed {size}x{size} px x {n_dates} dates: {r['seconds']:.1f} s, "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB",
                flush=True,
            )

    by = {c["path"]: c for c in compute}
    peak_ref = max(peak, peak_after)
    for c in compute:
        if "gflops_per_s" in c:
            c["share_of_matmul_peak"] = _r(c["gflops_per_s"] / peak_ref, 4)
    ratios = {
        "dense_over_reference_speed": _r(
            by["dense"]["pixel_dates_per_s"] / by["reference"]["pixel_dates_per_s"], 1
        ),
        "dense_over_paper_per_patch_speed": _r(
            by["dense"]["pixel_dates_per_s"] / by["paper_per_patch"]["pixel_dates_per_s"], 1
        ),
        "reference_over_dense_flops": _r(
            by["reference"]["flops_per_pixel_date"] / by["dense"]["flops_per_pixel_date"], 1
        ),
        "paper_per_patch_over_dense_flops": _r(
            by["paper_per_patch"]["flops_per_pixel_date"] / by["dense"]["flops_per_pixel_date"], 1
        ),
        "large_over_small_peak_rss": _r(e2e[-1]["peak_rss_mib"] / e2e[0]["peak_rss_mib"]),
    }
    print()
    print(
        f"one {a.tile_px}x{a.tile_px} px tile, all dates, batch {a.batch_size}, {torch.get_num_threads()} threads; "
        f"reference paths on {a.ref_px}x{a.ref_px} px of it"
    )
    head = f"{'path':>16} {'px-dates':>8} {'seconds':>8} {'px-dates/s':>10} {'MFLOP/px-date':>13} {'GFLOP/s':>8} {'of peak':>7}"
    print(head)
    print("-" * len(head))
    for c in compute:
        if "gflops_per_s" in c:
            print(
                f"{c['path']:>16} {c['pixel_dates']:>8} {c['seconds']:>8.2f} {c['pixel_dates_per_s']:>10.1f} "
                f"{c['flops_per_pixel_date'] / 1e6:>13.1f} {c['gflops_per_s']:>8.1f} "
                f"{100 * c['share_of_matmul_peak']:>6.1f}%"
            )
    dense_cnn = by["dense"]["frame_cnn_flops_per_pixel_date"] / 1e6
    print(
        f"dense MFLOP per pixel-date: {dense_cnn:.1f} in the frame CNN, "
        f"{by['dense']['flops_per_pixel_date'] / 1e6 - dense_cnn:.1f} per window (transformers, heads, fusion)"
    )
    eq = by["dense_vs_reference"]
    print(f"matmul peak {peak_ref:.1f} GFLOP/s (best of the two measurements: {peak:.1f}, {peak_after:.1f})")
    print(
        f"dense vs reference on the same pixel-dates: max abs difference {eq['max_abs_diff']:.3g}, "
        f"NaN-pattern mismatches {eq['nan_pattern_mismatches']}"
    )
    for k, v in ratios.items():
        print(f"{k:<36} {v}")
    print(
        f"{'size':>9} {'px-dates':>9} {'seconds':>8} {'px-dates/s':>10} {'peak RSS MiB':>12}  (stembed embed end to end)"
    )
    for c in e2e:
        print(
            f"{str(c['size_px']) + 'x' + str(c['size_px']):>9} {c['pixel_dates']:>9} {c['seconds']:>8.1f} "
            f"{c['pixel_dates_per_s']:>10.1f} {c['peak_rss_mib']:>12.0f}"
        )
    total = time.perf_counter() - t_all
    print(f"total benchmark time {total:.0f} s")
    print(
        json.dumps(
            {
                "models": models,
                "settings": {
                    "preset": a.preset,
                    "tile_px": a.tile_px,
                    "ref_px": a.ref_px,
                    "days": a.days,
                    "batch_size": a.batch_size,
                    "precision": a.precision,
                    "sizes_px": list(sizes),
                    "seed": a.seed,
                    "cpus": threads,
                    "device": str(resolve_device(a.device)),
                },
                "matmul_peak_gflops": [_r(peak, 1), _r(peak_after, 1)],
                "compute": compute,
                "end_to_end": e2e,
                "ratios": ratios,
                "total_s": _r(total, 1),
            }
        )
    )


def main() -> None:
    """The whole benchmark, or (``--case``, internal) one end-to-end case in this fresh process."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="small cube edge in px; the large is 4x this edge")
    ap.add_argument("--days", type=int, default=40, help="synthetic period in days (40: ~6-8 S2 dates)")
    ap.add_argument("--tile-px", type=int, default=64)
    ap.add_argument("--e2e-sizes", type=int, nargs="+", help="cube edges of the end-to-end runs (default: size, 4x size)")
    ap.add_argument("--ref-px", type=int, default=2, help="edge of the block the per-patch paths embed")
    ap.add_argument("--batch-size", type=int, default=1024, help="windows per forward pass of the dense path")
    ap.add_argument("--ref-batch-size", type=int, default=8,
                    help="patches per forward pass of the per-patch paths (each holds 11 frames of 47 px maps)")
    ap.add_argument("--precision", default="float32", choices=("auto", "float32", "bfloat16", "float16"))
    ap.add_argument(
        "--preset", default="dense", help="a dense preset: dense (paper widths), small-dense, tiny-dense"
    )
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
