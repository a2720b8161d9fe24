"""Early-season curve: how well do the probes separate the labels with only the dates up to each cut-off?

Monitoring asks for a class before the season ends. For each cut-off c (every ``step_days`` from the probed
store's first date, the last one its last date) the probes of :mod:`stembed.eval.probe` are trained and tested
on the pixel-dates dated <= c only: the same eligibility rules, class filtering, seeded subsample and spatially
blocked folds, run again on that subset. Feature sets (:data:`CURVE_SETS`), every PCA fitted on each training
fold's rows of the cut-off only:

- ``embedding<k>``: the embedding's first k features. A centred window (and the paper's 11 consecutive dates)
  reads dates after the one it embeds, so unless the store records a trailing window (``window.side ==
  "trailing"``) it is marked ``sees_future``: its score at c may use dates after c.
- ``date_s2s1_pca<k>`` and ``window_pca<k>``: the whole-series probe's same-size baselines that see the model's
  inputs, built per cut-off by its own builder (:func:`stembed.eval.probe.probe_features`): PCA-k of the date's
  S2 bands and the VV, VH of the nearest S1 date (each standardised), and PCA-k of the pixel's S2 bands on the
  dates the model's window reads (the store's ``window``, else the paper's 11 consecutive dates).
  ``date_s2s1_pca`` reads only S1 dates <= c (the nearest of those; needs ``s1``), so it never sees the future;
  ``window_pca`` reads the model's window whole, so it is marked ``sees_future`` exactly when the embedding is
  (a trailing window's dates are all before the date).
- ``date_s2``: the date's 10 S2 bands (sees only the date).
- ``to_date_pca<k>``: PCA-k of the pixel's monthly-mean S2 series from the store's first month to the cut-off's
  month, built from S2 observations dated <= c only (empty months filled linearly between observed ones, flat
  after the last): the linear baseline of the same size that never looks ahead.

A cut-off whose pixel-dates cannot be cross-validated (no sample, fewer than 2 classes, too few blocks or
samples for the folds or the PCA) gets rows with a ``skipped_reason``, not an error; so does a single set that
cannot be built at a cut-off (e.g. ``date_s2s1_pca`` before the first S1 date).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from stembed.config import WindowConfig
from stembed.eval.probe import (
    BASELINE,
    MODELS,
    FeatureSet,
    ProbeError,
    ProbeFeatures,
    _Arrays,
    _build_features,
    _classes,
    _cross_validate,
    _draw_sample,
    _load,
    _nodata_values,
    _prefixes,
    _py,
    _store_window,
    monthly_series,
)

STEP_DAYS = 15
"""Default days between cut-offs."""
CURVE_SETS = ("embedding<k>", "date_s2s1_pca<k>", "window_pca<k>", "to_date_pca<k>", "date_s2")
"""The feature sets of the curve (``<k>``: each probed prefix; ``date_s2s1_pca<k>`` only with an S1 cube); each
cut-off also has the majority-class row (feature set ``none``, model ``majority_class``), the chance level the
sets are read against."""
SEES_FUTURE_SETS = ("embedding", "window_pca")
"""The sets (name prefixes) that read the model's window: ``sees_future`` unless the store's window is trailing."""
CURVE_COLUMNS = (
    "cutoff", "feature_set", "model", "macro_f1_mean", "macro_f1_std", "n_samples", "sees_future", "skipped_reason",
)


@dataclass(frozen=True)
class CurveResult:
    """What :func:`probe_by_date` measured.

    Attributes:
        table: one row per cut-off, feature set and model (columns :data:`CURVE_COLUMNS`; ``cutoff`` an ISO date,
            scores NaN and ``skipped_reason`` set where the cut-off could not be cross-validated).
        meta: label, cut-off rule, prefixes, CV settings, and the rule deciding ``sees_future``.
    """

    table: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        """The table and the plot's link, for a report (:func:`curve_markdown`)."""
        return curve_markdown(self)

    def save(self, out: str | Path) -> dict[str, Path]:
        """``probe_<label>_by_date.csv``, ``.png`` and ``.md`` in ``out``; returns them by suffix."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"probe_{self.meta['label']}_by_date"
        paths = {s: out / f"{stem}.{s}" for s in ("csv", "png", "md")}
        self.table.to_csv(paths["csv"], index=False)
        plot_curve(self.table, paths["png"], title=f"{self.meta['label']}: macro-F1 with the dates up to each cut-off")
        paths["md"].write_text(self.markdown() + "\n")
        return paths


def check_step_days(step_days: int) -> None:
    """Refuse a step that would not advance the cut-offs."""
    if isinstance(step_days, bool) or not isinstance(step_days, int | np.integer) or step_days < 1:
        raise ProbeError(f"step_days must be a whole number of days >= 1, got {step_days!r}; fix: give --step-days 1 "
                         f"or more (default {STEP_DAYS})")


def cutoffs(times: np.ndarray, step_days: int) -> np.ndarray:
    """``datetime64[D]`` cut-offs: first date + step, + 2 steps, ... before the last date, then the last date."""
    check_step_days(step_days)
    days = np.asarray(times, dtype="datetime64[D]")
    first, last = days.min(), days.max()
    inner = np.arange(first + np.timedelta64(step_days, "D"), last, np.timedelta64(step_days, "D"))
    return np.append(inner, last).astype("datetime64[D]")


def store_sees_future(embeddings: xr.Dataset) -> bool:
    """Whether the embedding of a date may read later dates: True unless the store's ``window`` is trailing
    (centred windows and the paper's 11 dates around the date read both sides)."""
    window = embeddings.attrs.get("window")
    return not (isinstance(window, dict) and window.get("side") == "trailing")


def to_date_months(
    series: np.ndarray, times: np.ndarray, *, start: np.datetime64 | np.ndarray, cutoff: np.datetime64 | np.ndarray
) -> np.ndarray:
    """``(..., month)`` monthly means of ``series`` ``(..., time)`` from ``start``'s month to ``cutoff``'s, from
    the values dated in that span only (:func:`~stembed.eval.probe.monthly_series` fills the empty months)."""
    day = np.asarray(times, dtype="datetime64[D]")
    first, cut = np.asarray(start, dtype="datetime64[M]").astype("datetime64[D]"), np.asarray(cutoff, "datetime64[D]")
    keep = (day >= first) & (day <= cut)
    # an all-NaN column dated on the cut-off stretches the months to its month without adding a value
    t = np.append(np.asarray(times, dtype="datetime64[ns]")[keep], cut.astype("datetime64[ns]"))
    v = np.concatenate([series[..., keep], np.full((*series.shape[:-1], 1), np.nan, dtype=series.dtype)], axis=-1)
    return monthly_series(v, t)[0]


def _curve_names(prefixes: Sequence[int], with_s1: bool) -> list[str]:
    """The curve's feature sets, in :data:`CURVE_SETS` order (``date_s2s1_pca<k>`` only ``with_s1``)."""
    bases = [b for b in CURVE_SETS if with_s1 or b != "date_s2s1_pca<k>"]
    return [b.replace("<k>", str(k)) for k in prefixes for b in bases if "<k>" in b] + ["date_s2"]


def _curve_sets(
    a: _Arrays, it: np.ndarray, iy: np.ndarray, ix: np.ndarray, prefixes: Sequence[int],
    cutoff: np.datetime64 | np.ndarray, window: WindowConfig | None,
) -> tuple[dict[str, FeatureSet], dict[str, Any], dict[str, str]]:
    """The curve's feature sets of the rows ``it, iy, ix`` of ``a = _until(..., cutoff)`` (all dated <= ``cutoff``),
    in :data:`CURVE_SETS` order; how the probe's builder made ``date_s2s1`` and ``window``; the sets it could not
    build here (by name, e.g. ``window_pca7``), with why."""
    width = a.label.shape[1]
    upix, inv = np.unique(iy * width + ix, return_inverse=True)
    uy, ux = np.divmod(upix, width)
    series = np.transpose(a.s2[:, :, uy, ux], (2, 1, 0))  # (P, band, s2 time)
    months = to_date_months(series, a.s2_times, start=a.s2_times[a.pos].min(), cutoff=cutoff)  # (P, band, month)
    to_date = np.moveaxis(months, 1, 2).reshape(months.shape[0], -1)[inv]  # month-major
    # the whole-series probe's builder, on this cut-off's rows (its S1 cut at the cut-off); its season and
    # window11 sets read the whole series and are not the curve's
    built, meta, skipped = _build_features(a, it, iy, ix, prefixes, window)
    if a.s1 is not None and a.s1_times is not None and a.s1_times.size == 0:
        skipped["date_s2s1_pca<k>"] = "no S1 date on or before the cut-off"
    sets: dict[str, FeatureSet] = {}
    for k in prefixes:
        sets |= {n: built[n] for n in (f"embedding{k}", f"date_s2s1_pca{k}", f"window_pca{k}") if n in built}
        sets[f"to_date_pca{k}"] = FeatureSet(f"to_date_pca{k}", to_date, n_pca=min(k, to_date.shape[1]))
    sets["date_s2"] = built["date_s2"]
    not_built = {name.replace("<k>", str(k)): why for name, why in skipped.items() if name in CURVE_SETS
                 for k in prefixes}
    return sets, {key: v for key, v in meta.items() if key in ("date_s2s1", "window")}, not_built


def _until(a: _Arrays, cutoff: np.datetime64 | np.ndarray) -> _Arrays:
    """``a`` with only the pixel-dates dated <= ``cutoff`` usable and only the S1 dates dated <= ``cutoff``."""
    dated = np.asarray(a.s2_times[a.pos], dtype="datetime64[D]") <= cutoff
    a = replace(a, mask=a.mask & dated[:, None, None])
    if a.s1 is None or a.s1_times is None:
        return a
    s1_dated = np.asarray(a.s1_times, dtype="datetime64[D]") <= cutoff
    return replace(a, s1=a.s1[s1_dated], s1_times=a.s1_times[s1_dated])


def probe_curve_features(
    embeddings: xr.Dataset, s2: xr.DataArray, labels: xr.Dataset, *, label: str, cutoff: str | np.datetime64,
    s1: xr.DataArray | None = None, features: Sequence[int] | None = None, region: Sequence[int] | None = None,
    nodata: float | Sequence[float] | None = 0,
) -> ProbeFeatures:
    """The curve's feature sets of every usable pixel-date dated <= ``cutoff``, as :func:`probe_by_date` builds
    them (for inspecting what is read after the cut-off). Rows in (time, y, x) order; ``skipped``: the sets not
    built at this cut-off (by name, e.g. ``date_s2s1_pca7``), ``meta``: how ``date_s2s1`` and ``window`` were."""
    cut = np.asarray(cutoff, dtype="datetime64[D]")[()]
    a = _until(_load(embeddings, s2, labels, label, _nodata_values(nodata), s1=s1, region=region), cut)
    it, iy, ix = np.nonzero(a.mask)
    prefixes = _prefixes(embeddings, features, a.embedding.shape[1])
    sets, meta, skipped = _curve_sets(a, it, iy, ix, prefixes, cut, _store_window(embeddings))
    samples = pd.DataFrame({"it": it, "iy": iy + a.origin[0], "ix": ix + a.origin[1], "label": a.label[iy, ix]})
    return ProbeFeatures(samples=samples, sets=sets, meta=meta, skipped=skipped)


def _too_few(sets: dict[str, FeatureSet], fold: np.ndarray, n_folds: int) -> str | None:
    """Why the folds cannot fit every set (a training fold smaller than a PCA), else None."""
    n_train = min(int((fold != k).sum()) for k in range(n_folds))
    need = max((fs.n_pca or 1) for fs in sets.values())
    if n_train < need:
        return f"a training fold holds {n_train} pixel-dates, fewer than the {need} PCA components asked for"
    return None


def _rows_at(
    a: _Arrays, cutoff: np.datetime64, prefixes: Sequence[int], sees_future: bool, window: WindowConfig | None, *,
    label: str, block_px: int, n_folds: int, max_samples: int, min_class_pixels: int, seed: int, n_estimators: int,
    n_jobs: int,
) -> list[dict[str, Any]]:
    """The rows of one cut-off: mean and std of macro-F1 over folds per set and model, or why it was skipped."""
    ac = _until(a, cutoff)
    reason, n, scores = None, 0, pd.DataFrame()
    not_built: dict[str, str] = {}
    if not ac.mask.any():
        reason = "no eligible pixel-date on or before the cut-off"
    else:
        try:
            kept, _ = _classes(ac, label, block_px=block_px, min_class_pixels=min_class_pixels)
            sample = _draw_sample(ac, kept, max_samples=max_samples, block_px=block_px, n_folds=n_folds, seed=seed)
        except ProbeError as e:
            reason = str(e)
        else:
            n = int(sample.y.size)
            sets, _, not_built = _curve_sets(ac, sample.it, sample.iy, sample.ix, prefixes, cutoff, window)
            reason = _too_few(sets, sample.fold, n_folds)
            if reason is None:  # each set's PCA fitted on the training fold's rows (probe._pipeline)
                folds = _cross_validate(sets, sample.y, sample.fold, n_folds=n_folds, seed=seed,
                                        n_estimators=n_estimators, n_jobs=n_jobs)
                scores = folds.groupby(["feature_set", "model"])["macro_f1"].agg(["mean", "std"])
    names = _curve_names(prefixes, a.s1 is not None)
    return _cutoff_rows(cutoff, names, scores, n, sees_future, reason, not_built)


def _cutoff_rows(
    cutoff: np.datetime64, names: Sequence[str], scores: pd.DataFrame, n: int, sees_future: bool,
    reason: str | None, not_built: dict[str, str],
) -> list[dict[str, Any]]:
    """One row per set and model, then the chance level; a row is skipped (NaN scores, its reason) where the
    cut-off is (``reason``) or its set was not built (``not_built``)."""
    rows = []
    for name, model in [*((s, m) for s in names for m in MODELS), BASELINE]:
        why = reason or not_built.get(name)
        mean, std = scores.loc[(name, model)] if why is None else (np.nan, np.nan)
        rows.append({"cutoff": str(cutoff), "feature_set": name, "model": model, "macro_f1_mean": float(mean),
                     "macro_f1_std": float(std), "n_samples": n,
                     "sees_future": sees_future and name.startswith(SEES_FUTURE_SETS), "skipped_reason": why})
    return rows


def probe_by_date(
    embeddings: xr.Dataset, s2: xr.DataArray, labels: xr.Dataset, *, label: str, s1: xr.DataArray | None = None,
    step_days: int = STEP_DAYS, features: Sequence[int] | None = None, region: Sequence[int] | None = None,
    block_px: int = 16, n_folds: int = 4, max_samples: int = 20000, min_class_pixels: int = 50, seed: int = 0,
    nodata: float | Sequence[float] | None = 0, n_estimators: int = 200, n_jobs: int = 1,
) -> CurveResult:
    """The early-season curve: the probe re-run on the pixel-dates dated <= each cut-off (:func:`cutoffs`).

    The arguments are :func:`~stembed.eval.probe.probe_table`'s (``s1``: the scene's S1 cube, for
    ``date_s2s1_pca<k>``; None leaves that set out and says so in ``meta["skipped"]``), plus ``step_days``
    between cut-offs.

    Raises:
        ProbeError: bad inputs as :func:`~stembed.eval.probe.probe_table` (a ``window`` attribute that is not a
            WindowConfig included), or ``step_days`` < 1. A cut-off that cannot be cross-validated is a skipped
            row, not an error.
    """
    check_step_days(step_days)
    if max_samples < n_folds:
        raise ProbeError(f"max_samples must be >= n_folds ({n_folds}), got {max_samples}")
    nodata_values = _nodata_values(nodata)
    a = _load(embeddings, s2, labels, label, nodata_values, s1=s1, region=region)
    prefixes = _prefixes(embeddings, features, a.embedding.shape[1])
    window = _store_window(embeddings)
    sees_future = store_sees_future(embeddings)
    cuts = cutoffs(a.s2_times[a.pos], step_days)
    rows = [row for c in cuts for row in _rows_at(
        a, c, prefixes, sees_future, window, label=label, block_px=block_px, n_folds=n_folds, max_samples=max_samples,
        min_class_pixels=min_class_pixels, seed=seed, n_estimators=n_estimators, n_jobs=n_jobs)]
    meta = {
        "label": label, "nodata": [_py(v) for v in nodata_values], "step_days": step_days, "prefixes": prefixes,
        "first_date": str(np.asarray(a.s2_times[a.pos], dtype="datetime64[D]").min()),
        "cutoffs": "every step_days from the store's first date + step_days; the last cut-off is its last date",
        "window": embeddings.attrs.get("window"), "block_px": block_px, "n_folds": n_folds,
        "max_samples": max_samples, "min_class_pixels": min_class_pixels, "seed": seed, "n_estimators": n_estimators,
        **_curve_meta(with_s1=s1 is not None),
    }
    return CurveResult(table=pd.DataFrame(rows, columns=list(CURVE_COLUMNS)), meta=meta)


def _curve_meta(*, with_s1: bool) -> dict[str, Any]:
    """The record of how the curve's sets are built, which ones see the future, and the sets left out."""
    return {
        "sees_future": "embedding<k> and window_pca<k> unless the store's window attribute has side == "
        "'trailing': a centred window (or the paper's 11 dates around the date) reads dates after the one it embeds",
        "baselines": {
            "date_s2": "the date's 10 S2 bands",
            "to_date_pca<k>": "PCA-k of the pixel's monthly S2 means from the store's first month to the cut-off's, "
            "from S2 values dated on or before the cut-off only",
            "date_s2s1_pca<k>": "PCA-k of the date's S2 bands and the VV, VH of the nearest S1 date on or before "
            "the cut-off, each standardised (stembed.eval.probe's builder)",
            "window_pca<k>": "PCA-k of the pixel's S2 bands on the dates the model's window reads (the store's "
            "window attribute, else the paper's 11 consecutive dates; stembed.eval.probe's builder)",
            "pca": "fitted on each training fold's rows of the cut-off only, k capped at the set's columns",
        },
        "skipped": {} if with_s1 else {"date_s2s1_pca<k>": "no S1 cube given (s1=None)"},
    }


def _legend_name(name: str, sees_future: bool) -> str:
    return f"{name} (sees the future)" if sees_future else name


def plot_curve(table: pd.DataFrame, path: str | Path, *, title: str = "") -> Path:
    """PNG of macro-F1 against the cut-off, one panel per model, one line per feature set; sets that see the
    future are dashed and say so, so their early scores are not read as early-season ones."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(MODELS), 4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(MODELS), sharey=True, squeeze=False)[0]
    when = pd.to_datetime(table["cutoff"])
    for ax, model in zip(axes, MODELS, strict=True):
        chance = (table["model"] == BASELINE[1]).to_numpy()
        ax.plot(when[chance], table.loc[chance, "macro_f1_mean"], ":", color="grey", label="majority class")
        for name in dict.fromkeys(table.loc[~chance, "feature_set"]):
            sel = ((table["model"] == model) & (table["feature_set"] == name)).to_numpy()
            future = bool(table.loc[sel, "sees_future"].any())
            ax.plot(when[sel], table.loc[sel, "macro_f1_mean"], "--" if future else "-", marker="o", markersize=3,
                    label=_legend_name(name, future))
        ax.set_title(model)
        ax.set_xlabel("cut-off (dates used: on or before it)")
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        ax.tick_params(axis="x", labelrotation=30)
    axes[0].set_ylabel("macro-F1 (mean over folds)")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def curve_markdown(result: CurveResult) -> str:
    """The curve as a markdown table (mean ± std over folds), the sets not built, skipped cut-offs (or sets of a
    cut-off) once each, and the plot."""
    m, t = result.meta, result.table
    lines = [
        f"Early-season curve of `{m['label']}`: probes trained and tested on the pixel-dates dated on or before each "
        f"cut-off (every {m['step_days']} days; the last is the store's last date), {m['n_folds']}-fold spatially "
        "blocked CV, every PCA fitted on the training fold. `to_date_pca<k>`: PCA-k of the pixel's monthly S2 means "
        "up to the cut-off, from dates on or before it only; `date_s2s1_pca<k>`: PCA-k of the date's S2 bands and "
        "the nearest S1 date's VV, VH (S1 dates on or before the cut-off only); `window_pca<k>`: PCA-k of the S2 "
        "bands on the dates the model's window reads. Sets marked *sees the future* read dates after the one they "
        "describe (a centred window).",
        "", f"![macro-F1 by cut-off](probe_{m['label']}_by_date.png)", "",
        "| cut-off | features | model | macro-F1 | pixel-dates | sees the future |", "|---|---|---|---|---|---|",
    ]
    for r in t[t["skipped_reason"].isna()].itertuples(index=False):
        lines.append(f"| {r.cutoff} | {r.feature_set} | {r.model} | {r.macro_f1_mean:.3f} ± {r.macro_f1_std:.3f} | "
                     f"{r.n_samples} | {'yes' if r.sees_future else 'no'} |")
    if m.get("skipped"):
        lines += ["", "Not built: " + "; ".join(f"`{k}` ({v})" for k, v in m["skipped"].items()) + "."]
    skipped = _skipped_lines(t)
    if skipped:
        lines += ["", "Skipped cut-offs:", *skipped]
    return "\n".join(lines)


def _skipped_lines(table: pd.DataFrame) -> list[str]:
    """``- <cut-off>: <reason>`` per skipped cut-off; ``- <cut-off>, <sets>: <reason>`` where only those sets were."""
    lines = []
    skipped = table[table["skipped_reason"].notna()]
    for (cut, why), rows in skipped.groupby(["cutoff", "skipped_reason"], sort=False):
        whole = len(rows) == int((table["cutoff"] == cut).sum())
        sets = "" if whole else ", " + ", ".join(dict.fromkeys(rows["feature_set"]))
        lines.append(f"- {cut}{sets}: {why}")
    return lines
