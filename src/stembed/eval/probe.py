"""Linear and random-forest probes: do the embeddings separate the reference labels better than raw S2?

For one labelled scene (e.g. a WorldCereal patch with ``LC``/``CT`` codes) every pixel-date that has an
embedding, all 10 S2 bands and a label is a sample, described three ways: the embedding, the 10 raw
bands, and a PCA of the raw bands to as many components as the embedding has features (so "the
embedding wins" cannot just mean "fewer, decorrelated inputs"). Logistic regression and a random forest
are scored on each with spatially blocked cross-validation, next to a majority-class baseline.

Why blocked: neighbouring pixels (and all dates of one pixel) share a parcel, so a random split leaks
the parcel into the test set and rewards memorising it. Samples are grouped into ``block_px`` x
``block_px`` blocks and whole blocks go to one fold. A class living in a single block cannot be both
trained and tested, so classes must span >= 2 blocks (and ``min_class_pixels`` pixels) or are dropped.

Every choice that could favour one feature set is shared: one set of pixel-dates, one subsample, one
fold assignment; PCA and feature scaling are fitted inside each training fold (sklearn pipelines).
The arrays are loaded into memory: this is meant for labelled patches, not whole embedding stores.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from stembed.errors import UserError
from stembed.io.embeddings import grid_mismatch
from stembed.sensors import S2
from stembed.types import BAND, FEATURE, TIME, X, Y

FEATURE_SETS = ("embedding", "raw_bands", "raw_pca")  # raw_pca is named raw_pca<k> in the results
MODELS = ("logistic_regression", "random_forest")
BASELINE = ("none", "majority_class")  # (feature_set, model) of the chance-level row
MIN_CLASS_BLOCKS = 2  # a class in one block cannot appear in both a training and a test fold
TABLE_COLUMNS = ("feature_set", "model", "fold", "macro_f1", "accuracy", "n_train", "n_test")
_TIME_TOL = pd.Timedelta(seconds=60)  # embedding and S2 times agree within this
_LR_MAX_ITER = 5000


class ProbeError(UserError):
    """Inputs a probe cannot use (missing label, mismatched grids, too few classes); the message says the fix."""


@dataclass(frozen=True)
class ProbeResult:
    """What :func:`probe_table` measured.

    Attributes:
        table: one row per feature set, model and fold, plus a ``fold == "mean"`` row per pair
            (columns :data:`TABLE_COLUMNS`; ``fold`` is a string: ``"0"``, ``"1"``, ..., ``"mean"``).
        summary: one row per feature set and model: mean and std (over folds, ddof=1) of macro-F1
            and accuracy, and the number of input features.
        meta: the run's facts: classes kept and dropped (with pixel, pixel-date and block counts and
            the reason), sample counts, blocks, CV scheme, seeds and parameters.
        samples: the pixel-dates used, one row each: positions ``it``, ``iy``, ``ix`` in the embedding
            store, ``label``, ``block`` and ``fold`` (the fold it is tested in). Identical for every
            feature set and model.
    """

    table: pd.DataFrame
    summary: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    samples: pd.DataFrame = field(default_factory=pd.DataFrame)

    def markdown(self) -> str:
        """The summary for a report (:func:`probe_markdown`)."""
        return probe_markdown(self)

    def save(self, out: str | Path) -> Path:
        """``probe_<label>.csv`` (every fold), ``probe_<label>_summary.csv`` and ``probe_<label>.md`` in ``out``;
        shared by ``stembed eval probe`` and ``stembed report``. Returns the summary's path."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        label = self.meta["label"]
        self.table.to_csv(out / f"probe_{label}.csv", index=False)
        self.summary.to_csv(out / f"probe_{label}_summary.csv", index=False)
        (out / f"probe_{label}.md").write_text(self.markdown() + "\n")
        return out / f"probe_{label}_summary.csv"


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class _Arrays:
    embedding: np.ndarray  # (time, feature, y, x) float32
    raw: np.ndarray  # (time, band, y, x) float32, S2 band order
    label: np.ndarray  # (y, x)
    mask: np.ndarray  # (time, y, x) bool: the usable pixel-dates


def _nodata_values(nodata: float | Sequence[float] | None) -> list[float]:
    if nodata is None:
        return []
    if isinstance(nodata, str) or not isinstance(nodata, Sequence):
        return [nodata]
    return list(nodata)


def _check_grid(name: str, obj: xr.Dataset | xr.DataArray, ref: xr.Dataset) -> None:
    problem = grid_mismatch(ref, obj, name)
    if problem:
        raise ProbeError(f"{problem}; fix: pass the scene store (S2 cube and labels) the embeddings were made from")


def _s2_positions(s2: xr.DataArray, times: np.ndarray) -> np.ndarray:
    """Position in the S2 cube of each embedding date; every one must be there."""
    pos = pd.DatetimeIndex(s2[TIME].values).get_indexer(
        pd.DatetimeIndex(times), method="nearest", tolerance=_TIME_TOL
    )
    if (pos < 0).any():
        absent = ", ".join(str(pd.Timestamp(t)) for t in np.asarray(times)[pos < 0][:5])
        raise ProbeError(
            f"the S2 cube has no acquisition at {absent} (dates of the embedding store); fix: pass the "
            "scene store the embeddings were made from"
        )
    return pos


def _load(
    embeddings: xr.Dataset, s2: xr.DataArray, labels: xr.Dataset, label: str, nodata: list[float]
) -> _Arrays:
    if label not in labels.data_vars:
        raise ProbeError(
            f"the labels have no variable {label!r} (they hold {sorted(map(str, labels.data_vars))}); "
            "fix: pass label= one of those"
        )
    if "embedding" not in embeddings.data_vars:
        raise ProbeError(
            "the embeddings Dataset has no 'embedding' variable; fix: open the store with "
            "stembed.io.embeddings.open_embeddings"
        )
    missing = [b for b in S2.bands if b not in s2[BAND].values] if BAND in s2.dims else list(S2.bands)
    if missing:
        raise ProbeError(f"the S2 cube lacks band(s) {missing}; fix: pass the scene's S2 cube (scene.s2)")
    _check_grid("S2 cube", s2, embeddings)
    _check_grid("labels", labels, embeddings)
    lab_da = labels[label]
    if set(lab_da.dims) != {Y, X}:
        raise ProbeError(f"label {label!r} has dims {tuple(lab_da.dims)}; a probe needs one label per pixel (y, x)")

    emb_da = embeddings["embedding"].transpose(TIME, FEATURE, Y, X)
    pos = _s2_positions(s2, emb_da[TIME].values)
    emb = np.asarray(emb_da.values, dtype=np.float32)
    raw = np.asarray(s2.sel({BAND: list(S2.bands)}).transpose(TIME, BAND, Y, X).values[pos], dtype=np.float32)
    lab = np.asarray(lab_da.transpose(Y, X).values)

    mask = np.isfinite(emb).all(axis=1) & np.isfinite(raw).all(axis=1)
    if "valid" in embeddings.data_vars:
        mask &= np.asarray(embeddings["valid"].transpose(TIME, Y, X).values, dtype=bool)
    has_label = ~np.isin(lab, nodata)
    if np.issubdtype(lab.dtype, np.floating):
        has_label &= np.isfinite(lab)
    mask &= has_label[None]
    return _Arrays(embedding=emb, raw=raw, label=lab, mask=mask)


def pixel_date_mask(
    embeddings: xr.Dataset,
    s2: xr.DataArray,
    labels: xr.Dataset,
    *,
    label: str,
    nodata: float | Sequence[float] | None = 0,
) -> xr.DataArray:
    """The pixel-dates a probe may use, ``(time, y, x)`` bool on the embedding store's grid.

    True where the embedding is valid and finite, all 10 S2 bands are finite and the label is not
    ``nodata`` (nor NaN). Class filtering (:func:`probe_table`'s ``min_class_pixels``) comes on top.

    Raises:
        ProbeError: the label variable is missing, S2 bands are missing, or the grids or dates differ.
    """
    a = _load(embeddings, s2, labels, label, _nodata_values(nodata))
    return xr.DataArray(
        a.mask, dims=(TIME, Y, X),
        coords={TIME: embeddings[TIME].values, Y: embeddings[Y].values, X: embeddings[X].values},
    )


# ----------------------------------------------------------------------------- folds
def spatial_blocks(iy: np.ndarray, ix: np.ndarray, *, width_px: int, block_px: int) -> np.ndarray:
    """Block id of each pixel: ``block_px`` x ``block_px`` squares numbered row by row."""
    if block_px < 1:
        raise ProbeError(f"block_px must be >= 1, got {block_px}")
    n_x = -(-width_px // block_px)
    return (np.asarray(iy) // block_px) * n_x + np.asarray(ix) // block_px


def spatial_folds(
    y: np.ndarray, blocks: np.ndarray, *, n_folds: int, seed: int
) -> tuple[np.ndarray, str]:
    """Test fold of each sample, whole blocks per fold; and the scheme used.

    StratifiedGroupKFold (shuffled with ``seed``) keeps class shares similar across folds; if it leaves
    a fold empty or a training fold with fewer than 2 classes, plain GroupKFold (shuffled) is used.

    Raises:
        ProbeError: fewer blocks than folds, or no scheme gives every fold 2+ training classes.
    """
    y, blocks = np.asarray(y), np.asarray(blocks)
    n_blocks = np.unique(blocks).size
    if n_folds < 2:
        raise ProbeError(f"n_folds must be >= 2, got {n_folds}")
    if n_blocks < n_folds:
        raise ProbeError(
            f"only {n_blocks} spatial block(s) hold samples, fewer than n_folds={n_folds}; "
            "fix: use a smaller block_px or fewer folds"
        )
    schemes = [
        (f"StratifiedGroupKFold(n_splits={n_folds}, shuffle=True, random_state={seed})",
         StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)),
        (f"GroupKFold(n_splits={n_folds}, shuffle=True, random_state={seed})",
         GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)),
    ]
    for name, cv in schemes:
        fold = np.full(y.size, -1, dtype=np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "least populated class has < n_splits members"
            for k, (_, test) in enumerate(cv.split(np.zeros((y.size, 1)), y, groups=blocks)):
                fold[test] = k
        ok = all(
            (fold == k).any() and np.unique(y[fold != k]).size >= 2 for k in range(n_folds)
        )
        if ok:
            return fold, name
    raise ProbeError(
        f"no blocked {n_folds}-fold split gives every training fold 2+ classes (classes sit in too few "
        "blocks); fix: use a smaller block_px, fewer folds or a larger min_class_pixels"
    )


# ----------------------------------------------------------------------------- models
def _pipeline(feature_set: str, model: str, *, n_pca: int, seed: int, n_estimators: int, n_jobs: int) -> Pipeline:
    """The estimator for one cell; PCA and scaling sit inside it, so they are fitted on training rows only."""
    steps: list[Any] = [PCA(n_components=n_pca)] if feature_set == "raw_pca" else []
    if model == "logistic_regression":
        steps += [StandardScaler(), LogisticRegression(max_iter=_LR_MAX_ITER)]
    elif model == "random_forest":
        steps += [RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=n_jobs)]
    else:
        raise ProbeError(f"unknown model {model!r}; choose from {MODELS}")
    return make_pipeline(*steps)


def _scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    # macro-F1 over the classes in the test fold's truth or predictions (sklearn's default labels)
    return {
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
    }


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


# ----------------------------------------------------------------------------- probe
def probe_table(
    embeddings: xr.Dataset,
    s2: xr.DataArray,
    labels: xr.Dataset,
    *,
    label: str,
    block_px: int = 16,
    n_folds: int = 4,
    max_samples: int = 20000,
    min_class_pixels: int = 50,
    seed: int = 0,
    nodata: float | Sequence[float] | None = 0,
    n_estimators: int = 200,
    n_jobs: int = 1,
) -> ProbeResult:
    """Score embedding vs raw bands vs PCA of raw bands on one label, with spatially blocked CV.

    Args:
        embeddings: an embedding store (:func:`stembed.io.embeddings.open_embeddings`).
        s2: the S2 cube ``(time, band, y, x)`` of the same scene (``scene.s2``): same grid, and an
            acquisition at every embedding date.
        labels: per-pixel labels on the same grid (``scene.labels``).
        label: the label variable, e.g. ``"LC"`` or ``"CT"`` for WorldCereal.
        block_px: side of the square spatial blocks that go to one fold whole.
        n_folds: cross-validation folds.
        max_samples: pixel-dates kept after class filtering, drawn uniformly with ``seed`` before the
            folds are assigned (so every feature set and model sees the same ones).
        min_class_pixels: a class needs this many pixels (distinct y/x, not pixel-dates) with a usable
            date, and pixels in >= 2 blocks, or it is dropped (listed in ``meta``).
        seed: the only source of randomness: the subsample, the fold shuffle and the forest all use it.
        nodata: label value(s) that mean "no label"; for WorldCereal ``LC`` pass ``(0, 99)`` to drop
            99 = unknown too.
        n_estimators, n_jobs: random-forest size and threads.

    Returns:
        A :class:`ProbeResult`; the majority-class baseline has ``feature_set="none"``,
        ``model="majority_class"``; the PCA feature set is named ``raw_pca<k>``, k = embedding features.

    Raises:
        ProbeError: missing label or bands, different grids or dates, fewer than 2 classes left,
            or too few blocks for ``n_folds``.

    (Long by this docstring and the ``meta`` record it returns; the steps are :func:`_classes`,
    :func:`_subsample`, :func:`_cross_validate` and :func:`_tables`.)
    """
    if max_samples < n_folds:
        raise ProbeError(f"max_samples must be >= n_folds ({n_folds}), got {max_samples}")
    nodata_values = _nodata_values(nodata)
    a = _load(embeddings, s2, labels, label, nodata_values)
    height, width = a.label.shape
    n_features = a.embedding.shape[1]
    n_pca = min(n_features, a.raw.shape[1])
    pca_name = f"raw_pca{n_pca}"
    kept, dropped = _classes(a, label, block_px=block_px, min_class_pixels=min_class_pixels)

    # one sample for all: drop small classes, subsample uniformly, then assign folds
    it, iy, ix, y_all, n_eligible = _subsample(a, kept, max_samples, np.random.default_rng(seed))
    blocks = spatial_blocks(iy, ix, width_px=width, block_px=block_px)
    fold, cv_name = spatial_folds(y_all, blocks, n_folds=n_folds, seed=seed)
    features = {
        "embedding": a.embedding[it, :, iy, ix],
        "raw_bands": a.raw[it, :, iy, ix],
        "raw_pca": a.raw[it, :, iy, ix],
    }
    assert all(f.shape[0] == y_all.size for f in features.values())  # one row set for every feature set
    folds = _cross_validate(features, y_all, fold, n_folds=n_folds, n_pca=n_pca, seed=seed,
                            n_estimators=n_estimators, n_jobs=n_jobs)
    table, summary = _tables(folds, {BASELINE[0]: 0, "embedding": n_features, "raw_bands": a.raw.shape[1],
                                     pca_name: n_pca}, n_folds)

    samples = pd.DataFrame({"it": it, "iy": iy, "ix": ix, "label": y_all, "block": blocks, "fold": fold})
    meta = {
        "label": label,
        "nodata": [_py(v) for v in nodata_values],
        "classes_kept": kept,
        "classes_dropped": dropped,
        "class_rule": f"a class needs >= {min_class_pixels} pixels (min_class_pixels) with a usable date, "
        f"in >= {MIN_CLASS_BLOCKS} spatial blocks: a class living in one block cannot be in both a "
        "training and a test fold, so it cannot be cross-validated; dropped classes' pixel-dates are "
        "left out, not merged",
        "selection": "embedding valid and finite, all 10 S2 bands finite, label not nodata",
        "n_pixel_dates_usable": int(a.mask.sum()),
        "n_pixel_dates_kept_classes": n_eligible,
        "n_pixel_dates": int(y_all.size),
        "n_pixels": int(np.unique(iy * width + ix).size),
        "n_blocks": int(np.unique(blocks).size),
        "grid_px": [height, width],
        "block_px": block_px,
        "n_folds": n_folds,
        "cv": cv_name,
        "fold_sizes": {str(k): int((fold == k).sum()) for k in range(n_folds)},
        "feature_sets": {"embedding": n_features, "raw_bands": a.raw.shape[1], pca_name: n_pca},
        "pca": f"PCA({n_pca}) of the raw reflectances, fitted on each training fold only",
        "models": {
            "logistic_regression": f"StandardScaler + LogisticRegression(max_iter={_LR_MAX_ITER})",
            "random_forest": f"RandomForestClassifier(n_estimators={n_estimators}, random_state={seed})",
        },
        "macro_f1": "mean F1 over the classes present in a test fold's truth or predictions",
        "seed": seed,
        "max_samples": max_samples,
        "min_class_pixels": min_class_pixels,
    }
    return ProbeResult(table=table, summary=summary, meta=meta, samples=samples)


def _classes(
    a: _Arrays, label: str, *, block_px: int, min_class_pixels: int
) -> tuple[dict[Any, dict[str, int]], dict[Any, dict[str, Any]]]:
    """The classes kept and dropped (with their pixel, pixel-date and block counts, and why), counted on
    pixels with any usable date and the blocks those pixels fall in.

    Raises:
        ProbeError: fewer than 2 classes are kept.
    """
    width = a.label.shape[1]
    _, iy, ix = np.nonzero(a.mask)
    y_all = a.label[iy, ix]
    pixel_has_date = a.mask.any(axis=0)
    py, px = np.nonzero(pixel_has_date)
    p_label, p_block = a.label[py, px], spatial_blocks(py, px, width_px=width, block_px=block_px)
    kept: dict[Any, dict[str, int]] = {}
    dropped: dict[Any, dict[str, Any]] = {}
    for c in np.unique(p_label):
        info = {
            "pixels": int((p_label == c).sum()),
            "pixel_dates": int((y_all == c).sum()),
            "blocks": int(np.unique(p_block[p_label == c]).size),
        }
        reasons = []
        if info["pixels"] < min_class_pixels:
            reasons.append(f"{info['pixels']} pixels < min_class_pixels={min_class_pixels}")
        if info["blocks"] < MIN_CLASS_BLOCKS:
            reasons.append(f"in {info['blocks']} block(s) < {MIN_CLASS_BLOCKS}")
        if reasons:
            dropped[_py(c)] = info | {"reason": "; ".join(reasons)}
        else:
            kept[_py(c)] = info
    if len(kept) < 2:
        raise ProbeError(
            f"only {len(kept)} class(es) of {label!r} remain ({list(kept)}; dropped: "
            f"{ {k: v['reason'] for k, v in dropped.items()} }) and a probe needs 2; fix: lower "
            "min_class_pixels, use a smaller block_px, or probe a label with more classes"
        )
    return kept, dropped


def _subsample(
    a: _Arrays, kept: dict[Any, Any], max_samples: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The usable pixel-dates of the kept classes, at most ``max_samples`` drawn uniformly: ``it, iy, ix``,
    their labels, and how many were eligible.

    Raises:
        ProbeError: the subsample holds one class only.
    """
    it, iy, ix = np.nonzero(a.mask)
    y_all = a.label[iy, ix]
    keep = np.isin(y_all, list(kept))
    it, iy, ix, y_all = it[keep], iy[keep], ix[keep], y_all[keep]
    n_eligible = int(y_all.size)
    if n_eligible > max_samples:
        pick = np.sort(rng.choice(n_eligible, size=max_samples, replace=False))
        it, iy, ix, y_all = it[pick], iy[pick], ix[pick], y_all[pick]
    if np.unique(y_all).size < 2:
        raise ProbeError(
            f"the subsample of {y_all.size} pixel-dates holds one class only; fix: raise max_samples"
        )
    return it, iy, ix, y_all, n_eligible


def _cross_validate(
    features: dict[str, np.ndarray], y_all: np.ndarray, fold: np.ndarray, *, n_folds: int, n_pca: int, seed: int,
    n_estimators: int, n_jobs: int,
) -> pd.DataFrame:
    """One row per fold, feature set and model (plus the majority-class baseline): columns :data:`TABLE_COLUMNS`."""
    pca_name = f"raw_pca{n_pca}"
    rows = []
    for k in range(n_folds):
        train, test = fold != k, fold == k
        y_train, y_test = y_all[train], y_all[test]
        n = {"n_train": int(train.sum()), "n_test": int(test.sum())}
        values, counts = np.unique(y_train, return_counts=True)
        majority = values[np.argmax(counts)]
        rows.append({"feature_set": BASELINE[0], "model": BASELINE[1], "fold": str(k),
                     **_scores(y_test, np.full(y_test.shape, majority)), **n})
        for fs, x in features.items():
            for model in MODELS:
                est = _pipeline(fs, model, n_pca=n_pca, seed=seed, n_estimators=n_estimators,
                                n_jobs=n_jobs)
                est.fit(x[train], y_train)
                rows.append({"feature_set": pca_name if fs == "raw_pca" else fs, "model": model,
                             "fold": str(k), **_scores(y_test, est.predict(x[test])), **n})
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _tables(folds: pd.DataFrame, n_inputs: dict[str, int], n_folds: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The fold table with a ``mean`` row per feature set and model, and the summary (mean and std over
    folds, input features per set) in the order of ``n_inputs``."""
    order = list(n_inputs)
    g = folds.groupby(["feature_set", "model"], sort=False)
    metrics = ["macro_f1", "accuracy", "n_train", "n_test"]
    means = g[metrics].mean().reset_index().assign(fold="mean")
    table = pd.concat([folds, means[list(TABLE_COLUMNS)]], ignore_index=True)
    summary = (
        g[["macro_f1", "accuracy"]].agg(["mean", "std"]).pipe(
            lambda d: d.set_axis([f"{m}_{s}" for m, s in d.columns], axis=1)
        ).reset_index()
    )
    summary["n_features"] = summary["feature_set"].map(n_inputs)
    summary["n_folds"] = n_folds
    summary = summary.sort_values("feature_set", key=lambda s: s.map(order.index), kind="stable")
    summary = summary.reset_index(drop=True)
    return table, summary


def probe_markdown(result: ProbeResult) -> str:
    """Markdown summary for a report: mean ± std over folds per feature set and model, then the classes."""
    m = result.meta
    lines = [
        f"Probe of `{m['label']}`: {m['n_pixel_dates']} pixel-dates ({m['n_pixels']} pixels, {m['n_blocks']} "
        f"blocks of {m['block_px']} px), {m['n_folds']}-fold spatially blocked CV ({m['cv']}).",
        "",
        "| features | model | macro-F1 | accuracy |",
        "|---|---|---|---|",
    ]
    for r in result.summary.itertuples(index=False):
        lines.append(
            f"| {r.feature_set} ({r.n_features}) | {r.model} | {r.macro_f1_mean:.3f} ± {r.macro_f1_std:.3f} | "
            f"{r.accuracy_mean:.3f} ± {r.accuracy_std:.3f} |"
        )
    kept = ", ".join(f"{c} ({v['pixels']} px)" for c, v in m["classes_kept"].items())
    lines += ["", f"Classes kept: {kept}."]
    if m["classes_dropped"]:
        dropped = ", ".join(f"{c} ({v['reason']})" for c, v in m["classes_dropped"].items())
        lines.append(f"Classes dropped: {dropped}.")
    return "\n".join(lines)
