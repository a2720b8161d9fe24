"""Probes (stembed.eval.probe) on hand-built stores: chance levels, blocked folds, no PCA leakage, row selection."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from stembed.eval import probe
from stembed.eval.probe import (
    ProbeError,
    pixel_date_mask,
    probe_markdown,
    probe_table,
    spatial_blocks,
    spatial_folds,
)
from stembed.sensors import S2

H = W = 16  # 16 blocks of 4 px
T = 3
BLOCK = 4
FAST = {"block_px": BLOCK, "n_folds": 4, "min_class_pixels": 10, "n_estimators": 10}


def _block_labels() -> np.ndarray:
    """Every 4x4 block: two rows of class 11, one of 13, one of 60 (shares 1/2, 1/4, 1/4 in every block)."""
    row_class = np.array([11, 11, 13, 60], dtype=np.uint16)
    return np.broadcast_to(row_class[np.arange(H) % BLOCK][:, None], (H, W)).copy()


def _store(lab: np.ndarray, *, seed: int = 0) -> tuple[xr.Dataset, xr.DataArray, xr.Dataset]:
    """Embedding whose feature 0 is the class index (+ small noise); raw S2 bands are pure noise."""
    rng = np.random.default_rng(seed)
    times = pd.date_range("2020-05-01", periods=T, freq="5D").values
    y = 5_000_000.0 - 5 - 10 * np.arange(H)
    x = 400_000.0 + 5 + 10 * np.arange(W)
    classes = np.unique(lab)
    idx = np.searchsorted(classes, lab).astype(np.float32)
    emb = rng.normal(size=(T, 7, H, W)).astype(np.float32)
    emb[:, 0] = idx[None] + rng.normal(scale=0.05, size=(T, H, W))
    embeddings = xr.Dataset(
        {"embedding": (("time", "feature", "y", "x"), emb), "valid": (("time", "y", "x"), np.ones((T, H, W), bool))},
        coords={"time": times, "feature": [f"f{i}" for i in range(7)], "y": y, "x": x},
    )
    s2 = xr.DataArray(
        rng.uniform(0.0, 0.5, size=(T, len(S2.bands), H, W)).astype(np.float32),
        dims=("time", "band", "y", "x"), coords={"time": times, "band": list(S2.bands), "y": y, "x": x},
    )
    labels = xr.Dataset({"LC": (("y", "x"), lab)}, coords={"y": y, "x": x}, attrs={"nodata": 0})
    return embeddings, s2, labels


def _cell(result: probe.ProbeResult, feature_set: str, model: str) -> pd.Series:
    s = result.summary
    return s[(s.feature_set == feature_set) & (s.model == model)].iloc[0]


def test_embedding_that_encodes_the_label_beats_noise_bands_and_majority_is_at_hand_value():
    res = probe_table(*_store(_block_labels()), label="LC", **FAST)
    for model in probe.MODELS:
        assert _cell(res, "embedding", model).macro_f1_mean > 0.95
        for fs in ("raw_bands", "raw_pca7"):
            assert _cell(res, fs, model).macro_f1_mean < 0.45, (fs, model)
    # every test fold holds 1/2 class 11, 1/4 class 13, 1/4 class 60; the training majority is 11:
    # accuracy 1/2, F1(11) = 2 * 0.5 * 1 / 1.5 = 2/3, F1(13) = F1(60) = 0, macro-F1 = 2/9
    base = res.table[(res.table.model == "majority_class") & (res.table.fold != "mean")]
    assert len(base) == 4
    np.testing.assert_allclose(base.accuracy, 0.5)
    np.testing.assert_allclose(base.macro_f1, 2 / 9)
    assert res.meta["n_pixel_dates"] == T * H * W
    assert set(res.meta["classes_kept"]) == {11, 13, 60} and res.meta["classes_dropped"] == {}
    assert set(res.summary.feature_set) == {"none", "embedding", "raw_bands", "raw_pca7"}
    md = probe_markdown(res)
    assert "| embedding (7) | random_forest |" in md and "Classes kept: 11 (128 px)" in md


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
    assert len(fitted) == 4 * len(probe.MODELS)  # one PCA per fold and model, none on all rows
    for k in range(4):
        train_rows = raw[smp.fold.values != k]
        matches = [f for f in fitted if f.shape == train_rows.shape and np.array_equal(f, train_rows)]
        assert len(matches) == len(probe.MODELS), f"fold {k}: PCA did not see exactly its training rows"
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
