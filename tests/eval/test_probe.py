"""Probes (stembed.eval.probe) on hand-built stores: chance levels, blocked folds, no PCA leakage, row selection,
and the columns of every baseline (date, date + S1, window, season) on hand-made series."""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from stembed.config import WindowConfig
from stembed.data.sampling import day_numbers
from stembed.data.windows import window_dates
from stembed.eval import probe
from stembed.eval.probe import (
    ProbeError,
    fill_linear,
    paper_window,
    parse_region,
    pixel_date_mask,
    probe_features,
    probe_markdown,
    probe_table,
    spatial_blocks,
    spatial_folds,
)
from stembed.sensors import S1, S2

H = W = 16  # 16 blocks of 4 px
T = 3
BLOCK = 4


class _Fast(TypedDict):
    """Small settings for the probes (typed, so ``**FAST`` type-checks against ``probe_table``'s keywords)."""

    block_px: int
    n_folds: int
    min_class_pixels: int
    n_estimators: int


FAST: _Fast = {"block_px": BLOCK, "n_folds": 4, "min_class_pixels": 10, "n_estimators": 10}


def _block_labels() -> np.ndarray:
    """Every 4x4 block: two rows of class 11, one of 13, one of 60 (shares 1/2, 1/4, 1/4 in every block)."""
    row_class = np.array([11, 11, 13, 60], dtype=np.uint16)
    return np.broadcast_to(row_class[np.arange(H) % BLOCK][:, None], (H, W)).copy()


def _store(
    lab: np.ndarray, *, seed: int = 0, times: np.ndarray | None = None, n_features: int = 7,
    attrs: dict | None = None,
) -> tuple[xr.Dataset, xr.DataArray, xr.Dataset]:
    """Embedding whose feature 0 is the class index (+ small noise); raw S2 bands are pure noise.

    ``times``: the S2 dates (default T dates 5 days apart), also the store's."""
    rng = np.random.default_rng(seed)
    times = pd.date_range("2020-05-01", periods=T, freq="5D").values if times is None else times
    n_time = len(times)
    h, w = lab.shape
    y = 5_000_000.0 - 5 - 10 * np.arange(h)
    x = 400_000.0 + 5 + 10 * np.arange(w)
    classes = np.unique(lab)
    idx = np.searchsorted(classes, lab).astype(np.float32)
    emb = rng.normal(size=(n_time, n_features, h, w)).astype(np.float32)
    emb[:, 0] = idx[None] + rng.normal(scale=0.05, size=(n_time, h, w))
    embeddings = xr.Dataset(
        {"embedding": (("time", "feature", "y", "x"), emb),
         "valid": (("time", "y", "x"), np.ones((n_time, h, w), bool))},
        coords={"time": times, "feature": [f"f{i}" for i in range(n_features)], "y": y, "x": x},
        attrs=attrs or {},
    )
    s2 = xr.DataArray(
        rng.uniform(0.0, 0.5, size=(n_time, len(S2.bands), h, w)).astype(np.float32),
        dims=("time", "band", "y", "x"), coords={"time": times, "band": list(S2.bands), "y": y, "x": x},
    )
    labels = xr.Dataset({"LC": (("y", "x"), lab)}, coords={"y": y, "x": x}, attrs={"nodata": 0})
    return embeddings, s2, labels


def _s1(s2: xr.DataArray, times: np.ndarray, values: np.ndarray | None = None, *, seed: int = 0) -> xr.DataArray:
    """An S1 cube (VV, VH) on the S2 grid at its own ``times``; noise unless ``values`` (time, band, y, x)."""
    if values is None:
        values = np.random.default_rng(seed).uniform(0.2, 0.8, size=(len(times), 2, s2.sizes["y"], s2.sizes["x"]))
    return xr.DataArray(
        np.asarray(values, dtype=np.float32), dims=("time", "band", "y", "x"),
        coords={"time": times, "band": list(S1.bands), "y": s2.y.values, "x": s2.x.values},
    )


def _cell(result: probe.ProbeResult, feature_set: str, model: str) -> pd.Series:
    s = result.summary
    return s[(s.feature_set == feature_set) & (s.model == model)].iloc[0]


def test_embedding_that_encodes_the_label_beats_noise_baselines_and_majority_is_at_hand_value():
    times = pd.date_range("2020-05-01", periods=6, freq="5D").values  # 6 dates: enough for the 11-date window
    embeddings, s2, labels = _store(_block_labels(), times=times)
    s1 = _s1(s2, times + np.timedelta64(2, "D"))
    res = probe_table(embeddings, s2, labels, label="LC", s1=s1, **FAST)
    names = ["embedding7", "date_s2_pca7", "date_s2s1_pca7", "window_pca7", "season_pca7", "date_s2", "season_raw"]
    assert list(dict.fromkeys(res.summary.feature_set)) == ["none", *names]  # no window11: the paper's window
    for model in probe.MODELS:
        assert _cell(res, "embedding7", model).macro_f1_mean > 0.95
        for fs in names[1:]:
            assert _cell(res, fs, model).macro_f1_mean < 0.45, (fs, model)
    n = res.summary.drop_duplicates("feature_set").set_index("feature_set")[["n_features", "n_columns"]]
    assert n.to_dict("index") == {
        "none": {"n_features": 0, "n_columns": 0}, "embedding7": {"n_features": 7, "n_columns": 7},
        "date_s2_pca7": {"n_features": 7, "n_columns": 10}, "date_s2s1_pca7": {"n_features": 7, "n_columns": 12},
        "window_pca7": {"n_features": 7, "n_columns": 110}, "season_pca7": {"n_features": 7, "n_columns": 10},
        "date_s2": {"n_features": 10, "n_columns": 10}, "season_raw": {"n_features": 10, "n_columns": 10},
    }
    assert res.meta["skipped"] == {}


def test_old_store_without_s1_and_few_dates_keeps_the_old_rows_under_new_names():
    res = probe_table(*_store(_block_labels()), label="LC", **FAST)
    for model in probe.MODELS:
        assert _cell(res, "embedding7", model).macro_f1_mean > 0.95
        for fs in ("date_s2", "date_s2_pca7"):
            assert _cell(res, fs, model).macro_f1_mean < 0.45, (fs, model)
    # every test fold holds 1/2 class 11, 1/4 class 13, 1/4 class 60; the training majority is 11:
    # accuracy 1/2, F1(11) = 2 * 0.5 * 1 / 1.5 = 2/3, F1(13) = F1(60) = 0, macro-F1 = 2/9
    base = res.table[(res.table.model == "majority_class") & (res.table.fold != "mean")]
    assert len(base) == 4
    np.testing.assert_allclose(base.accuracy, 0.5)
    np.testing.assert_allclose(base.macro_f1, 2 / 9)
    assert res.meta["n_pixel_dates"] == T * H * W
    assert set(res.meta["classes_kept"]) == {11, 13, 60} and res.meta["classes_dropped"] == {}
    assert set(res.summary.feature_set) == {"none", "embedding7", "date_s2", "date_s2_pca7", "season_pca7",
                                            "season_raw"}
    assert set(res.meta["skipped"]) == {"date_s2s1_pca<k>", "window_pca<k>"}
    assert "need >= 6" in res.meta["skipped"]["window_pca<k>"]
    md = probe_markdown(res)
    assert "| embedding7 (7) | random_forest |" in md and "| date_s2_pca7 (7 of 10) | random_forest |" in md
    assert "Classes kept: 11 (128 px)" in md and "Not built: `date_s2s1_pca<k>` (no S1 cube given" in md
    # older outputs (raw_bands, raw_pca7, embedding) read side by side: the page says what became what
    assert "Feature sets were renamed (`raw_bands` -> `date_s2`, `raw_pca<k>` -> `date_s2_pca<k>`, `embedding` -> " \
        "`embedding<k>`), so older probe outputs can be read side by side." in md


def test_spatial_blocks_numbers_squares_row_by_row():
    iy, ix = np.array([0, 3, 4, 9, 9]), np.array([0, 9, 0, 4, 8])
    np.testing.assert_array_equal(spatial_blocks(iy, ix, width_px=10, block_px=4), [0, 2, 3, 7, 8])


def test_folds_never_share_a_block_or_pixel_between_train_and_test():
    rng = np.random.default_rng(1)
    iy, ix = rng.integers(0, 40, 3000), rng.integers(0, 40, 3000)
    y = rng.integers(0, 3, 3000)
    blocks = spatial_blocks(iy, ix, width_px=40, block_px=8)
    fold, scheme = spatial_folds(y, blocks, n_folds=4, seed=0)
    pixel = iy * 40 + ix
    assert set(np.unique(fold)) == {0, 1, 2, 3} and "GroupKFold" in scheme
    for k in range(4):
        test, train = fold == k, fold != k
        assert not set(blocks[test]) & set(blocks[train])
        assert not set(pixel[test]) & set(pixel[train])
    # and in a full probe: all dates of a pixel are in one fold
    res = probe_table(*_store(_block_labels()), label="LC", **FAST)
    assert (res.samples.groupby(["iy", "ix"]).fold.nunique() == 1).all()
    assert (res.samples.groupby("block").fold.nunique() == 1).all()


def test_folds_refuse_fewer_blocks_than_folds():
    with pytest.raises(ProbeError, match="only 3 spatial block"):
        spatial_folds(np.array([0, 1, 0, 1]), np.array([0, 1, 2, 2]), n_folds=4, seed=0)


def test_pca_is_fitted_on_training_rows_only(monkeypatch):
    fitted: list[np.ndarray] = []

    class RecordingPCA(probe.PCA):
        def fit(self, X, y=None):
            fitted.append(np.array(X))
            return super().fit(X, y)

        def fit_transform(self, X, y=None):
            fitted.append(np.array(X))
            return super().fit_transform(X, y)

    monkeypatch.setattr(probe, "PCA", RecordingPCA)
    embeddings, s2, labels = _store(_block_labels())
    res = probe_table(embeddings, s2, labels, label="LC", **FAST)
    smp = res.samples
    raw = s2.sel(band=list(S2.bands)).values[smp.it.values, :, smp.iy.values, smp.ix.values]  # (n, band)
    n_pca_sets = sum(1 for v in res.meta["feature_sets"].values() if v["pca"] is not None)
    assert n_pca_sets == 2  # date_s2_pca7, season_pca7 (no S1, too few dates for a window)
    assert len(fitted) == 4 * len(probe.MODELS) * n_pca_sets  # one PCA per fold, set and model, none on all rows
    for k in range(4):
        train_rows = raw[smp.fold.values != k]
        matches = [f for f in fitted if f.shape == train_rows.shape and np.array_equal(f, train_rows)]
        assert len(matches) == len(probe.MODELS), f"fold {k}: date_s2 PCA did not see exactly its training rows"
    assert all(f.shape[0] < len(smp) for f in fitted)


def test_excluded_pixel_dates_and_one_row_set_for_every_feature_set():
    lab = _block_labels()
    lab[5, 5] = 0  # nodata label: all dates of this pixel out
    lab[6, 6] = 99  # "unknown": out only when passed as nodata
    embeddings, s2, labels = _store(lab)
    s2.values[0, S2.bands.index("B05"), 1, 1] = np.nan  # one band missing
    embeddings["valid"].values[1, 2, 2] = False  # no embedding (values still finite)
    embeddings["embedding"].values[2, 3, 3, 3] = np.nan  # NaN embedding feature

    mask = pixel_date_mask(embeddings, s2, labels, label="LC", nodata=(0, 99)).values
    out = {(0, 1, 1), (1, 2, 2), (2, 3, 3)} | {(t, 5, 5) for t in range(T)} | {(t, 6, 6) for t in range(T)}
    assert {tuple(map(int, i)) for i in np.argwhere(~mask)} == out
    assert mask.sum() == T * H * W - len(out)

    res = probe_table(embeddings, s2, labels, label="LC", nodata=(0, 99), max_samples=10_000, **FAST)
    used = set(zip(res.samples.it, res.samples.iy, res.samples.ix, strict=True))
    assert used == {tuple(map(int, i)) for i in np.argwhere(mask)}
    assert res.meta["n_pixel_dates"] == len(res.samples) == mask.sum()
    folds = res.table[res.table.fold != "mean"]
    per_fold = folds.groupby("fold")[["n_train", "n_test"]].nunique()
    assert (per_fold == 1).all().all()  # every feature set and model: same train/test sizes per fold
    assert folds.groupby(["feature_set", "model"]).n_test.sum().eq(len(res.samples)).all()


def test_subsample_is_shared_and_seeded():
    store = _store(_block_labels())
    a = probe_table(*store, label="LC", max_samples=300, seed=3, **FAST)
    b = probe_table(*store, label="LC", max_samples=300, seed=3, **FAST)
    assert len(a.samples) == 300 and a.meta["n_pixel_dates_kept_classes"] == T * H * W
    pd.testing.assert_frame_equal(a.samples, b.samples)
    pd.testing.assert_frame_equal(a.table, b.table)


def test_class_in_one_block_or_with_few_pixels_is_dropped_and_reported():
    lab = _block_labels()
    lab[:BLOCK, :BLOCK] = 77  # 16 pixels, all in block 0
    lab[8, 8] = 88  # 1 pixel
    res = probe_table(*_store(lab), label="LC", **FAST)
    dropped = res.meta["classes_dropped"]
    assert set(dropped) == {77, 88}
    assert "1 block" in dropped[77]["reason"] and dropped[77]["pixels"] == 16
    assert "min_class_pixels" in dropped[88]["reason"]
    assert not res.samples.label.isin([77, 88]).any()
    assert "Classes dropped: 77" in probe_markdown(res)


def test_clear_errors():
    embeddings, s2, labels = _store(_block_labels())
    with pytest.raises(ProbeError, match=r"no variable 'CT'.*\['LC'\]"):
        probe_table(embeddings, s2, labels, label="CT", **FAST)
    shifted = labels.assign_coords(x=labels.x + 10.0)
    with pytest.raises(ProbeError, match="labels's x grid .* differs"):
        probe_table(embeddings, s2, shifted, label="LC", **FAST)
    with pytest.raises(ProbeError, match="S2 cube's y grid"):
        probe_table(embeddings, s2.isel(y=slice(1, None)), labels, label="LC", **FAST)
    with pytest.raises(ProbeError, match="no acquisition at"):
        probe_table(embeddings, s2.isel(time=slice(1, None)), labels, label="LC", **FAST)
    one_class = labels.assign(LC=labels.LC.where(labels.LC == 11, 0).astype(np.uint16))
    with pytest.raises(ProbeError, match=r"only 1 class\(es\) of 'LC' remain.*fix"):
        probe_table(embeddings, s2, one_class, label="LC", **FAST)


# ----------------------------------------------------------------------------- the baselines' columns
def _days(offsets: list[int], start: str = "2020-03-01") -> np.ndarray:
    return (pd.Timestamp(start) + pd.to_timedelta(offsets, unit="D")).values


def _rows(feats: probe.ProbeFeatures, it: int, iy: int, ix: int) -> int:
    s = feats.samples
    hit = np.flatnonzero((s.it == it) & (s.iy == iy) & (s.ix == ix))
    assert hit.size == 1, (it, iy, ix)
    return int(hit[0])


def test_fill_linear_is_np_interp_per_series_and_flat_beyond_the_ends():
    rng = np.random.default_rng(0)
    x = np.sort(rng.choice(400, 30, replace=False)).astype(float)
    v = rng.normal(size=(5, 3, 30))
    v[rng.random(v.shape) < 0.4] = np.nan
    v[0, 0, :4] = np.nan  # a gap at the start: flat
    v[0, 0, -3:] = np.nan  # and at the end
    v[1, 1] = np.nan  # nothing to interpolate from: stays NaN
    out = fill_linear(v, x)
    for i, j in np.ndindex(5, 3):
        ok = np.isfinite(v[i, j])
        if ok.any():
            np.testing.assert_allclose(out[i, j], np.interp(x, x[ok], v[i, j, ok]), rtol=1e-12, atol=1e-12)
    assert np.isnan(out[1, 1]).all()


def test_season_is_the_monthly_mean_with_empty_months_interpolated():
    times = _days([0, 10, 55, 80, 100], start="2020-01-10")  # Jan 10, Jan 20, Mar 5, Mar 30, Apr 19: no February
    lab = np.full((4, 4), 11, dtype=np.uint16)
    lab[2:] = 13
    embeddings, s2, labels = _store(lab, times=times)
    s2.values[:, 0, 0, 0] = [1.0, 3.0, 5.0, np.nan, 7.0]  # B02: Jan 2, Feb -, Mar 5 (the NaN is left out), Apr 7
    s2.values[:, 1, 0, 0] = [np.nan, np.nan, 4.0, 6.0, 9.0]  # B03: Jan -, Feb -, Mar 5, Apr 9
    feats = probe_features(embeddings, s2, labels, label="LC")
    assert feats.meta["season"]["months"] == ["2020-01", "2020-02", "2020-03", "2020-04"]
    season = feats.sets["season_raw"].x
    assert season.shape[1] == 4 * 10  # month-major: column m * 10 + band
    row = _rows(feats, 2, 0, 0)  # any date of the pixel: the season is the pixel's, not the date's
    np.testing.assert_allclose(season[row, 0::10], [2.0, 3.5, 5.0, 7.0])  # February halfway between Jan and Mar
    np.testing.assert_allclose(season[row, 1::10], [5.0, 5.0, 5.0, 9.0])  # Jan, Feb flat before the first month
    np.testing.assert_array_equal(season[_rows(feats, 4, 0, 0)], season[row])
    b04 = s2.values[:, 2, 1, 1].astype(np.float64)  # a clear pixel: two dates in January, two in March
    jan, mar = b04[:2].mean(), b04[2:4].mean()
    np.testing.assert_allclose(season[_rows(feats, 0, 1, 1), 2::10], [jan, (jan + mar) / 2, mar, b04[4]], rtol=1e-6)
    assert feats.sets["season_pca7"].n_pca == 7 and feats.sets["season_pca7"].x is season


def test_paper_window_is_window_days_reflection():
    from stembed.inference.engine import window_days

    for n in (6, 8, 13):
        days = np.arange(n) * 5
        expected = np.stack([window_days(days, t, 11)[0] for t in range(n)])
        np.testing.assert_array_equal(paper_window(n, np.arange(n)), expected)
    with pytest.raises(ProbeError, match="needs >= 6 dates"):
        paper_window(5, np.arange(5))


def test_window_without_store_window_is_11_reflected_dates_of_the_whole_s2_series_with_clouds_interpolated():
    s2_times = _days([0, 5, 15, 22, 25, 30, 35, 40])
    lab = np.full((4, 4), 11, dtype=np.uint16)
    lab[2:] = 13
    embeddings, s2, labels = _store(lab, times=s2_times)
    embeddings = embeddings.isel(time=slice(1, None))  # the store lacks the first S2 date: the series still has it
    s2.values[3, :, 2, 3] = np.nan  # cloudy on day 22
    s2.values[7, :, 2, 3] = np.nan  # and on the last date
    feats = probe_features(embeddings, s2, labels, label="LC", features=[5])
    assert "window11_pca5" not in feats.sets and feats.meta["window"]["source"].startswith("paper")
    assert "np.interp" in feats.meta["window"]["rule"]
    v = s2.values[:, :, 2, 3].astype(np.float64)  # (time, band)
    filled = v.copy()
    filled[3] = v[2] + 0.7 * (v[4] - v[2])  # day 22 between day 15 and day 25
    filled[7] = v[6]  # flat beyond the last clear date
    x = feats.sets["window_pca5"].x
    assert x.shape[1] == 110 and feats.sets["window_pca5"].n_pca == 5
    # store date 0 = S2 date 1: frames -4..6 around it, reflected at the start
    np.testing.assert_allclose(x[_rows(feats, 0, 2, 3)].reshape(11, 10), filled[[4, 3, 2, 1, 0, 1, 2, 3, 4, 5, 6]],
                               rtol=1e-6)
    # store date 5 = S2 date 6: frames 1..11, reflected at the end (8 -> 6, 9 -> 5, 10 -> 4, 11 -> 3)
    np.testing.assert_allclose(x[_rows(feats, 5, 2, 3)].reshape(11, 10), filled[[1, 2, 3, 4, 5, 6, 7, 6, 5, 4, 3]],
                               rtol=1e-6)


def test_window_with_store_window_takes_window_dates_and_fills_empty_slots_with_the_date():
    s2_times = _days(list(range(0, 60, 5)))  # 12 dates, 5 days apart
    lab = np.full((6, 6), 11, dtype=np.uint16)
    lab[3:] = 13
    cfg = {"dates": 4, "span_days": 20.0, "density": 1.0}  # targets -5, +5, -15, +15 days
    embeddings, s2, labels = _store(lab, times=s2_times, attrs={"window": cfg})
    s2.values[6, :, 2, 3] = np.nan  # pixel (2, 3) cloudy on date 6
    s2.values[2:, :, 4, 4] = np.nan  # pixel (4, 4) observed on dates 0 and 1 only
    feats = probe_features(embeddings, s2, labels, label="LC", features=[3])
    x = feats.sets["window_pca3"].x
    assert x.shape[1] == 10 * (1 + 4) and feats.meta["window"]["config"] == {**cfg, "side": "centred"}
    v = s2.values
    # date 5 of (2, 3): -5 -> 4, +5 -> 7 (6 is cloudy; 7 is nearer day 30 than 3), -15 -> 2, +15 -> 8
    np.testing.assert_array_equal(x[_rows(feats, 5, 2, 3)].reshape(5, 10), v[[5, 4, 7, 2, 8], :, 2, 3])
    # date 0 of (4, 4): only date 1 is left for its window; the other slots hold the date's own bands
    np.testing.assert_array_equal(x[_rows(feats, 0, 4, 4)].reshape(5, 10), v[[0, 1, 0, 0, 0], :, 4, 4])
    # every row: exactly window_dates's dates
    s = feats.samples
    observed = np.isfinite(v[:, :, s.iy, s.ix]).all(axis=1).T  # (N, T)
    idx = window_dates(WindowConfig.model_validate(cfg), day_numbers(s2_times), observed, s.it.values)
    idx = np.where(idx < 0, s.it.values[:, None], idx)
    expected = np.concatenate([v[s.it, :, s.iy, s.ix], v[idx, :, s.iy.values[:, None], s.ix.values[:, None]]
                               .reshape(len(s), -1)], axis=1)
    np.testing.assert_array_equal(x, expected)
    # and the paper's window beside it, always
    w11 = feats.sets["window11_pca3"].x
    assert w11.shape[1] == 110
    np.testing.assert_array_equal(w11[_rows(feats, 5, 2, 2)].reshape(11, 10), v[0:11, :, 2, 2])


def test_bad_store_window_is_refused():
    embeddings, s2, labels = _store(_block_labels(), attrs={"window": {"dates": 3}})
    with pytest.raises(ProbeError, match="not a valid WindowConfig.*fix"):
        probe_features(embeddings, s2, labels, label="LC")


def test_date_s2s1_takes_the_nearest_s1_date_per_pixel_and_band():
    s2_times = _days([0, 10, 20])
    lab = np.full((4, 4), 11, dtype=np.uint16)
    lab[2:] = 13
    embeddings, s2, labels = _store(lab, times=s2_times)
    s1_times = _days([1, 8, 12, 21]) + np.timedelta64(17, "h")  # S1 at 17:00, on its own dates
    code = np.arange(4, dtype=np.float32)[:, None, None, None]  # value = S1 date index (+100 VV, +200 VH)
    values = np.broadcast_to(np.concatenate([100 + code, 200 + code], axis=1), (4, 2, 4, 4)).copy()
    values[0, 0, 1, 1] = np.nan  # pixel (1, 1): VV missing on S1 date 0
    feats = probe_features(embeddings, s2, labels, label="LC", s1=_s1(s2, s1_times, values), features=[7])
    fs = feats.sets["date_s2s1_pca7"]
    assert fs.scale and fs.n_pca == 7 and fs.x.shape[1] == 12
    s = feats.samples
    np.testing.assert_array_equal(fs.x[:, :10], s2.values[s.it, :, s.iy, s.ix])
    # S2 day 0 -> S1 day 1; day 10 -> day 8 (day 12 at 17:00 is farther); day 20 -> day 21
    for it, s1_date in enumerate([0, 1, 3]):
        np.testing.assert_array_equal(fs.x[_rows(feats, it, 0, 0), 10:], [100 + s1_date, 200 + s1_date])
    # pixel (1, 1) on S2 day 0: VV from its nearest date where VV is finite (day 8), VH still from day 1
    np.testing.assert_array_equal(fs.x[_rows(feats, 0, 1, 1), 10:], [101, 200])
    assert feats.meta["date_s2s1"]["rows_not_on_nearest_date"] == 1


def test_date_s2s1_nearest_date_tie_takes_the_earlier_one():
    s2_times = _days([0, 10, 20])
    lab = np.full((4, 4), 11, dtype=np.uint16)
    lab[2:] = 13
    embeddings, s2, labels = _store(lab, times=s2_times)
    values = np.broadcast_to(np.arange(2, dtype=np.float32)[:, None, None, None], (2, 2, 4, 4))
    feats = probe_features(embeddings, s2, labels, label="LC", s1=_s1(s2, _days([8, 12]), values))
    np.testing.assert_array_equal(feats.sets["date_s2s1_pca7"].x[_rows(feats, 1, 0, 0), 10:], [0, 0])


# ----------------------------------------------------------------------------- prefixes and regions
def test_prefixes_default_to_the_stores_nested_list_and_are_validated():
    embeddings, s2, labels = _store(_block_labels(), n_features=16, attrs={"nested": [7, 16]})
    feats = probe_features(embeddings, s2, labels, label="LC")
    assert [k for k in feats.sets if k.startswith("embedding")] == ["embedding7", "embedding16"]
    s = feats.samples
    emb = embeddings.embedding.values[s.it, :, s.iy, s.ix]
    np.testing.assert_array_equal(feats.sets["embedding7"].x, emb[:, :7])
    np.testing.assert_array_equal(feats.sets["embedding16"].x, emb)
    assert feats.sets["date_s2_pca7"].n_pca == 7 and feats.sets["date_s2_pca16"].n_pca == 10  # capped at 10 columns
    assert feats.sets["season_pca16"].n_pca == 10
    feats = probe_features(embeddings, s2, labels, label="LC", features=[3])
    np.testing.assert_array_equal(feats.sets["embedding3"].x, emb[:, :3])
    assert "embedding7" not in feats.sets and "date_s2_pca3" in feats.sets
    del embeddings.attrs["nested"]
    assert [k for k in probe_features(embeddings, s2, labels, label="LC").sets if k.startswith("emb")] == ["embedding16"]
    for bad in ([0], [17], [7, 20]):
        with pytest.raises(ProbeError, match=r"not between 1 and 16.*fix: ask for prefixes k with 1 <= k <= 16"):
            probe_table(embeddings, s2, labels, label="LC", features=bad, **FAST)
    embeddings.attrs["nested"] = [7, 32]
    with pytest.raises(ProbeError, match=r"prefix 32 \(from the store's 'nested' attribute\)"):
        probe_table(embeddings, s2, labels, label="LC", **FAST)


def test_region_probes_one_box_with_blocks_counted_from_its_corner():
    embeddings, s2, labels = _store(_block_labels())
    res = probe_table(embeddings, s2, labels, label="LC", region=(0, 8, 8, 16), **FAST)
    s = res.samples
    assert s.iy.between(0, 7).all() and s.ix.between(8, 15).all() and len(s) == T * 8 * 8
    np.testing.assert_array_equal(s.block, (s.iy // BLOCK) * 2 + (s.ix - 8) // BLOCK)
    assert res.meta["region"] == [0, 8, 8, 16] and res.meta["n_blocks"] == 4
    assert "in region 0:8,8:16" in probe_markdown(res)
    # the samples' positions are the store's: their embedding feature 0 is their class
    emb = embeddings.embedding.values[s.it, 0, s.iy, s.ix]
    np.testing.assert_allclose(emb, np.searchsorted([11, 13, 60], s.label), atol=0.3)


def test_bad_regions_are_refused_with_the_fix():
    assert parse_region(" 32:64, 0:16 ") == (32, 64, 0, 16)
    for text in ("32-64,0:16", "32:64", "a:b,c:d", "32:64,0:16,1:2"):
        with pytest.raises(ProbeError, match=r"is not y0:y1,x0:x1; fix: .*--region 32:64,32:64"):
            parse_region(text)
    embeddings, s2, labels = _store(_block_labels())
    for box in ((8, 8, 0, 16), (0, 8, 8, 17), (10, 4, 0, 16)):
        with pytest.raises(ProbeError, match=r"empty or outside the store's grid of 16 x 16 px; fix: give 0 <= y0"):
            probe_table(embeddings, s2, labels, label="LC", region=box, **FAST)
