"""``stembed report``: reconstruction, probe and GPP results gathered into one markdown page with figures.

Each part runs only when its inputs are given, and the page says what was run on what. When the
flux tower lies outside the embedded cube, GPP is regressed on the whole-cube mean and the page
says plainly that this checks the harness, not the embeddings' skill at that tower.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyproj
import xarray as xr

from stembed.errors import UserError
from stembed.eval.gpp import GPPConfig, YearSplit
from stembed.types import X, Y


class ReportError(UserError):
    """A report request that cannot be carried out; the message names the fix."""


@dataclass(frozen=True)
class ReportInputs:
    """What the report is built from; every part is optional."""

    runs: list[Path] = field(default_factory=list)
    embeddings: Path | None = None
    cube: Path | None = None
    labels: tuple[str, ...] = ()
    flux: Path | None = None
    tower_lonlat: tuple[float, float] | None = None
    gpp_split: YearSplit | None = None  # None: years adapt to the cube (stembed.eval.gpp_run.resolve_split)
    gpp_config: GPPConfig = field(default_factory=GPPConfig)
    gpp_stride_days: int = 10
    probe_samples: int = 20000
    curve_step_days: int | None = None  # each label's early-season curve too, cut-offs this many days apart
    seed: int = 0
    gapfill_bundle: Path | None = None  # a gap-fill bundle: the cloudy-date fill experiment on ``cube``
    gapfill_run_lengths: tuple[int, ...] = (1, 3, 6)
    gapfill_offsets: int = 1


# WorldCereal LC 99 means "unknown": a probe must not learn it as a class
NODATA = {"LC": (0, 99)}


def _tower_inside(embeddings: xr.Dataset, lonlat: tuple[float, float]) -> bool:
    x, y = pyproj.Transformer.from_crs("EPSG:4326", embeddings.attrs["crs"], always_xy=True).transform(
        *lonlat
    )
    xs, ys = embeddings[X].values, embeddings[Y].values
    return bool(xs.min() - 5 <= x <= xs.max() + 5 and ys.min() - 5 <= y <= ys.max() + 5)


def write_report(out: str | Path, inputs: ReportInputs) -> Path:
    """Run the parts whose inputs are given into ``out`` and write ``out/report.md``; return its path."""
    _check_inputs(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    page = ["# stembed evaluation report", ""]
    if inputs.runs:
        page += _recon_section(inputs, out)
    if inputs.embeddings is not None and inputs.cube is not None:
        page += _embedding_sections(inputs, out)
    if inputs.gapfill_bundle is not None and inputs.cube is not None:
        page += _gapfill_section(inputs, out)
    path = out / "report.md"
    path.write_text("\n".join(page))
    return path


def _check_inputs(inputs: ReportInputs) -> None:
    """Refuse a request whose parts lack what they read, or that asks for nothing."""
    needs_store = [f for f, v in (("--label", inputs.labels), ("--flux", inputs.flux)) if v]
    if needs_store and (inputs.embeddings is None or inputs.cube is None):
        raise ReportError(f"{' and '.join(needs_store)} need an embedding store and its scene; fix: pass --embeddings and --cube")
    if inputs.embeddings is not None and inputs.cube is None:  # else the report would be a title only
        raise ReportError("--embeddings are reported beside their scene; fix: pass its --cube")
    if inputs.gapfill_bundle is not None and inputs.cube is None:
        raise ReportError("--gapfill-bundle hides dates of a scene; fix: pass its --cube")
    if inputs.curve_step_days is not None and not inputs.labels:
        raise ReportError("--by-date draws each --label's early-season curve; fix: add --label NAME, or drop --by-date")
    if not inputs.runs and inputs.embeddings is None and inputs.gapfill_bundle is None:
        raise ReportError(
            "nothing to report; fix: pass --run RUN_DIR, --embeddings with --cube, and/or --gapfill-bundle with --cube"
        )


def _recon_section(inputs: ReportInputs, out: Path) -> list[str]:
    from stembed.eval.recon import ReconResult, recon_table

    recon = ReconResult(recon_table(inputs.runs))
    recon.save(out)
    return [
        "## Reconstruction (test split, centre pixel)",
        "",
        "Model vs the two trivial baselines on the same observed centre values (`recon.csv` has "
        "every split).",
        "",
        recon.markdown(),
        "",
    ]


def _embedding_sections(inputs: ReportInputs, out: Path) -> list[str]:
    """What the embedding store is, then a probe per label and the GPP regression (when asked)."""
    from stembed.eval.probe import probe_table
    from stembed.io.cube import open_scene
    from stembed.io.embeddings import open_embeddings

    assert inputs.embeddings is not None and inputs.cube is not None  # checked by the caller
    ds = open_embeddings(inputs.embeddings)
    scene = open_scene(inputs.cube, check_values=False)
    page = [
        f"Embeddings: `{inputs.embeddings}` (site {ds.attrs.get('input', {}).get('site')}, "
        f"bundle sha256 {ds.attrs.get('bundle', {}).get('sha256', '?')[:12]}).",
        "",
    ]
    for label in inputs.labels:
        if scene.labels is None or label not in scene.labels:
            raise ReportError(f"the scene {inputs.cube} has no label layer {label!r}; fix: drop --label {label}")
        res = probe_table(
            ds,
            scene.s2,
            scene.labels,
            label=label,
            s1=scene.s1,
            nodata=NODATA.get(label, 0),
            max_samples=inputs.probe_samples,
            seed=inputs.seed,
        )
        res.save(out)
        page += [f"## Probe: {label}", "", res.markdown(), ""]
        if inputs.curve_step_days is not None:
            page += _curve_section(inputs, ds, scene.s2, scene.s1, scene.labels, label, out)
    if inputs.flux is not None:
        page += _gpp_section(inputs, ds, scene.s2, out)
    return page


def _curve_section(
    inputs: ReportInputs, ds: xr.Dataset, s2: xr.DataArray, s1: xr.DataArray | None, labels: xr.Dataset, label: str,
    out: Path,
) -> list[str]:
    """The label's early-season curve (:func:`~stembed.eval.probe_curve.probe_by_date`), same samples and seed as
    its probe; its files beside the probe's, its plot linked from the page."""
    from stembed.eval.probe_curve import probe_by_date

    assert inputs.curve_step_days is not None  # checked by the caller
    res = probe_by_date(ds, s2, labels, s1=s1, label=label, step_days=inputs.curve_step_days,
                        nodata=NODATA.get(label, 0), max_samples=inputs.probe_samples, seed=inputs.seed)
    res.save(out)
    return [f"## Early-season curve: {label}", "", res.markdown(), ""]


def _gpp_section(inputs: ReportInputs, ds: xr.Dataset, s2: xr.DataArray, out: Path) -> list[str]:
    from stembed.eval.gpp_run import gpp_at_tower

    assert inputs.flux is not None  # checked by the caller
    inside = inputs.tower_lonlat is not None and _tower_inside(ds, inputs.tower_lonlat)
    run = gpp_at_tower(
        ds,
        s2,
        inputs.flux,
        out / "gpp",
        tower_lonlat=inputs.tower_lonlat if inside else None,
        split=inputs.gpp_split,
        stride_days=inputs.gpp_stride_days,
        cfg=inputs.gpp_config,
        seed=inputs.seed,
    )
    page = ["## GPP", ""]
    if not inside:
        page += [
            "**This run checks the harness, not the skill:** the flux tower is not inside the "
            "embedded cube, so the features are whole-cube means of another place. The numbers "
            "below show that the pipeline runs end to end; they say nothing about how well "
            "the embeddings predict GPP.",
            "",
        ]
    pooled = run.metrics[run.metrics["site"] == "pooled"].drop(columns="site")
    page += [
        f"{run.n_windows} windows of {inputs.gpp_config.window_days} days, stride "
        f"{inputs.gpp_stride_days}; {run.split} ({run.n_dropped_overlap} held-out windows dropped: "
        f"their days overlap training windows). Pooled over sites (per-site rows in "
        "`gpp/gpp_metrics.csv`); train rows are in-sample.",
        "",
        _markdown(pooled),
        "",
    ]
    return page + [f"![{p.stem}](gpp/{p.name})" for p in run.plots] + [""]


def _gapfill_section(inputs: ReportInputs, out: Path) -> list[str]:
    from stembed.eval.gapfill_run import evaluate_gap_fill

    assert inputs.gapfill_bundle is not None and inputs.cube is not None  # checked by the caller
    gf = evaluate_gap_fill(
        inputs.cube, inputs.gapfill_bundle, run_lengths=inputs.gapfill_run_lengths, offsets=inputs.gapfill_offsets
    )
    gf.save(out)
    return [
        "## Cloudy dates: error of each fill against the true embedding",
        "",
        f"Whole clear S2 dates of the test blocks {gf.info['regions']} hidden in runs of "
        f"{list(inputs.gapfill_run_lengths)} consecutive dates ({gf.info['n_experiments']} schedules); each "
        "hidden pixel-date filled by the gap-fill layers (`model_based`), the fusion model untrained for it "
        "(`zero_shot`), and linear / Savitzky-Golay interpolation of the remaining dates. MAE over the "
        "embedding's features; rows by the length of the gap (days between the known dates around it). "
        "`gapfill.csv` has RMSE and the MAE relative to the embedding's spread.",
        "",
        gf.markdown,
        "",
    ]


def _markdown(df: pd.DataFrame) -> str:
    """A DataFrame as a markdown table, floats to 3 significant digits (no tabulate dependency)."""

    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    rows = [" | ".join(map(str, df.columns)), " | ".join("---" for _ in df.columns)]
    rows += [" | ".join(cell(v) for v in r) for r in df.itertuples(index=False)]
    return "\n".join(f"| {r} |" for r in rows)
