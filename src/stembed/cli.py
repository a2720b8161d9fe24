"""Command line: a thin shell that parses, builds a config, calls one library function, and exits.

Errors the user can fix (bad config, bad cube, wrong bundle, too little data) print one message
naming the problem and the fix, and exit with status 2; anything else is a bug and shows a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Per-date Sentinel-1/2 embeddings.")
train_app = typer.Typer(no_args_is_help=True, help="Train stage 1 (s1, s2) or stage 2 (fusion).")
app.add_typer(train_app, name="train")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML stage config (defaults apply if omitted).")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config value: key.path=value (repeatable).")
]
RunDirOpt = Annotated[Path | None, typer.Option("--run-dir", help="Run folder (default: <out_dir>/train-*/<time>-<hash>).")]
ResumeOpt = Annotated[Path | None, typer.Option("--resume", help="Continue from a Lightning checkpoint (last.ckpt).")]

T = TypeVar("T")


def _user_errors() -> tuple[type[Exception], ...]:
    from stembed.config import ConfigError
    from stembed.data.sampling import SamplingError
    from stembed.io.cube import CubeError
    from stembed.io.embeddings import EmbeddingStoreError, EmbedError
    from stembed.io.sample import SampleError
    from stembed.models.bundle import BundleError

    return (
        ConfigError, CubeError, BundleError, SamplingError, EmbeddingStoreError, EmbedError, SampleError,
        FileExistsError, FileNotFoundError,
    )


def _run(fn: Callable[[], T]) -> T:
    """Call ``fn``; turn user-fixable errors into one red line and exit status 2."""
    errors = _user_errors()
    try:
        return fn()
    except errors as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _train_ae(sensor: str, config: Path | None, set_: list[str] | None, run_dir: Path | None, resume: Path | None) -> None:
    from stembed.config import AEStageConfig, ConfigError, load_config
    from stembed.runtime import tune_allocator
    from stembed.training.run import train_autoencoder

    def go() -> Any:
        cfg = load_config(AEStageConfig, config, [f"sensor={sensor}", *(set_ or [])])
        if config is not None:
            import yaml

            in_file = (yaml.safe_load(config.read_text()) or {}).get("sensor")
            if in_file not in (None, sensor):
                raise ConfigError(f"{config} is a config for sensor {in_file!r}; run `stembed train {in_file}`")
        return train_autoencoder(cfg, run_dir=run_dir, resume=resume)

    tune_allocator()
    res = _run(go)
    typer.echo(f"bundle: {res.bundle}\nmetrics: {res.run_dir / 'metrics.json'}")


@train_app.command("s1")
def train_s1(config: ConfigOpt = None, set_: SetOpt = None, run_dir: RunDirOpt = None, resume: ResumeOpt = None) -> None:
    """Train the Sentinel-1 autoencoder."""
    _train_ae("s1", config, set_, run_dir, resume)


@train_app.command("s2")
def train_s2(config: ConfigOpt = None, set_: SetOpt = None, run_dir: RunDirOpt = None, resume: ResumeOpt = None) -> None:
    """Train the Sentinel-2 autoencoder."""
    _train_ae("s2", config, set_, run_dir, resume)


@train_app.command("fusion")
def train_fusion_cmd(
    config: ConfigOpt = None, set_: SetOpt = None, run_dir: RunDirOpt = None, resume: ResumeOpt = None
) -> None:
    """Train the fusion layers on two stage-1 bundles (s1_bundle, s2_bundle in the config)."""
    from stembed.config import FusionStageConfig, load_config
    from stembed.runtime import tune_allocator
    from stembed.training.run import train_fusion

    tune_allocator()
    res = _run(lambda: train_fusion(load_config(FusionStageConfig, config, set_), run_dir=run_dir, resume=resume))
    typer.echo(f"bundle: {res.bundle}\nmetrics: {res.run_dir / 'metrics.json'}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder for the three bundles and metrics.")] = Path(
        "demo_out"
    ),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing demo output.")] = False,
) -> None:
    """Train S1, S2 and fusion on the built-in synthetic scene (small preset, minutes on a laptop CPU)."""
    from stembed.demo import run_demo
    from stembed.runtime import tune_allocator

    tune_allocator()
    _run(lambda: run_demo(out, overwrite=overwrite))


@app.command()
def info(
    bundle: Annotated[Path | None, typer.Argument(help="A bundle.pt to describe.")] = None,
    preset: Annotated[str | None, typer.Option("--preset", help="Describe a named preset instead (paper, small).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print a model's configuration and parameter counts per part."""
    from stembed.describe import describe_bundle, describe_preset

    if (bundle is None) == (preset is None):
        typer.secho("error: give either a BUNDLE path or --preset NAME (not both)", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    report = _run(lambda: describe_bundle(bundle) if bundle is not None else describe_preset(str(preset)))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from stembed.describe import render

    render(report, sys.stdout)


@app.command()
def embed(
    cube: Annotated[Path, typer.Option("--cube", help="Scene store (zarr, S2 + S1) to embed.")],
    bundle: Annotated[Path, typer.Option("--bundle", help="Fusion bundle.pt.")],
    out: Annotated[Path, typer.Option("--out", help="Output embedding store (zarr).")],
    workers: Annotated[int | None, typer.Option("--workers", help="Local dask worker processes (default 1).")] = None,
    scheduler: Annotated[
        str | None, typer.Option("--scheduler", help="Address of a running dask scheduler (instead of --workers).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Finish an interrupted run (or check a finished one).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing embedding store.")] = False,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="Storage: float32 (default), float16 or int8 (scale + offset).")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML EmbedConfig (tile_px, batch_size, ...).")] = None,
    set_: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Embed every pixel and valid S2 date of a scene store, tile by tile on dask, into a zarr store."""
    from stembed.config import ConfigError, EmbedConfig, load_config
    from stembed.inference.tiles import embed_cube
    from stembed.runtime import tune_allocator

    def go() -> Any:
        if workers is not None and scheduler is not None:
            raise ConfigError("--workers starts a local cluster and --scheduler uses a running one; pass one")
        overrides = list(set_ or [])
        if workers is not None:
            overrides.append(f"workers={workers}")
        if dtype is not None:
            overrides.append(f"dtype={dtype}")
        cfg = load_config(EmbedConfig, config, overrides)
        return embed_cube(
            cube, bundle, out, cfg, resume=resume, overwrite=overwrite, scheduler=scheduler, progress=not quiet
        )

    tune_allocator()
    res = _run(go)
    if res.tiles_written == 0:
        typer.echo(f"{res.out} is complete ({res.tiles_skipped} tiles); nothing to write")
        return
    err = res.storage_error
    typer.echo(
        f"embeddings: {res.out} ({res.tiles_written} tiles written, {res.tiles_skipped} already done, "
        f"{res.seconds:.1f} s; {err['dtype']} storage, max abs error {max(err['max_abs']):.3g})"
    )


# ----------------------------------------------------------------------------- products of an embedding store
EmbeddingsOpt = Annotated[
    Path, typer.Option("--embeddings", help="Embedding store (zarr) from `stembed embed`.")
]
DatesOpt = Annotated[
    list[str] | None, typer.Option("--dates", help="ISO date to use, e.g. 2021-06-03 (repeatable).")
]


@app.command()
def pca(
    embeddings: EmbeddingsOpt,
    cube: Annotated[Path, typer.Option("--cube", help="Scene store (zarr) the embeddings were made from.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the PNGs and pca.json.")],
    dates: DatesOpt = None,
    samples: Annotated[int, typer.Option("--samples", help="Pixel-dates sampled to fit the PCA.")] = 100_000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample.")] = 0,
) -> None:
    """Map PCA components 1-3 of the embeddings to RGB, beside the S2 true colour (default: 4 best dates)."""
    from stembed.eval.pca import pca_maps
    from stembed.io.cube import open_scene
    from stembed.io.embeddings import open_embeddings

    res = _run(
        lambda: pca_maps(
            open_embeddings(embeddings), open_scene(cube, check_values=False).s2, dates=dates, out_dir=out,
            n_samples=samples, seed=seed,
        )
    )
    typer.echo("\n".join([*(f"map: {p}" for p in res["pngs"]), f"pca: {res['json']}"]))


@app.command()
def sample(
    embeddings: EmbeddingsOpt,
    points: Annotated[Path, typer.Option("--points", help="CSV: lon,lat (WGS84) or x,y, optional id.")],
    out: Annotated[Path, typer.Option("--out", help="Output table, .csv or .parquet.")],
    window_px: Annotated[int, typer.Option("--window-px", help="Odd window side K: mean over K x K px.")] = 1,
) -> None:
    """Sample the embeddings at points: one row per point and date (window mean over valid pixels)."""
    from stembed.io.embeddings import open_embeddings
    from stembed.io.sample import read_points, sample_points, write_table

    def go() -> Path:
        table = sample_points(open_embeddings(embeddings), read_points(points), window_px=window_px)
        return write_table(table, out)

    path = _run(go)
    typer.echo(f"table: {path}")


@app.command()
def export(
    embeddings: EmbeddingsOpt,
    out: Annotated[Path, typer.Option("--out", help="Output folder for the GeoTIFFs.")],
    dates: DatesOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing GeoTIFFs.")] = False,
) -> None:
    """Write one 7-band float32 GeoTIFF per date (all dates, or --dates)."""
    from stembed.io.embeddings import open_embeddings
    from stembed.io.export import export_geotiffs

    files = _run(lambda: export_geotiffs(open_embeddings(embeddings), out, dates=dates, overwrite=overwrite))
    typer.echo(f"{len(files)} GeoTIFF(s) in {out}")


if __name__ == "__main__":  # pragma: no cover
    app()
