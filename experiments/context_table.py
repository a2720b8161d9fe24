"""The ablation table of docs/results/context.md: context fusions trained with one term on or off, each probed
on the validation block beside the same-size baselines, with its reconstruction of the date.

For every ``NAME=RUN_DIR`` (a finished `stembed train fusion` run of a context fusion), the scene is embedded once
with the run's bundle (``RUN_DIR/embeddings.zarr``, kept for reuse), then probed exactly like `stembed eval probe`
on ``--region`` (default the Belgian validation block) for LC and CT, scoring only the embedding's nested prefixes;
the baselines (date, window, season) are scored once, on the first run's store (the pixel-dates and folds are the
same for every run: every observed S2 pixel-date has an embedding). Reconstruction figures come from each run's
``metrics.json`` (the same block). Choose on this table, never on the test block. Last line: JSON.

    .venv/bin/python experiments/context_table.py --cube runs/belgium/scene.zarr \\
        --run all=runs/belgium/ctx_all --run no_season=runs/belgium/ctx_no_season [--region 0:32,32:64]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import xarray as xr

from stembed.config import EmbedConfig
from stembed.eval.probe import parse_region, probe_table
from stembed.inference.run import embed_cube
from stembed.io.cube import Scene, open_scene
from stembed.io.embeddings import open_embeddings

LABELS = {"LC": (0, 99), "CT": (0,)}
MODELS = {"logistic_regression": "LR", "random_forest": "RF"}


def store_of(run: Path, cube: Path) -> Path:
    """The run's embedding store of ``cube`` (embedded on first use)."""
    out = run / "embeddings.zarr"
    if not out.exists():
        embed_cube(cube, run / "bundle.pt", out, EmbedConfig(), progress=False)
    return out


def probe(store: Path, scene: Scene, labels: xr.Dataset, region: tuple[int, int, int, int], block_px: int,
          only: list[str] | None, jobs: int) -> dict[str, dict[str, float]]:
    """{feature set: {"LC LR": macro-F1, ...}} on the region (``labels``: the scene's)."""
    ds = open_embeddings(store)
    out: dict[str, dict[str, float]] = {}
    for label, nodata in LABELS.items():
        res = probe_table(ds, scene.s2, labels, label=label, s1=scene.s1, region=region, block_px=block_px,
                          nodata=nodata, only=only, n_jobs=jobs)
        for r in res.summary.itertuples(index=False):
            out.setdefault(str(r.feature_set), {})[f"{label} {MODELS.get(str(r.model), str(r.model))}"] = round(
                float(r.macro_f1_mean), 3)
    return out


def recon(run: Path, split: str) -> dict[str, Any]:
    """The run's centre MAE per sensor and prefix, and its season MAE, on ``split``."""
    m = json.loads((run / "metrics.json").read_text())["splits"][split]
    return {f"{k} {name}": round(v, 4) for k, sensor in m.items() for name, v in sensor.items()
            if isinstance(v, float) and (name.startswith("centre_mae") or name.startswith("season_mae"))}


def main() -> None:
    """Embed and probe every run given, print the table, then its JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cube", type=Path, required=True)
    ap.add_argument("--run", action="append", required=True, metavar="NAME=RUN_DIR")
    ap.add_argument("--region", default="0:32,32:64", help="y0:y1,x0:x1 (default: the Belgian validation block)")
    ap.add_argument("--split", default="val", help="the metrics.json split of the region")
    ap.add_argument("--block-px", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--no-baselines", action="store_true")
    args = ap.parse_args()
    region = parse_region(args.region)
    scene = open_scene(args.cube, check_values=False)
    if scene.labels is None:
        ap.error(f"{args.cube} holds no labels (LC, CT) to probe; pass a scene store with labels")
    runs = dict(item.split("=", 1) for item in args.run)
    rows: dict[str, dict[str, Any]] = {}
    for i, (name, run) in enumerate(runs.items()):
        store = store_of(Path(run), args.cube)
        baselines = i == 0 and not args.no_baselines
        scores = probe(store, scene, scene.labels, region, args.block_px,
                       None if baselines else ["embedding7", "embedding16"], args.jobs)
        for fs, cells in scores.items():
            key = f"{name}: {fs}" if fs.startswith("embedding") else fs
            rows[key] = {**cells, **(recon(Path(run), args.split) if fs.startswith("embedding") else {})}
        print(f"probed {name}", flush=True)
    cols = ["LC LR", "LC RF", "CT LR", "CT RF"]
    print("| features | " + " | ".join(cols) + f" | recon ({args.split}) |")
    print("|---|" + "---:|" * len(cols) + "---|")
    for key, cells in rows.items():
        rec = ", ".join(f"{k} {v}" for k, v in cells.items() if k not in cols)
        print(f"| {key} | " + " | ".join(f"{cells.get(c, float('nan')):.3f}" for c in cols) + f" | {rec} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
