"""The PCA-k baseline every trained model is shown beside: fitted on train, scored on the model's own values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stembed.training.evaluate import PCABaseline, centre_values, with_pca_baseline


def _rank_k_rows(n: int, k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows of 10 + 2 values on one fixed k-d affine subspace (its basis does not depend on ``rng``)."""
    fixed = np.random.default_rng(123)
    basis, mean = fixed.normal(size=(k, 12)), fixed.normal(size=12)
    x = rng.normal(size=(n, k)) @ basis + mean
    return {"s2": x[:, :10], "s1": x[:, 10:]}


def test_pca_k_is_exact_on_rank_k_rows_and_not_with_fewer_components() -> None:
    rng = np.random.default_rng(0)
    train, test = _rank_k_rows(500, 7, rng), _rank_k_rows(200, 7, rng)  # same subspace, new rows
    exact = PCABaseline.fit(train, 7).centre_mae(test)
    short = PCABaseline.fit(train, 6).centre_mae(test)
    assert set(exact) == {"s2", "s1"}
    assert all(v is not None and v < 1e-8 for v in exact.values())
    assert all(v is not None and v > 1e-2 for v in short.values())


def test_partly_observed_rows_are_scored_on_their_observed_values_only() -> None:
    rng = np.random.default_rng(1)
    rows = _rank_k_rows(400, 7, rng)
    pca = PCABaseline.fit(rows, 7)
    gappy = {k: v.copy() for k, v in rows.items()}
    gappy["s1"][::3] = np.nan  # S1 missing on a third of the rows: the S2 values still pin the 7 components
    gappy["s2"][1::3, :2] = np.nan  # two S2 bands missing on another third
    mae = pca.centre_mae(gappy)
    assert mae["s2"] is not None and mae["s2"] < 1e-8
    assert mae["s1"] is not None and mae["s1"] < 1e-8
    assert pca.centre_mae({"s2": np.full((3, 10), np.nan), "s1": np.full((3, 2), np.nan)}) == {"s2": None, "s1": None}


def test_fit_refuses_too_few_fully_observed_rows() -> None:
    rows = {"s2": np.full((50, 10), np.nan)}
    rows["s2"][:5] = 1.0
    with pytest.raises(ValueError, match="fully observed rows"):
        PCABaseline.fit(rows, 9)


def test_with_pca_baseline_fits_on_train_and_writes_every_split() -> None:
    rng = np.random.default_rng(2)
    centres = {name: {"s2": rng.normal(size=(60, 10))} for name in ("train", "val", "test")}
    splits = {name: {"s2": {"centre_mae": 0.1}} for name in centres}
    info = with_pca_baseline(splits, centres, 4)
    assert info == {"k": 4, "fitted_on": "train", "n_rows": 60, "sensors": ["s2"]}
    for name in centres:
        assert 0 < splits[name]["s2"]["baseline_pca_centre_mae"] < 1
    # fitted on train: train's own error is the smallest of the three (in-sample)
    assert splits["train"]["s2"]["baseline_pca_centre_mae"] < splits["test"]["s2"]["baseline_pca_centre_mae"]


def test_centre_values_take_the_centre_pixel_of_the_centre_date_and_mark_gaps() -> None:
    x = torch.arange(2 * 3 * 2 * 5 * 5, dtype=torch.float32).reshape(2, 3, 2, 5, 5)
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[1, 1, 0, 2, 2] = False
    got = centre_values(x, valid)
    assert got.shape == (2, 2)
    assert got[0].tolist() == x[0, 1, :, 2, 2].tolist()
    assert np.isnan(got[1, 0]) and got[1, 1] == x[1, 1, 1, 2, 2].item()
