"""Command line: a thin shell that parses, builds a config, calls one library function, and exits.

Errors the user can fix (bad config, bad cube, wrong bundle, too little data) print one message
naming the problem and the fix, and exit with status 2; anything else is a bug and shows a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Per-date Sentinel-1/2 embeddings.")
train_app = typer.Typer(
    no_args_is_help=True,
    help="Train stage 1 (s1, s2, or a companion sensor), stage 2 (fusion), or the cloudy-date layers (gapfill).",
)
app.add_typer(train_app, name="train")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML stage config (defaults apply if omitted).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", help="Override a config value: key.path=value (repeatable)."),
]
RunDirOpt = Annotated[Path | None, typer.Option("--run-dir", help="Run folder (default: <out_dir>/train-*/<time>-<hash>).")]
ResumeOpt = Annotated[Path | None, typer.Option("--resume", help="Continue from a Lightning checkpoint (last.ckpt).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", metavar="", help="No progress bar.")]
VerboseOpt = Annotated[
    bool,
    typer.Option("--verbose", metavar="", help="Show Lightning's banners and deprecation warnings."),
]


def _version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        typer.echo(f"stembed {version('stembed')}")
    except PackageNotFoundError:
        typer.echo("stembed (not installed, so it has no version; fix: pip install -e . in the source tree)")
    raise typer.Exit(0)


@app.callback()
def main(
    show_version: Annotated[
        bool,
        typer.Option("--version", metavar="", help="Print the version and exit.", callback=_version,
                     is_eager=True),
    ] = False,
) -> None:
    """Per-date Sentinel-1/2 embeddings."""


_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


@contextlib.contextmanager
def _training_output(verbose: bool) -> Iterator[None]:
    """Hide Lightning's INFO banners ("GPU available ...", checkpoint notes) and deprecation or
    "possible user" warnings, unless ``verbose``. stembed's own warnings and all errors still show."""
    if verbose:
        yield
        return
    import lightning.pytorch  # noqa: F401  (importing sets the logger levels: import before changing them)
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            hidden = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, PossibleUserWarning)
            for category in hidden:
                warnings.simplefilter("ignore", category)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)

T = TypeVar("T")


def _user_errors() -> tuple[type[Exception], ...]:
    from stembed.errors import UserError

    return (UserError, FileExistsError, FileNotFoundError)


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


_RESUME_TRAIN = "rerun with --resume RUN_DIR/checkpoints/last.ckpt to continue"
_RESUME_EMBED = "tiles written so far are kept: rerun with --resume to finish the store"
_RESUME_EMBED_EXTEND = "tiles written so far are kept: rerun the same command to finish the extension"
_RESUME_CUBE = "finished pieces are kept: rerun the same command to resume"


def _run(fn: Callable[[], T], *, resume: str | None = None) -> T:
    """Call ``fn``; turn user-fixable errors into one red line and exit status 2.

    Ctrl-C prints one line (with ``resume``: how to continue) and exits with status 130.
    """
    errors = _user_errors()
    try:
        return fn()
    except errors as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        typer.secho(f"interrupted{'; ' + resume if resume else ''}", fg=typer.colors.RED, err=True)
        raise typer.Exit(130) from None
    except PermissionError as e:  # the user's file system, not a bug: name the path
        where = e.filename if e.filename is not None else "a file"
        raise _fail(
            f"no permission to write or read {where} ({e.strerror}); fix: choose a path this user may write, "
            "or change its permissions"
        ) from None


def _run_into(folder: Path, fn: Callable[[], T]) -> T:
    """``_run(fn)`` for a command writing into ``folder``: a failure leaves no new empty folder behind."""
    existed = folder.exists()
    try:
        return _run(fn)
    except BaseException:
        if not existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise


def _echo_result(res: Any) -> None:
    if res.lead:  # DDP: one line set, from global rank 0 (the one that wrote them)
        typer.echo(f"bundle: {res.bundle}\nmetrics: {res.run_dir / 'metrics.json'}")


def _quiet_set(set_: list[str] | None, quiet: bool) -> list[str]:
    """The --set overrides, with --quiet's (no progress bar) last so it wins."""
    return [*(set_ or []), *(["train.progress_bar=false"] if quiet else [])]


def _train_ae(
    sensor: str, config: Path | None, set_: list[str] | None, run_dir: Path | None, resume: Path | None,
    quiet: bool = False, verbose: bool = False,
) -> None:
    from stembed.config import AEStageConfig, ConfigError, load_config
    from stembed.runtime import tune_allocator
    from stembed.training.claim import claim_run_folder
    from stembed.training.run import train_autoencoder

    def go() -> Any:
        cfg = load_config(AEStageConfig, config, [f"sensor={sensor}", *_quiet_set(set_, quiet)])
        if config is not None:
            import yaml

            in_file = (yaml.safe_load(config.read_text()) or {}).get("sensor")
            if in_file not in (None, sensor):
                raise ConfigError(f"{config} is a config for sensor {in_file!r}; run `stembed train {in_file}`")
        with claim_run_folder(run_dir, resume, cfg.train), _training_output(verbose):
            return train_autoencoder(cfg, run_dir=run_dir, resume=resume)

    tune_allocator()
    res = _run(go, resume=_RESUME_TRAIN)
    _echo_result(res)


@train_app.command("s1")
def train_s1(
    config: ConfigOpt = None, set_: SetOpt = None, run_dir: RunDirOpt = None, resume: ResumeOpt = None,
    quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Train the Sentinel-1 autoencoder."""
    _train_ae("s1", config, set_, run_dir, resume, quiet, verbose)


@train_app.command("s2")
def train_s2(
    config: ConfigOpt = None, set_: SetOpt = None, run_dir: RunDirOpt = None, resume: ResumeOpt = None,
    quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Train the Sentinel-2 autoencoder."""
    _train_ae("s2", config, set_, run_dir, resume, quiet, verbose)


@train_app.command("sensor")
def train_sensor(
    name: Annotated[str, typer.Argument(help="A registered companion sensor, e.g. agera5.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    resume: ResumeOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train a companion sensor's autoencoder (its scenes: data.extra_sensors must name it)."""
    _train_ae(name, config, set_, run_dir, resume, quiet, verbose)


@train_app.command("gapfill")
def train_gapfill_cmd(
    config: ConfigOpt = None, set_: SetOpt = None, run_dir: RunDirOpt = None, resume: ResumeOpt = None,
    quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Train the fusion layers that embed cloudy dates (fusion_bundle in the config; its data section)."""
    from stembed.config import GapFillStageConfig, load_config
    from stembed.runtime import tune_allocator
    from stembed.training.claim import claim_run_folder
    from stembed.training.run import train_gapfill

    tune_allocator()

    def go() -> Any:
        cfg = load_config(GapFillStageConfig, config, _quiet_set(set_, quiet))
        with claim_run_folder(run_dir, resume, cfg.train), _training_output(verbose):
            return train_gapfill(cfg, run_dir=run_dir, resume=resume)

    res = _run(go, resume=_RESUME_TRAIN)
    _echo_result(res)


@train_app.command("fusion")
def train_fusion_cmd(
    config: ConfigOpt = None, set_: SetOpt = None, run_dir: RunDirOpt = None, resume: ResumeOpt = None,
    quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Train the fusion layers on two stage-1 bundles (s1_bundle, s2_bundle in the config)."""
    from stembed.config import FusionStageConfig, load_config
    from stembed.runtime import tune_allocator
    from stembed.training.claim import claim_run_folder
    from stembed.training.run import train_fusion

    tune_allocator()

    def go() -> Any:
        cfg = load_config(FusionStageConfig, config, _quiet_set(set_, quiet))
        with claim_run_folder(run_dir, resume, cfg.train), _training_output(verbose):
            return train_fusion(cfg, run_dir=run_dir, resume=resume)

    res = _run(go, resume=_RESUME_TRAIN)
    _echo_result(res)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder for the three bundles and metrics.")] = Path(
        "demo_out"
    ),
    overwrite: Annotated[
        bool, typer.Option("--overwrite", metavar="", help="Replace an existing demo output.")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train S1, S2 and fusion on the built-in synthetic scene (small preset, minutes on a laptop CPU)."""
    from stembed.demo import run_demo
    from stembed.runtime import tune_allocator

    tune_allocator()

    def go() -> Any:
        with _training_output(verbose):
            return run_demo(out, overwrite=overwrite)

    _run(go)


@app.command()
def info(
    bundle: Annotated[
        str | None, typer.Argument(help="A bundle.pt, or pretrained:NAME (a built-in bundle) to describe.")
    ] = None,
    preset: Annotated[str | None, typer.Option("--preset", help="Describe a named preset instead (paper, small).")] = None,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print JSON.")] = False,
) -> None:
    """Print a model's configuration and parameter counts per part; with no argument, list the built-in bundles."""
    from stembed.describe import describe_bundle, describe_preset, list_builtin

    if bundle is not None and preset is not None:
        typer.secho("error: give either a BUNDLE or --preset NAME, not both", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    if bundle is None and preset is None:
        report = list_builtin()
    else:
        report = _run(lambda: describe_bundle(bundle) if bundle is not None else describe_preset(str(preset)))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from stembed.describe import render

    render(report, sys.stdout)


class StorageDtype(StrEnum):
    """How ``stembed embed`` stores the embeddings."""

    float32 = "float32"
    float16 = "float16"
    int8 = "int8"


class Interpolation(StrEnum):
    """How ``stembed eval gpp`` fills days between observations."""

    linear = "linear"
    savgol = "savgol"


DailyOpt = Annotated[bool, typer.Option(
    "--daily", metavar="", help="Write every day from the first to the last S2 date, with a flag per value: observed, "
    "model_based (cloudy dates: gap-fill bundles and context fusions), linear or savgol (--set daily_fill=savgol).")]
EmbedFeaturesOpt = Annotated[int | None, typer.Option(
    "--features", metavar="K", help="Write only the first K features: one of a nested bundle's prefixes (`stembed "
    "info BUNDLE` lists them); default all.")]


@app.command()
def embed(
    cube: Annotated[Path, typer.Option("--cube", help="Scene store (zarr, S2 + S1) to embed.")],
    bundle: Annotated[Path, typer.Option("--bundle", help="Fusion (or gap-fill) bundle.pt.")],
    out: Annotated[Path, typer.Option("--out", help="Output embedding store (zarr).")],
    workers: Annotated[int | None, typer.Option("--workers", help="Local dask worker processes (default 1).")] = None,
    scheduler: Annotated[
        str | None, typer.Option("--scheduler", help="Address of a running dask scheduler (instead of --workers).")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", metavar="", help="Finish an interrupted run (or check a finished one)."),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", metavar="", help="Replace an existing embedding store.")
    ] = False,
    dtype: Annotated[
        StorageDtype | None,
        typer.Option("--dtype", help="Storage (default float32); float16/int8 use CF scale/offset."),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML EmbedConfig (tile_px, batch_size, ...).")] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    daily: DailyOpt = False,
    features: EmbedFeaturesOpt = None,
    extend: Annotated[bool, typer.Option(
        "--extend", metavar="", help="Grow the complete store OUT with the dates CUBE gained (`stembed cube --extend`); "
        "only old pixel-dates whose inputs changed are recomputed. Rerun it to finish an interrupted one.")] = False,
) -> None:
    """Embed every pixel and valid S2 date of a scene store, tile by tile on dask, into a zarr store."""
    from stembed.api import embed_store
    from stembed.runtime import tune_allocator

    def go() -> Any:
        # the options given win over --set (and --set over --config), as in the Python API's keyword settings
        given = {"workers": workers, "dtype": None if dtype is None else dtype.value, "daily": daily or None,
                 "features": features}
        return embed_store(
            cube, bundle, out, config=config, overrides=set_ or [], resume=resume, overwrite=overwrite,
            scheduler=scheduler, progress=not quiet, extend=extend, **{k: v for k, v in given.items() if v is not None},
        )

    tune_allocator()
    res = _run(go, resume=_RESUME_EMBED_EXTEND if extend else _RESUME_EMBED)
    for note in res.notes:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    if res.dates_added is not None:
        _echo_extension(res, cube)
        return
    if res.tiles_written == 0:
        typer.echo(f"{res.out} is complete ({res.tiles_skipped} tiles); nothing to write")
        return
    err = res.storage_error
    typer.echo(
        f"embeddings: {res.out} ({res.tiles_written} tiles written, {res.tiles_skipped} already done, "
        f"{res.seconds:.1f} s; {err['dtype']} storage, max abs error {max(err['max_abs']):.3g})"
    )


def _echo_extension(res: Any, cube: Path) -> None:
    """What ``stembed embed --extend`` did, in one line."""
    if res.dates_added == 0:
        typer.echo(f"{res.out}: {cube} has no date after the store's last; nothing written (0 dates added)")
        return
    typer.echo(
        f"embeddings: {res.out} extended by {res.dates_added} dates ({res.pixel_dates_recomputed} old pixel-dates "
        f"recomputed, {res.tiles_written} tiles written, {res.tiles_skipped} already done, {res.seconds:.1f} s)"
    )


# ----------------------------------------------------------------------------- cube
class S1Orbit(StrEnum):
    """Which Sentinel-1 passes ``stembed cube`` reads."""

    auto = "auto"
    ascending = "ascending"
    descending = "descending"
    both = "both"


CubeConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML CubeConfig: the settings every store "
                          "shares (configs/cube.yaml); the options below win over it.")]
CubeOutOpt = Annotated[Path | None, typer.Option("--out", help="Output scene store (zarr): S2 + S1 cubes on one grid.")]
StartOpt = Annotated[str | None, typer.Option("--start", help="First day, YYYY-MM-DD (with --sites: of rows without one).")]
EndOpt = Annotated[
    str | None, typer.Option("--end", help="Last day, YYYY-MM-DD, inclusive (with --sites: of rows without one).")
]
SitesOpt = Annotated[Path | None, typer.Option(
    "--sites", help="CSV table, one store per row: column site, and lon,lat,size_m or west,south,east,north; "
    "optional start,end. Instead of --out/--bbox/--point/--site; needs --out-dir.")]
SitesOutDirOpt = Annotated[
    Path | None, typer.Option("--out-dir", help="With --sites: folder of the stores DIR/<site>.zarr and the report.")
]
SitesWorkersOpt = Annotated[
    int | None, typer.Option("--workers", help="With --sites: local dask worker processes (default: sites, max 4).")
]
SitesSchedulerOpt = Annotated[
    str | None, typer.Option("--scheduler", help="With --sites: a running dask scheduler's address (not --workers).")
]
BBoxOpt = Annotated[
    tuple[float, float, float, float] | None, typer.Option("--bbox", metavar="W S E N", help="Area as lon/lat W S E N.")
]
PointOpt = Annotated[tuple[float, float] | None, typer.Option("--point", metavar="LON LAT", help="Centre as LON LAT.")]
SizeOpt = Annotated[float | None, typer.Option("--size-m", help="Side of the square around --point, metres.")]
SiteOpt = Annotated[str | None, typer.Option("--site", help="Site id stored in the cube (default: --out's stem).")]
# the CubeConfig settings: None = not given (the config's value, whose default the help names)
CatalogOpt = Annotated[
    str | None, typer.Option("--catalog", help="STAC API root (default: Planetary Computer, signed).")
]
S2CollectionOpt = Annotated[str | None, typer.Option(
    "--s2-collection", help="Sentinel-2 L2A collection (default: sentinel-2-l2a).")]
S1CollectionOpt = Annotated[str | None, typer.Option(
    "--s1-collection", help="Sentinel-1 RTC collection (default: sentinel-1-rtc).")]
CloudMaskOpt = Annotated[str | None, typer.Option(
    "--cloud-mask", help="'scl', or 'module:Factory' building a stembed CloudMask, a model (default: scl).")]
SCLClassesOpt = Annotated[
    str | None, typer.Option("--scl-classes", help="SCL classes masked, comma-separated (default: 0,1,3,8,9,10).")
]
NoBRDFOpt = Annotated[
    bool, typer.Option("--no-brdf", metavar="", help="Skip the BRDF nadir normalisation (config: brdf: false).")
]
MinValidOpt = Annotated[float | None, typer.Option(
    "--min-valid-fraction", help="Keep an S2 date with at least this share valid (default: 0.03).")]
MinDatesOpt = Annotated[
    int | None, typer.Option("--min-dates", help="Fewest S2 dates the cube may have (default: 6).")
]
S1OrbitOpt = Annotated[
    S1Orbit | None, typer.Option("--s1-orbit", help="Sentinel-1 passes to read (default: auto).")
]
S1GapOpt = Annotated[float | None, typer.Option(
    "--s1-max-gap-days", help="S1-S2 matching tolerance, checked and recorded (default: 6.0).")]
PieceMonthsOpt = Annotated[
    int | None, typer.Option("--piece-months", help="Fetch in pieces of this many months (default: 12).")
]
RetriesOpt = Annotated[int | None, typer.Option("--retries", help="HTTP retries, exponential backoff (default: 5).")]
CubeOverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", metavar="", help="Replace --out (and discard a different staged build).")
]
_RESUME_SITES = "finished sites and pieces are kept: rerun the same command to build the rest"
CubeExtendOpt = Annotated[Path | None, typer.Option(
    "--extend", metavar="STORE", help="Grow this scene store: append the dates after its last one up to --end with "
    "the settings it records (settings given must equal them, --retries and --piece-months aside; area, --start and "
    "output options are refused). Dates it holds are never rewritten; resumable, and a killed run is finished by "
    "rerunning it.")]
_RESUME_EXTEND = "rerun the same command to finish the extension (a store left mid-extension is refused until then)"


@app.command()
def cube(
    out: CubeOutOpt = None, start: StartOpt = None, end: EndOpt = None, sites: SitesOpt = None,
    out_dir: SitesOutDirOpt = None, workers: SitesWorkersOpt = None, scheduler: SitesSchedulerOpt = None,
    bbox: BBoxOpt = None, point: PointOpt = None, size_m: SizeOpt = None, site: SiteOpt = None,
    config: CubeConfigOpt = None, set_: SetOpt = None, catalog: CatalogOpt = None,
    s2_collection: S2CollectionOpt = None, s1_collection: S1CollectionOpt = None, cloud_mask: CloudMaskOpt = None,
    scl_classes: SCLClassesOpt = None, no_brdf: NoBRDFOpt = False, min_valid_fraction: MinValidOpt = None,
    min_dates: MinDatesOpt = None, s1_orbit: S1OrbitOpt = None, s1_max_gap_days: S1GapOpt = None,
    piece_months: PieceMonthsOpt = None, retries: RetriesOpt = None, overwrite: CubeOverwriteOpt = False,
    quiet: QuietOpt = False, extend: CubeExtendOpt = None,
) -> None:
    """Build an S2 L2A + S1 RTC scene store from a STAC API (cloud mask, BRDF, S1 smoothing); resumable.

    With --sites, one store per row of a CSV table, in parallel on dask; a failed site is reported at the
    end (and in OUT_DIR/sites_report.csv, exit status 1) without stopping the others.

    With --extend STORE --end NEW_DATE, the store grows by its new dates (append-only), with the settings it records.

    The settings every store shares (catalog to retries) are a CubeConfig: the options given win over --set,
    --set over --config, --config over the defaults.
    """
    from stembed.cube_build import build_area, build_sites_table, cube_settings

    given = {"catalog": catalog, "s2_collection": s2_collection, "s1_collection": s1_collection,
             "cloud_mask": cloud_mask, "brdf": False if no_brdf else None, "min_valid_fraction": min_valid_fraction,
             "min_dates": min_dates, "s1_orbit": None if s1_orbit is None else s1_orbit.value,
             "s1_max_gap_days": s1_max_gap_days, "piece_months": piece_months, "retries": retries}

    def settings() -> Any:
        return cube_settings(config, {**given, "scl_classes": _scl_classes(scl_classes)}, set_ or [])

    if extend is not None:
        _cube_extend(extend, end, settings, quiet, (("--out", out), ("--start", start), ("--sites", sites),
                     ("--out-dir", out_dir), ("--workers", workers), ("--scheduler", scheduler), ("--bbox", bbox),
                     ("--point", point), ("--size-m", size_m), ("--site", site), ("--overwrite", overwrite or None)))
        return
    if sites is not None:
        _refuse_given((("--out", out), ("--bbox", bbox), ("--point", point), ("--size-m", size_m), ("--site", site)),
                      "--sites takes each site's area and id from its table, so {} cannot go with it; fix: drop "
                      "them (the stores go to --out-dir DIR as DIR/<site>.zarr)")
        if out_dir is None:
            raise _fail("--sites needs --out-dir DIR (the stores are DIR/<site>.zarr); fix: add it")
        run = _run(lambda: build_sites_table(sites, out_dir, settings(), start=start, end=end, overwrite=overwrite,
                                             workers=workers, scheduler=scheduler,
                                             on_done=None if quiet else _echo_site), resume=_RESUME_SITES)
        _echo_sites(run)
        return
    _refuse_given((("--out-dir", out_dir), ("--workers", workers), ("--scheduler", scheduler)),
                  "{} go with --sites; fix: add --sites TABLE.csv or drop it")
    if out is None or start is None or end is None:
        missing = [n for n, v in (("--out", out), ("--start", start), ("--end", end)) if v is None]
        raise _fail(f"missing {', '.join(missing)}; fix: pass --out STORE.zarr --start YYYY-MM-DD --end "
                    "YYYY-MM-DD (or --sites TABLE.csv --out-dir DIR for many sites)")
    res = _run(lambda: build_area(settings(), out, start=start, end=end, bbox=bbox, point=point, size_m=size_m,
                                  site=site, overwrite=overwrite, progress=not quiet, echo=typer.echo),
               resume=_RESUME_CUBE)
    typer.echo(
        f"scene store: {res.path} ({res.s2_dates} S2 dates, {res.s1_dates} S1 dates ({res.s1_orbit}), "
        f"{res.s2_dates_with_s1} S2 dates with S1 within {res.s1_max_gap_days:g} days)"
    )


def _cube_extend(
    store: Path, end: str | None, settings: Callable[[], Any], quiet: bool, refused: tuple[tuple[str, Any], ...]
) -> None:
    """``cube --extend STORE --end NEW_DATE``: the area, period start and output come from the store."""
    from stembed.cube_build import extend_store

    _refuse_given(refused, "--extend takes the area, site, start and output from the store, so {} cannot go with "
                  "it; fix: drop them (settings options may stay if they equal the store's)")
    if end is None:
        raise _fail("--extend needs --end NEW_DATE, the new last day (after the store's end); fix: add it")
    res = _run(lambda: extend_store(store, end, config=settings(), progress=not quiet, echo=typer.echo),
               resume=_RESUME_EXTEND)
    for note in res.notes:
        typer.echo(f"note: {note}")
    typer.echo(res.summary())


def _refuse_given(options: tuple[tuple[str, Any], ...], message: str) -> None:
    """Exit with ``message`` (its ``{}``: the options given) if any of ``options`` was given."""
    given = [name for name, value in options if value is not None]
    if given:
        raise _fail(message.format(", ".join(given)))


def _scl_classes(text: str | None) -> list[int] | None:
    """``--scl-classes 0,1,3`` as a list of classes."""
    from stembed.cube_build import CubeBuildError

    try:
        return None if text is None else [int(c) for c in text.split(",") if c.strip()]
    except ValueError as e:
        raise CubeBuildError(f"--scl-classes {text!r} is not a comma-separated list of integers") from e


def _echo_site(outcome: Any) -> None:
    """One line as a site of ``cube --sites`` ends."""
    if outcome.failed:
        typer.secho(f"{outcome.site}: failed: {outcome.error}", fg=typer.colors.RED, err=True)
    elif outcome.status == "built":
        typer.echo(
            f"{outcome.site}: built {outcome.path} ({outcome.s2_dates} S2 dates, {outcome.s1_dates} S1 "
            f"dates, {outcome.seconds:.1f} s)"
        )
    else:
        typer.echo(f"{outcome.site}: {outcome.status} ({outcome.path})")


def _echo_sites(run: Any) -> None:
    """The summary of ``cube --sites``: a table, the tracebacks of bugs, the counts; exit status 1 if a site failed."""
    from stembed.io.sites import summary_lines

    for line in summary_lines(run.outcomes):
        typer.echo(line)
    for o in run.outcomes:
        if o.traceback:  # an unexpected error is a bug: show where it happened
            typer.secho(f"{o.site}: unexpected error (a bug, please report it):\n{o.traceback}", err=True)
    failed = run.failed
    typer.echo(
        f"{run.count('built')} built, {run.count('already built')} already built, {len(failed)} failed of "
        f"{len(run.outcomes)} sites; report: {run.report}"
    )
    if failed:
        typer.secho(
            f"{len(failed)} site(s) failed: {', '.join(o.site for o in failed)}; fix the cause named above, "
            "then rerun the same command (built sites are skipped, unfinished ones resume)",
            fg=typer.colors.RED, err=True,
        )
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- products of an embedding store
EmbeddingsOpt = Annotated[
    Path, typer.Option("--embeddings", help="Embedding store (zarr) from `stembed embed`.")
]
DatesOpt = Annotated[
    list[str] | None,
    typer.Option("--dates", metavar="YYYY-MM-DD", help="ISO date to use, e.g. 2021-06-03 (repeatable)."),
]
FeaturesOpt = Annotated[
    int | None,
    typer.Option("--features", metavar="K", help="Use only the first K features: one of the store's nested sizes "
                 "(`stembed info BUNDLE`; default all)."),
]


@app.command()
def pca(
    embeddings: EmbeddingsOpt,
    cube: Annotated[Path, typer.Option("--cube", help="Scene store (zarr) the embeddings were made from.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the PNGs and pca.json.")],
    dates: DatesOpt = None,
    samples: Annotated[int, typer.Option("--samples", help="Pixel-dates sampled to fit the PCA.")] = 100_000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample.")] = 0,
    features: FeaturesOpt = None,
) -> None:
    """Map PCA components 1-3 of the embeddings to RGB, beside the S2 true colour (default: 4 best dates)."""
    from stembed.eval.pca import pca_maps
    from stembed.io.cube import open_scene
    from stembed.io.embeddings import open_embeddings
    from stembed.io.outputs import check_output_folder

    def go() -> Any:
        check_output_folder(out)
        return pca_maps(
            open_embeddings(embeddings, features=features), open_scene(cube, check_values=False).s2, dates=dates,
            out_dir=out,
            n_samples=samples, seed=seed,
        )

    res = _run_into(out, go)
    typer.echo("\n".join([*(f"map: {p}" for p in res["pngs"]), f"pca: {res['json']}"]))


@app.command()
def sample(
    embeddings: EmbeddingsOpt,
    points: Annotated[Path, typer.Option("--points", help="CSV: lon,lat (WGS84) or x,y, optional id.")],
    out: Annotated[Path, typer.Option("--out", help="Output table, .csv or .parquet.")],
    window_px: Annotated[int, typer.Option("--window-px", help="Odd window side K: mean over K x K px.")] = 1,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", metavar="", help="Replace an existing table.")
    ] = False,
    features: FeaturesOpt = None,
) -> None:
    """Sample the embeddings at points: one row per point and date (window mean over valid pixels)."""
    from stembed.io.embeddings import open_embeddings
    from stembed.io.outputs import check_file_output, lock_output
    from stembed.io.sample import read_points, sample_points, write_table

    def go() -> Path:
        with lock_output(out, command="sample"):
            check_file_output(out, overwrite=overwrite, what="table")
            table = sample_points(open_embeddings(embeddings, features=features), read_points(points),
                                  window_px=window_px)
            return write_table(table, out)

    path = _run(go)
    typer.echo(f"table: {path}")


class ExportFormat(StrEnum):
    """What ``stembed export`` writes."""

    geotiff = "geotiff"
    netcdf = "netcdf"


@app.command()
def export(
    embeddings: EmbeddingsOpt,
    out: Annotated[
        Path, typer.Option("--out", help="geotiff: output folder (one file per date); netcdf: the .nc file.")
    ],
    dates: DatesOpt = None,
    fmt: Annotated[
        ExportFormat,
        typer.Option("--format", help="geotiff (a file per date, a band per feature) or netcdf (one CF file, "
                     "GDAL/QGIS)."),
    ] = ExportFormat.geotiff,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", metavar="", help="Replace existing output files.")
    ] = False,
    features: FeaturesOpt = None,
) -> None:
    """Write the embeddings for GIS tools: a float32 GeoTIFF per date (a band per feature), or one CF netCDF file."""
    from stembed.io.embeddings import open_embeddings
    from stembed.io.export import export_geotiffs, export_netcdf
    from stembed.io.outputs import check_file_output, check_output_folder, lock_output

    if fmt is ExportFormat.netcdf:

        def go_nc() -> Path:
            with lock_output(out, command="export"):
                check_file_output(out, overwrite=overwrite, what="netCDF file")
                return export_netcdf(open_embeddings(embeddings, features=features), out, dates=dates,
                                     overwrite=overwrite)

        typer.echo(f"netCDF: {_run(go_nc)}")
        return

    def go() -> Any:
        with lock_output(out, command="export"):
            check_output_folder(out)
            return export_geotiffs(open_embeddings(embeddings, features=features), out, dates=dates,
                                   overwrite=overwrite)

    files = _run_into(out, go)
    typer.echo(f"{len(files)} GeoTIFF(s) in {out}")


# ----------------------------------------------------------------------------- evaluation
eval_app = typer.Typer(
    no_args_is_help=True, help="Evaluate: reconstruction, land-cover probe, GPP at a tower, cloudy-date fills."
)
app.add_typer(eval_app, name="eval")
CubeOpt = Annotated[Path, typer.Option("--cube", help="Scene store (zarr) the embeddings were made from.")]
OutDirOpt = Annotated[Path, typer.Option("--out", help="Output folder.")]
TowerOpt = Annotated[
    tuple[float, float] | None, typer.Option("--tower", metavar="LON LAT", help="Flux tower LON LAT (WGS84).")
]
YearsOpt = Annotated[
    list[int] | None,
    typer.Option(metavar="YEAR", help="Years (of a window's last day), repeatable; omit train and val years "
                 "to adapt them to the cube (the latest year validates, the earlier ones train)."),
]


@eval_app.command("recon")
def eval_recon(
    out: OutDirOpt,
    runs: Annotated[
        list[Path] | None, typer.Argument(help="Run folders of `stembed train` (each holds metrics.json).")
    ] = None,
    bundle: Annotated[
        str | None,
        typer.Option("--bundle", help="Instead of runs: score this autoencoder or fusion bundle on --cube stores."),
    ] = None,
    cubes: Annotated[
        list[Path] | None, typer.Option("--cube", help="Scene store to score --bundle on (repeatable).")
    ] = None,
    spatial_stride: Annotated[
        int | None, typer.Option("--spatial-stride", help="Patch centres every N px (default: the bundle's).")
    ] = None,
) -> None:
    """Centre-pixel MAE, SAM and SSIM per run, split and sensor (or of --bundle on --cube stores), against
    the trivial baselines."""
    from stembed.eval.recon import ReconError, ReconResult, recon_table
    from stembed.io.outputs import check_output_folder

    def go() -> Any:
        if bundle is not None:
            if runs or not cubes:
                raise ReconError("--bundle scores a bundle on scene stores: give one or more --cube and no run folders")
            if spatial_stride is not None and spatial_stride < 1:
                raise ReconError(f"--spatial-stride must be >= 1, got {spatial_stride}")
            check_output_folder(out)
            from stembed.eval.recon_bundle import bundle_recon

            return bundle_recon(bundle, list(cubes), spatial_stride=spatial_stride)
        if not runs or cubes:
            raise ReconError("give run folders of `stembed train`, or --bundle with --cube stores")
        check_output_folder(out)
        return recon_table(list(runs))

    res = ReconResult(_run(go))
    typer.echo(res.markdown() + f"\ntable: {res.save(out)}")


StepDaysOpt = Annotated[
    int | None, typer.Option("--step-days", metavar="DAYS", help="Days between the cut-offs of --by-date (default 15).")
]


def _curve_step(by_date: bool, step_days: int | None) -> int | None:
    """The days between cut-offs of ``eval probe --by-date`` (None without it); refused before any reading."""
    from stembed.eval.probe import ProbeError
    from stembed.eval.probe_curve import STEP_DAYS, check_step_days

    if not by_date:
        if step_days is not None:
            raise ProbeError("--step-days sets the cut-offs of --by-date; fix: add --by-date, or drop --step-days")
        return None
    step = STEP_DAYS if step_days is None else step_days
    check_step_days(step)
    return step


@eval_app.command("probe")
def eval_probe(
    embeddings: EmbeddingsOpt,
    cube: CubeOpt,
    label: Annotated[str, typer.Option("--label", help="Label layer of the scene, e.g. LC or CT.")],
    out: OutDirOpt,
    nodata: Annotated[
        list[int] | None,
        typer.Option("--nodata", metavar="VALUE", help="Label values to ignore (default 0)."),
    ] = None,
    block_px: Annotated[int, typer.Option("--block-px", help="Spatial CV block edge in pixels.")] = 16,
    folds: Annotated[int, typer.Option("--folds", help="Cross-validation folds.")] = 4,
    samples: Annotated[int, typer.Option("--samples", help="Pixel-dates sampled.")] = 20000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    features: Annotated[
        list[int] | None,
        typer.Option("--features", metavar="K", help="Probe the embedding's first K features and K-sized baselines "
                     "(repeatable; default: the store's nested prefixes, else all features)."),
    ] = None,
    region: Annotated[
        str | None,
        typer.Option("--region", metavar="Y0:Y1,X0:X1", help="Probe only this pixel box of the store's grid "
                     "(ends excluded), e.g. a held-out block 32:64,32:64."),
    ] = None,
    jobs: Annotated[int, typer.Option("--jobs", help="Random-forest threads (-1: all cores).")] = 1,
    by_date: Annotated[
        bool,
        typer.Option("--by-date", metavar="", help="Early-season curve instead: the probe on the pixel-dates up to "
                     "each cut-off (embedding beside date_s2s1_pca, window_pca, to_date_pca, date_s2), "
                     "probe_<label>_by_date.csv/.png/.md."),
    ] = False,
    step_days: StepDaysOpt = None,
) -> None:
    """Logistic regression and random forest on embedding prefixes vs same-size baselines (the date's S2 and S1
    bands, the model's window, the pixel's season), spatially blocked CV; --by-date: by cut-off date."""
    from stembed.eval.probe import ProbeError, parse_region, probe_table
    from stembed.eval.probe_curve import probe_by_date
    from stembed.io.cube import open_scene
    from stembed.io.embeddings import open_embeddings
    from stembed.io.outputs import check_output_folder

    def go() -> Any:
        step = _curve_step(by_date, step_days)
        box = None if region is None else parse_region(region)
        check_output_folder(out)
        scene = open_scene(cube, check_values=False)
        if scene.labels is None:
            raise ProbeError(f"the scene {cube} has no label layers; fix: build it with labels (save_scene)")
        common: dict[str, Any] = {"label": label, "features": features, "region": box, "nodata": tuple(nodata or (0,)),
                                  "block_px": block_px, "n_folds": folds, "max_samples": samples, "seed": seed,
                                  "n_jobs": jobs}
        if step is not None:
            return probe_by_date(open_embeddings(embeddings), scene.s2, scene.labels, s1=scene.s1, step_days=step,
                                 **common)
        return probe_table(open_embeddings(embeddings), scene.s2, scene.labels, s1=scene.s1, **common)

    res = _run(go)
    saved = res.save(out)  # the curve: its files by suffix; the probe: the summary's path
    typer.echo(f"early-season curve of {label}: {saved['csv']}\nplot: {saved['png']}\nmarkdown: {saved['md']}"
               if by_date else res.markdown())


@eval_app.command("gapfill")
def eval_gapfill(
    cube: CubeOpt,
    bundle: Annotated[Path, typer.Option(
        "--bundle", help="Gap-fill bundle.pt (`stembed train gapfill`), or a context fusion bundle (it embeds a "
        "hidden date from its window).")],
    out: OutDirOpt,
    run_length: Annotated[
        list[int] | None,
        typer.Option("--run-length", metavar="DATES", help="Consecutive dates hidden per run (repeatable)."),
    ] = None,
    offsets: Annotated[int, typer.Option("--offsets", help="Schedules per run length (more hide more dates).")] = 2,
) -> None:
    """Hide clear S2 dates of the bundle's test blocks; error of each fill (model, linear, savgol) by gap length."""
    from stembed.eval.gapfill_run import evaluate_gap_fill
    from stembed.io.outputs import check_output_folder

    def go() -> Any:
        check_output_folder(out)
        return evaluate_gap_fill(cube, bundle, run_lengths=tuple(run_length or (1, 2, 4, 8)), offsets=offsets)

    res = _run(go)
    typer.echo(res.markdown + f"\ntable: {res.save(out)}")


@eval_app.command("gpp")
def eval_gpp(
    out: OutDirOpt,
    embeddings: Annotated[
        Path | None, typer.Option("--embeddings", help="Embedding store (zarr) from `stembed embed`.")
    ] = None,
    cube: Annotated[Path | None, typer.Option("--cube", help="Scene store (zarr) the embeddings were made from.")] = None,
    flux: Annotated[Path | None, typer.Option("--flux", help="FLUXNET daily CSV (FULLSET_DD or FluxDataKit).")] = None,
    towers: Annotated[
        Path | None,
        typer.Option("--towers", help="CSV of towers (site,embeddings,cube,flux,lon,lat; paths relative to it): "
                     "leave-one-site-out, instead of --embeddings/--cube/--flux."),
    ] = None,
    tower: TowerOpt = None,
    whole_cube: Annotated[
        bool,
        typer.Option("--whole-cube", metavar="", help="Average the whole cube (the authors' footprint)."),
    ] = False,
    window_px: Annotated[int, typer.Option("--window-px", help="Odd window around the tower, pixels.")] = 15,
    train_years: YearsOpt = None,
    val_years: YearsOpt = None,
    test_years: YearsOpt = None,
    stride: Annotated[int, typer.Option("--stride", help="Days between window ends.")] = 10,
    interpolation: Annotated[
        Interpolation, typer.Option("--interpolation", help="How days between observations are filled.")
    ] = Interpolation.linear,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Max transformer epochs (default 150).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """GPP from embeddings, raw bands and NDVI at one tower (or several, each held out in turn): transformer,
    ridge and climatology."""
    from stembed.eval.gpp_run import evaluate_gpp

    res = _run_into(out, lambda: evaluate_gpp(
        out, embeddings=embeddings, cube=cube, flux=flux, towers=towers, tower_lonlat=tower, whole_cube=whole_cube,
        window_px=window_px, train_years=train_years, val_years=val_years, test_years=test_years,
        interpolation=interpolation.value, stride_days=stride, max_epochs=epochs, seed=seed,
    ))
    split = res.split
    if split is None:
        held: dict[str, Any] = res.split_info or {}
        stop = (f"validation years {held['val_years']} of the training towers stop it early" if held["early_stopping"]
                else f"no --val-years, so the transformer trains all {held['max_epochs']} epochs")
        typer.echo(f"{res.n_windows} windows at {len(held['sites'])} towers, each scored by models fitted on the "
                   f"others (leave-one-site-out; {stop})\nmetrics: {res.metrics_csv}\npredictions: "
                   f"{res.predictions_csv}")
        return
    typer.echo(
        f"{res.n_windows} windows (train years {list(split.train_years)}, validation {list(split.val_years)}"
        + (f", test {list(split.test_years)}" if split.test_years else "")
        + f"; {res.n_dropped_overlap} held-out windows dropped: their days overlap training windows)\n"
        f"metrics: {res.metrics_csv}\npredictions: {res.predictions_csv}"
    )


@app.command()
def report(
    out: OutDirOpt,
    runs: Annotated[
        list[Path] | None,
        typer.Option("--run", metavar="RUN_DIR", help="A `stembed train` run folder (repeatable)."),
    ] = None,
    embeddings: Annotated[Path | None, typer.Option("--embeddings", help="Embedding store.")] = None,
    cube: Annotated[Path | None, typer.Option("--cube", help="Its scene store.")] = None,
    labels: Annotated[
        list[str] | None, typer.Option("--label", metavar="NAME", help="Label layer to probe (repeatable).")
    ] = None,
    flux: Annotated[Path | None, typer.Option("--flux", help="FLUXNET daily CSV for the GPP part.")] = None,
    tower: TowerOpt = None,
    train_years: YearsOpt = None,
    val_years: YearsOpt = None,
    test_years: YearsOpt = None,
    stride: Annotated[int, typer.Option("--stride", help="GPP: days between window ends.")] = 10,
    epochs: Annotated[int | None, typer.Option("--epochs", help="GPP: max transformer epochs.")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Probe: pixel-dates sampled.")] = 20000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    gapfill_bundle: Annotated[
        Path | None, typer.Option("--gapfill-bundle", help="Gap-fill bundle: score cloudy-date fills on --cube.")
    ] = None,
    by_date: Annotated[
        bool, typer.Option("--by-date", metavar="", help="Also each --label's early-season curve (eval probe --by-date).")
    ] = False,
    step_days: StepDaysOpt = None,
) -> None:
    """One markdown page (with figures) of the reconstruction, probe, early-season curve, GPP and cloudy-date fill
    results."""
    from stembed.eval.gpp import GPPConfig
    from stembed.eval.gpp_run import year_split
    from stembed.eval.report import ReportInputs, write_report
    from stembed.io.outputs import check_output_folder

    def go() -> Any:
        inputs = ReportInputs(
            runs=list(runs or []), embeddings=embeddings, cube=cube, labels=tuple(labels or ()), flux=flux,
            tower_lonlat=tower, gpp_split=year_split(train_years, val_years, test_years),
            gpp_config=GPPConfig() if epochs is None else GPPConfig(max_epochs=epochs),
            gpp_stride_days=stride, probe_samples=samples, seed=seed, gapfill_bundle=gapfill_bundle,
            curve_step_days=_curve_step(by_date, step_days),
        )
        check_output_folder(out)
        return write_report(out, inputs)

    path = _run_into(out, go)
    typer.echo(f"report: {path}")


if __name__ == "__main__":  # pragma: no cover
    app()
