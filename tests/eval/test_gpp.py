"""GPP models, baselines, splits and metrics on tiny series with hand-computed answers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stembed.eval.gpp import (
    Climatology,
    GPPConfig,
    GPPTransformer,
    SiteSplit,
    Windows,
    YearSplit,
    check_same_windows,
    common_windows,
    fit_climatology,
    fit_gpp,
    gpp_metrics,
    leave_one_site_out,
    metrics_table,
    plot_gpp_series,
    predict_gpp,
    run_gpp_experiment,
    split_by_years,
)
from stembed.eval.gpp_data import make_windows

# A config small enough to fit in seconds on a loaded CPU.
TINY = GPPConfig(window_days=8, d_model=16, n_heads=2, n_layers=1, d_ff=32, dropout=0.0, batch_size=32, lr=1e-2,
                 warmup_steps=0, max_epochs=20, early_stopping_patience=20, device="cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _windows(ends: pd.DatetimeIndex, site: str = "A", *, n_feat: int = 3, t: int = 8, seed: int = 0) -> Windows:
    """Random features; target = 2 x mean of the last day's features + 5 (learnable, no DOY signal)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(ends), t, n_feat)).astype(np.float32)
    y = (2 * x[:, -1].mean(axis=1) + 5).astype(np.float32)
    return Windows(x, np.tile(np.arange(t), (len(ends), 1)), y, pd.DatetimeIndex(ends),
                   np.full(len(ends), site, dtype=object))


# ----------------------------------------------------------------------------- metrics
def test_metrics_by_hand() -> None:
    m = gpp_metrics(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 3, 5]))
    # errors 0 1 0 1: RMSE sqrt(0.5); range 3; SStot = 2.25+0.25+0.25+2.25 = 5, SSres = 2
    assert m["n"] == 4
    assert m["rmse"] == pytest.approx(math.sqrt(0.5))
    assert m["nrmse"] == pytest.approx(math.sqrt(0.5) / 3)
    assert m["r2"] == pytest.approx(1 - 2 / 5)
    assert m["bias"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same days"):
        gpp_metrics(np.ones(3), np.ones(2))


def test_pooled_is_metrics_of_all_predictions_not_mean_of_sites() -> None:
    t = metrics_table({"A": (np.array([0.0, 1]), np.array([0.0, 1])),  # perfect: NRMSE 0
                       "B": (np.array([0.0, 10]), np.array([0.0, 0]))})  # RMSE sqrt(50), range 10
    t = t.set_index("site")
    assert t.loc["A", "nrmse"] == 0 and t.loc["B", "nrmse"] == pytest.approx(math.sqrt(50) / 10)
    # pooled: errors 0 0 0 10 -> RMSE 5, range 10 -> 0.5 (the mean of the sites would be 0.354)
    assert t.loc["pooled", "nrmse"] == pytest.approx(0.5)
    assert t.loc["pooled", "n"] == 4
    assert t.loc["pooled", "nrmse"] != pytest.approx(t.loc[["A", "B"], "nrmse"].mean())


# ----------------------------------------------------------------------------- windows and splits
def test_windows_from_make_windows() -> None:
    days = pd.date_range("2020-01-01", periods=12, freq="D")
    feats = pd.DataFrame({"E1": np.arange(12.0), "E2": np.zeros(12)}, index=days)
    w = Windows.from_make_windows(make_windows(feats, pd.Series(1.0, index=days), length_days=5, stride_days=3),
                                  site="CZ-Lnz")
    assert w.x.shape == (3, 5, 2) and w.days.tolist() == [[0, 1, 2, 3, 4]] * 3
    assert list(w.site) == ["CZ-Lnz"] * 3 and w.end_date[0] == pd.Timestamp("2020-01-05")


def test_split_by_years_uses_the_end_date() -> None:
    ends = pd.DatetimeIndex(["2019-06-01", "2020-01-05", "2020-07-01", "2021-01-01"])
    w = _windows(ends)  # 8-day windows: the one ending 2020-01-05 starts on 2019-12-29
    train, val = split_by_years(w, train_years=[2019], val_years=[2020])
    assert list(train.end_date) == [pd.Timestamp("2019-06-01")]
    assert list(val.end_date) == [pd.Timestamp("2020-01-05"), pd.Timestamp("2020-07-01")]  # 2021 dropped
    np.testing.assert_array_equal(val.x, w.x[1:3])
    with pytest.raises(ValueError, match="both"):
        split_by_years(w, [2019, 2020], [2020])


def test_leave_one_site_out_never_leaks_a_site() -> None:
    by_site = {s: _windows(pd.date_range("2019-01-01", periods=n), s) for s, n in (("A", 3), ("B", 4), ("C", 5))}
    held = []
    for site, train, test in leave_one_site_out(by_site):
        held.append(site)
        assert set(test.site) == {site} and site not in set(train.site)
        assert set(train.site) == {"A", "B", "C"} - {site} and len(train) + len(test) == 12
    assert held == ["A", "B", "C"]
    with pytest.raises(ValueError, match="at least 2 sites"):
        next(leave_one_site_out({"A": by_site["A"]}))


# ----------------------------------------------------------------------------- climatology
def test_climatology_by_hand() -> None:
    ends = pd.DatetimeIndex(["2018-01-10", "2019-01-10", "2018-01-14", "2018-04-10", "2020-12-31"])
    gpp = np.array([2.0, 4.0, 7.0, 10.0, 1.0])  # DOY 10: mean 3; 14: 7; 100: 10; 366 -> 365: 1
    clim = Climatology.fit(ends, gpp, half_window_days=7)
    query = pd.DatetimeIndex([
        "2021-01-10",  # DOY 10: seen {10, 14} in 3..17 -> (3 + 7) / 2 = 5
        "2021-01-03",  # DOY 3: seen {365, 10} in 361..10 (circular) -> (1 + 3) / 2 = 2
        "2021-01-21",  # DOY 21: seen {14} in 14..28 -> 7
        "2021-01-22",  # DOY 22: nothing in 15..29; nearest seen DOY 14 (8 days) -> its smoothed value 5
        "2021-03-01",  # DOY 60: nearest seen DOY 100 (40 days; 14 is 46) -> smoothed(100) = 10
        "2021-02-26",  # DOY 57: 14 and 100 both 43 days away -> the earlier, 14 -> 5
        "2020-12-31",  # DOY 366 -> 365: seen {365} in 358..7 -> 1
    ])
    np.testing.assert_allclose(clim.predict(query), [5, 2, 7, 5, 10, 5, 1])
    raw = Climatology.fit(ends, gpp, half_window_days=0)
    np.testing.assert_allclose(raw.predict(pd.DatetimeIndex(["2021-01-10", "2021-01-12"])), [3, 3])  # 12: tie 10/14


# ----------------------------------------------------------------------------- transformer
def test_time_encoding_changes_the_output() -> None:
    cfg = TINY.model_copy(update={"window_days": 16})
    torch.manual_seed(0)
    model = GPPTransformer(3, cfg).eval()
    x = torch.randn(2, 8, 3)
    early, late = torch.arange(8).expand(2, 8), (torch.arange(8) + 8).expand(2, 8)
    with torch.no_grad():
        assert not torch.allclose(model(x, early), model(x, late))  # same features, other day offsets
        model.cfg = cfg.model_copy(update={"time_encoding": False})  # the authors' model as run
        assert torch.equal(model(x, early), model(x, late))


@pytest.mark.slow
def test_transformer_learns_a_simple_target_beats_climatology_and_is_deterministic() -> None:
    days = pd.date_range("2018-01-01", periods=224, freq="D")
    train, val, test = _windows(days[:128], seed=0), _windows(days[128:160], seed=1), _windows(days[160:], seed=2)
    model, history = fit_gpp(train, val, TINY, seed=0)
    pred = predict_gpp(model, test)
    m = gpp_metrics(test.target, pred)
    clim = gpp_metrics(test.target, fit_climatology(train).predict(test.end_date))
    assert m["nrmse"] < 0.05 and m["r2"] > 0.98, m  # target std is ~1.15 GPP units
    assert m["rmse"] < clim["rmse"] / 5, (m, clim)
    assert history.attrs["best_val_l1"] == history["val_l1"].min()
    assert history["val_l1"].iloc[history.attrs["best_epoch"] - 1] == history.attrs["best_val_l1"]
    assert float(model.target_mean) == pytest.approx(train.target.mean())  # from training windows

    short = TINY.model_copy(update={"max_epochs": 3})
    rng_before = torch.get_rng_state()
    a, _ = fit_gpp(train, val, short, seed=7)
    b, _ = fit_gpp(train, val, short, seed=7)
    c, _ = fit_gpp(train, val, short, seed=8)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    assert np.array_equal(predict_gpp(a, test), predict_gpp(b, test))
    assert not np.array_equal(predict_gpp(a, test), predict_gpp(c, test))


def test_fit_without_validation_warns_and_runs_all_epochs() -> None:
    train = _windows(pd.date_range("2018-01-01", periods=16))
    with pytest.warns(UserWarning, match="no validation windows"):
        _, history = fit_gpp(train, None, TINY.model_copy(update={"max_epochs": 2}), seed=0)
    assert len(history) == 2 and history.attrs["best_epoch"] == 2 and history["val_l1"].isna().all()


# ----------------------------------------------------------------------------- experiment
def _feature_sets() -> dict[str, dict[str, Windows]]:
    ends = pd.date_range("2018-01-01", "2019-12-31", freq="20D")
    emb = {s: _windows(ends, s, seed=i) for i, s in enumerate(("A", "B"))}
    ndvi = {s: Windows(w.x[:, :, :1] * 3, w.days, w.target, w.end_date, w.site) for s, w in emb.items()}
    return {"embedding": emb, "ndvi": ndvi}


def test_experiment_refuses_different_windows() -> None:
    sets = _feature_sets()
    a = sets["ndvi"]["A"]
    sets["ndvi"]["A"] = a.take(np.arange(1, len(a)))  # one window fewer
    with pytest.raises(ValueError, match="windows differ at site 'A'.*common_windows"):
        run_gpp_experiment(sets, YearSplit((2018,), (2019,)), TINY, seed=0)
    check_same_windows(common_windows(sets))  # the offered fix works
    sets = _feature_sets()
    b = sets["ndvi"]["B"]
    sets["ndvi"]["B"] = Windows(b.x, b.days, b.target + 1, b.end_date, b.site)
    with pytest.raises(ValueError, match="different GPP targets"):
        run_gpp_experiment(sets, YearSplit((2018,), (2019,)), TINY, seed=0)


def test_experiment_table_and_plot(tmp_path: Path) -> None:
    cfg = TINY.model_copy(update={"max_epochs": 1})
    table, preds = run_gpp_experiment(_feature_sets(), YearSplit((2018,), (2019,)), cfg, seed=0,
                                      return_predictions=True)
    assert set(table["feature_set"]) == {"embedding", "ndvi"}
    assert set(table["model"]) == {"transformer", "ridge", "climatology", "climatology_site"}
    assert set(table["split"]) == {"train", "val"} and set(table["site"]) == {"A", "B", "pooled"}
    rows = table.set_index(["feature_set", "model", "split", "site"])
    n = rows["n"]
    assert n[("embedding", "ridge", "val", "pooled")] == n[("embedding", "ridge", "val", "A")] + n[
        ("embedding", "ridge", "val", "B")]
    assert rows.loc[("embedding", "ridge", "val", "pooled"), "r2"] > 0.9  # the target is linear in the features
    # same target days for every feature set and model
    days = preds.groupby(["feature_set", "model", "split"])["end_date"].apply(lambda s: tuple(sorted(s)))
    assert days.xs("val", level="split").nunique() == 1

    with pytest.warns(UserWarning, match="no validation windows"):  # SiteSplit() holds no years back
        loso = run_gpp_experiment(_feature_sets(), SiteSplit(), cfg, seed=0)
    assert set(loso["split"]) == {"test"} and "climatology_site" not in set(loso["model"])

    site = preds[(preds["site"] == "A") & (preds["split"] == "val") & (preds["feature_set"] == "embedding")]
    wide = site.pivot(index="end_date", columns="model", values="pred")
    obs = site.groupby("end_date")["obs"].first()
    png = plot_gpp_series(wide.index, obs.loc[wide.index].to_numpy(),
                          {m: wide[m].to_numpy() for m in wide.columns}, tmp_path / "a.png", "site A")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
