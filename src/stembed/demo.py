"""The built-in default job: all three training stages on the synthetic scene (``tiny-dense`` preset,
dense training on tiles), then an embedding cube and PCA maps of the held-out test site.

It exists so a new user sees the whole pipeline run in minutes on a laptop CPU and gets real
bundles, metrics, an embedding store and PNGs to inspect; the numbers it prints are measured on
held-out synthetic sites. The embedding step covers the whole test site over one summer.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from stembed.config import (
    AEStageConfig,
    DataConfig,
    DenseTrainingConfig,
    FusionLossConfig,
    FusionStageConfig,
    LossConfig,
    SamplingConfig,
    SplitConfig,
    SyntheticSource,
    TrainConfig,
)
from stembed.sensors import CORE_SENSORS
from stembed.training.run import RunResult, train_autoencoder, train_fusion

STAGES = (*CORE_SENSORS, "fusion", "embed")
EMBED_PX = 48
PRESET = "tiny-dense"
EMBED_PERIOD = ("2020-05-01", "2020-09-01")


def demo_configs(
    out: Path, *, max_epochs: int = 4, n_sites: int = 4, site_px: int = EMBED_PX,
    limit_train_batches: float | int = 1.0,
) -> dict[str, Any]:
    """The three stage configs of the demo. The end-to-end tests take smaller sites and fewer epochs and
    batches (``site_px``, ``max_epochs``, ``limit_train_batches``): they check the flow, not the figures."""
    source = SyntheticSource(n_sites=n_sites, height_px=site_px, width_px=site_px, n_days=365, seed=0)
    split = SplitConfig(by="site", fractions=(0.5, 0.25, 0.25), seed=0)
    # Denser sampling than the paper's strides: a demo has 4 small sites, not 500 cubes.
    s2_data = DataConfig(
        source=source,
        split=split,
        sampling=SamplingConfig(window_dates=20, window_stride=8, spatial_stride=4),
    )
    s1_data = DataConfig(
        source=source,
        split=split,
        sampling=SamplingConfig(window_dates=20, window_stride=8, spatial_stride=6),
    )
    train = TrainConfig(
        batch_size=64,
        max_epochs=max_epochs,
        lr=2e-3,
        warmup_steps=50,
        plateau_patience=2,
        early_stop_patience=4,
        min_lr=1e-5,
        seed=0,
        limit_train_batches=limit_train_batches,
    )
    # one frame-CNN pass per 32 px tile trains 256 centre pixel-dates (stembed.training.dense)
    dense = DenseTrainingConfig(crop_px=32, subsets=2, latents=256, render_frames=2)
    # MAE only, as in configs/belgium_*.yaml: the paper's SAM-heavy S2 loss held training back (docs/deviations.md)
    mae = LossConfig(mae=1.0)
    fusion_loss = FusionLossConfig(s1=LossConfig(mae=1.0, centre_weight=1.5), s2=LossConfig(mae=1.0, centre_weight=1.75))
    return {
        "s1": AEStageConfig(sensor="s1", preset=PRESET, data=s1_data, train=train, dense_training=dense,
                            out_dir=str(out)),
        "s2": AEStageConfig(sensor="s2", preset=PRESET, data=s2_data, loss=mae, train=train, dense_training=dense,
                            out_dir=str(out)),
        "fusion": FusionStageConfig(
            bundles={k: str(out / k / "bundle.pt") for k in CORE_SENSORS},
            preset=PRESET,
            data=s2_data,
            loss=fusion_loss,
            # starts at the best linear fusion of the training latents (stembed.training.fusion_init), so a lower
            # learning rate refines it
            init="linear",
            train=train.model_copy(update={"lr": 5e-4}),
            dense_training=dense,
            out_dir=str(out),
        ),
    }


def run_demo(
    out: Path, *, overwrite: bool = False, max_epochs: int = 4, embed_px: int = EMBED_PX, site_px: int = EMBED_PX,
    limit_train_batches: float | int = 1.0,
) -> dict[str, RunResult]:
    """Train S1, S2, then fusion into ``out/{s1,s2,fusion}``, print a summary, embed and map the test site
    into ``out/embed``; return the training runs. The keywords after ``overwrite`` shrink it for tests
    (:func:`demo_configs`)."""
    out = Path(out)
    existing = [out / s for s in STAGES if (out / s).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds demo output ({', '.join(p.name for p in existing)}); pass --overwrite to "
            "replace it or choose another --out"
        )
    for p in existing:
        shutil.rmtree(p)
    cfgs = demo_configs(out, max_epochs=max_epochs, site_px=site_px, limit_train_batches=limit_train_batches)
    runs = {k: train_autoencoder(cfgs[k], run_dir=out / k) for k in CORE_SENSORS}
    runs["fusion"] = train_fusion(cfgs["fusion"], run_dir=out / "fusion")
    print_summary(runs)
    products = embed_test_site(cfgs["fusion"], runs["fusion"], out / "embed", embed_px)
    print("\n".join(f"{k}: {v}" for k, v in products.items()))
    return runs


def embed_test_site(cfg: FusionStageConfig, run: RunResult, out: Path, size_px: int) -> dict[str, Any]:
    """Embed a ``size_px`` square corner of the held-out test site with the demo bundle; map it with PCA."""
    import numpy as np

    from stembed.config import EmbedConfig
    from stembed.contract import Scene, cube_transform
    from stembed.data.scenes import load_scenes
    from stembed.eval.pca import pca_maps
    from stembed.inference.run import embed_cube
    from stembed.io.cube import save_scene
    from stembed.io.embeddings import open_embeddings

    test_sites = [g["site"] for g in run.metrics["data"]["splits"]["test"]["groups"]]
    scene = next(s for s in load_scenes(cfg.data) if s.site == test_sites[0])
    times = scene.s2["time"].values
    summer = np.nonzero((times >= np.datetime64(EMBED_PERIOD[0])) & (times < np.datetime64(EMBED_PERIOD[1])))[
        0
    ]

    def corner(da: Any) -> Any:
        c = da.isel(y=slice(0, size_px), x=slice(0, size_px))
        c.attrs = {**da.attrs, "transform": list(cube_transform(c))}
        return c

    out.mkdir(parents=True, exist_ok=True)
    cube = save_scene(
        Scene.from_cubes(scene.site, s2=corner(scene.s2.isel(time=summer)), s1=corner(scene.s1)), out / "scene.zarr"
    )
    store = out / "embeddings.zarr"
    embed_cube(cube, run.bundle, store, EmbedConfig(tile_px=max(8, size_px // 2), workers=1))
    maps = pca_maps(
        open_embeddings(store), corner(scene.s2.isel(time=summer)), dates=None, out_dir=out / "pca"
    )
    import json

    ratio = json.loads(Path(maps["json"]).read_text())["explained_variance_ratio"]
    return {
        "scene store": cube,
        "embedding store": store,
        "PCA explained variance (PC1, PC2, PC3)": " / ".join(f"{100 * r:.1f} %" for r in ratio[:3]),
        **{f"PCA map {i + 1}": p for i, p in enumerate(maps["pngs"])},
    }


def print_summary(runs: dict[str, RunResult]) -> None:
    """Centre-pixel MAE on the held-out test sites against the two trivial baselines and PCA of the model's size."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="stembed demo: centre-pixel MAE on held-out test sites",
        caption="PCA-k: the linear model of the same size (k = latent or embedding size), fitted on the training "
        "sites' centre pixels",
    )
    for col in ("stage", "sensor", "model", "patch mean", "temporal neighbours", "PCA-k", "k", "centre SAM (rad)"):
        table.add_column(col)
    for stage, run in runs.items():
        k = run.metrics.get("baseline_pca", {}).get("k")
        for sensor, m in run.metrics["splits"].get("test", {}).items():
            table.add_row(
                stage,
                sensor,
                _fmt(m.get("centre_mae")),
                _fmt(m.get("baseline_patch_mean_centre_mae")),
                _fmt(m.get("baseline_temporal_neighbours_centre_mae")),
                _fmt(m.get("baseline_pca_centre_mae")),
                str(k),
                _fmt(m.get("centre_sam")),
            )
    console = Console()
    console.print(table)
    for stage, run in runs.items():
        console.print(f"{stage} bundle: {run.bundle}")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
