"""The early-season curve (stembed.eval.probe_curve, ``stembed eval probe --by-date``): one row per cut-off, set
and model; only pixel-dates up to the cut-off counted; the to-date and date S2 + S1 baselines never read a later
value, the window baseline reads later ones exactly when the store's window is not trailing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from typer.testing import CliRunner

from stembed.cli import app
from stembed.eval import probe
from stembed.eval.probe import pixel_date_mask
from stembed.eval.probe_curve import CURVE_COLUMNS, cutoffs, probe_by_date, probe_curve_features
from stembed.io.cube import open_scene, save_scene
from stembed.io.embeddings import open_embeddings
from stembed.testing import synthetic_scene, write_embedding_store

runner = CliRunner()
FAST: dict[str, Any] = {"block_px": 6, "n_folds": 2, "min_class_pixels": 10, "n_estimators": 5, "features": [3]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("curve")
    scene = synthetic_scene(seed=2, height_px=24, width_px=24, n_days=90)
    save_scene(scene, d / "scene.zarr")
    # a stand-in store: 7 of the bands as "embedding" (the harness, not a model, is tested)
    write_embedding_store(d / "emb.zarr", scene.s2, scene.s2.values[:, :7].astype(np.float32), tile_px=8,
                          time_chunk=8, attrs={})
    return {"cube": d / "scene.zarr", "emb": d / "emb.zarr"}


def _open(inputs: dict[str, Path]) -> tuple[xr.Dataset, xr.DataArray, xr.Dataset]:
    scene = open_scene(inputs["cube"], check_values=False)
    assert scene.labels is not None
    return open_embeddings(inputs["emb"]), scene.s2.load(), scene.labels.load()


def _s1(inputs: dict[str, Path]) -> xr.DataArray:
    scene = open_scene(inputs["cube"], check_values=False)
    assert scene.s1 is not None
    return scene.s1.load()


def _days(da: xr.DataArray) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(da.time.values).floor("D")


def _redraw(da: xr.DataArray, where: np.ndarray, seed: int) -> xr.DataArray:
    """``da`` with every value on the dates ``where`` redrawn at random."""
    out = da.copy(data=da.values.copy())
    out.values[where] = np.random.default_rng(seed).uniform(0, 1, size=out.values[where].shape)
    return out


def test_cutoffs_step_from_the_first_date_and_end_on_the_last():
    times = pd.to_datetime(["2020-01-03T10:30", "2020-01-20T00:00", "2020-02-10T11:00"]).values
    assert [str(c) for c in cutoffs(times, 15)] == ["2020-01-18", "2020-02-02", "2020-02-10"]
    assert [str(c) for c in cutoffs(times[:1], 15)] == ["2020-01-03"]
    with pytest.raises(probe.ProbeError, match="--step-days 1 or more"):
        cutoffs(times, 0)


def test_one_row_per_cutoff_set_and_model_and_only_the_window_sets_see_the_future(inputs):
    emb, s2, labels = _open(inputs)
    res = probe_by_date(emb, s2, labels, label="land_cover", s1=_s1(inputs), step_days=15, max_samples=300, **FAST)
    t = res.table
    assert tuple(t.columns) == CURVE_COLUMNS
    cuts = pd.to_datetime(t["cutoff"].drop_duplicates()).reset_index(drop=True)
    sets = ["embedding3", "date_s2s1_pca3", "window_pca3", "to_date_pca3", "date_s2"]
    assert list(dict.fromkeys(t.feature_set)) == [*sets, "none"]  # CURVE_SETS order, the chance level last
    assert len(t) == len(cuts) * (len(sets) * len(probe.MODELS) + 1)
    assert set(zip(t.feature_set, t.model, strict=True)) == {(s, m) for s in sets for m in probe.MODELS} | {
        probe.BASELINE}  # the chance level at every cut-off
    first, last = (pd.Timestamp(pd.DatetimeIndex(emb.time.values).floor("D")[i]) for i in (0, -1))
    steps = cuts.diff().dropna().dt.days
    assert cuts[0] == first + pd.Timedelta(days=15) and cuts.iloc[-1] == last
    assert (steps.iloc[:-1] == 15).all() and 0 < steps.iloc[-1] <= 15
    sees = t.groupby("feature_set")["sees_future"].agg(set).to_dict()
    assert sees == {"embedding3": {True}, "window_pca3": {True}, "date_s2s1_pca3": {False}, "to_date_pca3": {False},
                    "date_s2": {False}, "none": {False}}  # no window attribute: the paper's 11 dates around the date
    assert t["skipped_reason"].isna().all() and t["macro_f1_mean"].between(0, 1).all()
    emb.attrs["window"] = {"dates": 16, "span_days": 180.0}  # a centred window reads later dates
    centred = probe_by_date(emb, s2, labels, label="land_cover", step_days=60, max_samples=100, **FAST)
    sees = centred.table.groupby("feature_set")["sees_future"].agg(set).to_dict()
    assert {name for name, v in sees.items() if v == {True}} == {"embedding3", "window_pca3"}
    assert "date_s2s1_pca3" not in sees  # no S1 cube: left out, and said so
    assert centred.meta["skipped"] == {"date_s2s1_pca<k>": "no S1 cube given (s1=None)"}
    assert "Not built: `date_s2s1_pca<k>` (no S1 cube given (s1=None))." in centred.markdown()
    emb.attrs["window"] = {"dates": 16, "span_days": 180.0, "side": "trailing"}
    trailing = probe_by_date(emb, s2, labels, label="land_cover", step_days=60, max_samples=100, **FAST).table
    assert not trailing["sees_future"].any()


def test_n_samples_counts_only_pixel_dates_up_to_the_cutoff(inputs):
    emb, s2, labels = _open(inputs)
    t = probe_by_date(emb, s2, labels, label="land_cover", step_days=20, max_samples=10**6, **FAST).table
    mask = pixel_date_mask(emb, s2, labels, label="land_cover")
    day = pd.DatetimeIndex(mask.time.values).floor("D")
    per_cut = t.drop_duplicates("cutoff").set_index("cutoff")["n_samples"]
    for cut, n in per_cut.items():
        assert n == int(mask.values[day <= pd.Timestamp(cut)].sum()), cut  # every class is kept on this scene
    assert per_cut.is_monotonic_increasing and per_cut.iloc[0] < per_cut.iloc[-1]


def test_to_date_features_ignore_every_s2_value_after_the_cutoff_but_not_one_before(inputs):
    emb, s2, labels = _open(inputs)
    cut = str(cutoffs(emb.time.values, 30)[0])
    ref = probe_curve_features(emb, s2, labels, label="land_cover", cutoff=cut, features=[3])
    after = pd.DatetimeIndex(s2.time.values).floor("D") > pd.Timestamp(cut)
    assert after.any() and not after.all()
    changed = s2.copy(data=s2.values.copy())
    changed.values[after] = np.random.default_rng(1).uniform(-5, 5, size=changed.values[after].shape)
    other = probe_curve_features(emb, changed, labels, label="land_cover", cutoff=cut, features=[3])
    pd.testing.assert_frame_equal(ref.samples, other.samples)
    for name in ("to_date_pca3", "date_s2"):
        np.testing.assert_array_equal(ref.sets[name].x, other.sets[name].x)
    row = ref.samples.iloc[0]
    earlier = s2.copy(data=s2.values.copy())
    t2 = int(np.flatnonzero(s2.time.values == emb.time.values[row.it])[0])
    earlier.values[t2, 0, row.iy, row.ix] += 0.25
    moved = probe_curve_features(emb, earlier, labels, label="land_cover", cutoff=cut, features=[3])
    assert not np.array_equal(ref.sets["to_date_pca3"].x, moved.sets["to_date_pca3"].x)


def test_a_trailing_window_baseline_ignores_every_value_after_the_cutoff_a_centred_one_does_not(inputs):
    emb, s2, labels = _open(inputs)
    s1 = _s1(inputs)
    cut = str(cutoffs(emb.time.values, 10)[0])
    after2, after1 = _days(s2) > pd.Timestamp(cut), _days(s1) > pd.Timestamp(cut)
    assert after2.any() and not after2.all() and after1.any() and not after1.all()
    gap = np.abs(s2.time.values[~after2][:, None] - s1.time.values[None, :])  # (S2 dates to the cut, S1 dates)
    assert after1[gap.argmin(axis=1)].any()  # a date to the cut whose nearest S1 date lies after it
    later = (_redraw(s2, after2, 1), _redraw(s1, after1, 2))
    first_date = np.asarray(_days(s2) == _days(s2)[0])
    earlier = (_redraw(s2, first_date, 3), _redraw(s1, ~after1, 4))  # the first S2 date, the S1 up to the cut

    def build(window: dict[str, Any], s2_: xr.DataArray, s1_: xr.DataArray) -> probe.ProbeFeatures:
        emb.attrs["window"] = window
        got = probe_curve_features(emb, s2_, labels, label="land_cover", cutoff=cut, s1=s1_, features=[3])
        assert list(got.sets) == ["embedding3", "date_s2s1_pca3", "window_pca3", "to_date_pca3", "date_s2"]
        assert not got.skipped
        return got

    trailing = {"dates": 4, "span_days": 40.0, "side": "trailing"}
    ref = build(trailing, s2, s1)
    other = build(trailing, *later)
    pd.testing.assert_frame_equal(ref.samples, other.samples)
    for name, fs in ref.sets.items():
        np.testing.assert_array_equal(fs.x, other.sets[name].x, err_msg=name)  # nothing after the cut-off is read
    # what it reads before the date counts: the rows dated after the first date move with that date's values
    moved = build(trailing, *earlier)
    later_rows = ~first_date[ref.samples["it"].to_numpy()]  # the store's dates are the S2 cube's
    assert (moved.sets["window_pca3"].x[later_rows] != ref.sets["window_pca3"].x[later_rows]).any()
    assert not np.array_equal(moved.sets["date_s2s1_pca3"].x, ref.sets["date_s2s1_pca3"].x)

    centred = {"dates": 4, "span_days": 40.0}
    ref, other = build(centred, s2, s1), build(centred, *later)
    assert not np.array_equal(ref.sets["window_pca3"].x, other.sets["window_pca3"].x)  # reads after the cut-off
    for name in ("date_s2s1_pca3", "to_date_pca3", "date_s2"):  # the date's and the to-date sets still do not
        np.testing.assert_array_equal(ref.sets[name].x, other.sets[name].x, err_msg=name)


def test_a_set_not_built_at_a_cutoff_is_a_skipped_row_of_that_set_only(inputs):
    emb, s2, labels = _open(inputs)
    s1 = _s1(inputs)
    late = s1.assign_coords(time=s1.time.values + np.timedelta64(50, "D"))  # the first S1 date after the first cut
    res = probe_by_date(emb, s2, labels, label="land_cover", s1=late, step_days=40, max_samples=100, **FAST)
    t = res.table
    first = t["cutoff"].iloc[0]
    assert pd.Timestamp(first) < pd.Timestamp(late.time.values[0]) <= pd.Timestamp(t["cutoff"].iloc[-1])
    skipped = t[t["skipped_reason"].notna()]
    assert set(skipped.cutoff) == {first} and set(skipped.feature_set) == {"date_s2s1_pca3"}
    assert (skipped.skipped_reason == "no S1 date on or before the cut-off").all()
    assert skipped.macro_f1_mean.isna().all() and t.loc[t.skipped_reason.isna(), "macro_f1_mean"].notna().all()
    assert f"- {first}, date_s2s1_pca3: no S1 date on or before the cut-off" in res.markdown()


def _probe_args(inputs: dict[str, Path], out: Path) -> list[str]:
    return ["eval", "probe", "--embeddings", str(inputs["emb"]), "--cube", str(inputs["cube"]), "--label",
            "land_cover", "--out", str(out), "--block-px", "6", "--folds", "2", "--samples", "150", "--features", "3"]


def test_cli_by_date_writes_the_csv_png_and_markdown(inputs, tmp_path):
    out = tmp_path / "curve"
    r = runner.invoke(app, [*_probe_args(inputs, out), "--by-date", "--step-days", "40"])
    assert r.exit_code == 0, r.output
    names = [f"probe_land_cover_by_date.{s}" for s in ("csv", "png", "md")]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert all(n in r.output for n in names)
    table = pd.read_csv(out / names[0])
    assert table["cutoff"].nunique() >= 2 and "probe_land_cover_by_date.png" in (out / names[2]).read_text()


@pytest.mark.parametrize(("extra", "expect"), [
    (["--by-date", "--step-days", "0"], "fix: give --step-days 1 or more"),
    (["--step-days", "30"], "--step-days sets the cut-offs of --by-date; fix: add --by-date"),
])
def test_cli_refuses_a_bad_step_in_one_line(inputs, tmp_path, extra, expect):
    out = tmp_path / "curve"
    r = runner.invoke(app, [*_probe_args(inputs, out), *extra])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0]
    assert not out.exists()


def test_a_cutoff_that_cannot_be_cross_validated_is_a_skipped_row_not_an_error(inputs):
    emb, s2, labels = _open(inputs)
    fast = {**FAST, "min_class_pixels": 10**5}  # no class has that many pixels: every cut-off is skipped
    res = probe_by_date(emb, s2, labels, label="land_cover", step_days=60, max_samples=100, **fast)
    t = res.table
    assert t["skipped_reason"].str.contains("min_class_pixels").all() and t["macro_f1_mean"].isna().all()
    assert "Skipped cut-offs:" in res.markdown()
