"""``stembed embed --extend`` (issue #26): a store grows with the dates its cube gained, and only the old pixel-dates
whose inputs changed are written again (``stembed.inference.extend``).

The cubes: one synthetic scene of 12 S2 dates, and the same scene as a cube built up to its 10th S2 date held it
(its first 10 S2 dates, S1 up to a cut-off day). Two cut-offs: the day before the 11th S2 date (no old S2 date's S1
match moves), and the 10th S2 date's time itself (the 10th date's nearest S1 date then arrives with the
extension). Bundles: untrained, seeded (only the arithmetic matters here).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from stembed.cli import app
from stembed.config import EmbedConfig, FusionConfig, WindowConfig, ae_preset
from stembed.contract import Scene
from stembed.data.sampling import day_numbers
from stembed.errors import UserError
from stembed.inference import extend as ext
from stembed.inference.extend import changed_set, moved_dates
from stembed.inference.run import embed_cube
from stembed.io import embeddings as store
from stembed.io.cube import save_scene
from stembed.io.embeddings import EmbeddingStoreError, EmbedError, open_embeddings
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.bundle import save_bundle
from stembed.models.context import ContextFusionModel
from stembed.sensors import SENSORS
from stembed.testing import random_fusion_bundle, synthetic_scene

N_OLD = 10
CFG = EmbedConfig(tile_px=12, batch_size=64, threads_per_worker=1)  # 4 tiles of the 24 x 24 px scene
ARRAYS = ("embedding", "valid", "extension", "tile_error", "tile_done", "extension_tile", "time")


class Killed(BaseException):
    """A kill, as a step sees it (not an Exception: nothing may catch it)."""


# ----------------------------------------------------------------------------- the rule, on small arrays
def test_the_paper_fusion_recomputes_the_dates_whose_stage1_window_reads_otherwise() -> None:
    days_old, days_new = np.arange(10) * 5, np.arange(12) * 5
    observed = np.ones((12, 3), dtype=bool)
    observed[8, 1] = False  # a cloudy pixel-date is never embedded, so never changed
    none = np.zeros(10, dtype=bool)
    got = changed_set(None, 5, days_old, days_new, observed, none)  # 5 frames: the last 2 dates reflect
    want = np.zeros((10, 3), dtype=bool)
    want[8:] = True
    want[8, 1] = False
    np.testing.assert_array_equal(got, want)
    moved = none.copy()
    moved[4] = True  # date 4's S1 match moved: every window holding it (dates 2..6) reads otherwise
    got = changed_set(None, 5, days_old, days_new, observed, moved)
    np.testing.assert_array_equal(got.any(axis=1), [False, False, True, True, True, True, True, False, True, True])
    np.testing.assert_array_equal(changed_set(None, 5, days_old, days_old, observed[:10], none), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="start with the old"):
        changed_set(None, 5, days_old, days_new + 1, observed, none)


def test_a_centred_window_changes_where_it_takes_a_new_date_or_a_date_whose_latent_changed() -> None:
    window = WindowConfig(dates=2, span_days=10, density=1.0)  # targets -5 and +5 days: the nearest free dates
    days_old, days_new = np.arange(10) * 10, np.arange(12) * 10
    observed = np.ones((12, 2), dtype=bool)
    observed[9, 1] = False  # pixel 1: its date 8's window took date 6 after it; now it takes the new date 10
    got = changed_set(window, 3, days_old, days_new, observed, np.zeros(10, dtype=bool))
    # pixel 0: date 9 takes the new date 10 (it took 7); date 8 reads date 9, whose 3-frame latent reflected
    np.testing.assert_array_equal(np.flatnonzero(got[:, 0]), [8, 9])
    np.testing.assert_array_equal(np.flatnonzero(got[:, 1]), [8])


def test_a_trailing_window_changes_nothing_unless_a_match_moved() -> None:
    rng = np.random.default_rng(0)
    window = WindowConfig(dates=4, span_days=40, side="trailing")
    days_new = np.cumsum(rng.integers(3, 12, 30))
    observed = rng.random((30, 50)) < 0.6
    n_frames, first = 11, 5
    for n_old in (6, 20, 29):
        got = changed_set(window, n_frames, days_new[:n_old], days_new, observed, np.zeros(n_old, dtype=bool))
        assert not got.any()
    moved = np.zeros(20, dtype=bool)
    moved[12] = True
    got = changed_set(window, n_frames, days_new[:20], days_new, observed, moved)
    assert not got[:12].any()  # a trailing embedding never reads a later date
    np.testing.assert_array_equal(got[12], observed[12])  # the date itself: its own inputs moved
    assert not got[:first].any()


def test_a_new_s1_date_moves_the_match_of_an_old_s2_date_it_is_nearer_to() -> None:
    s2 = np.array(["2020-01-01T10", "2020-01-11T10", "2020-01-21T10"], dtype="datetime64[ns]")
    s1_old = np.array(["2020-01-02T17", "2020-01-15T17"], dtype="datetime64[ns]")
    s1_new = np.concatenate([s1_old, np.array(["2020-01-22T17"], dtype="datetime64[ns]")])
    moved = moved_dates(s2, {"s1": s1_old}, {"s1": s1_new}, {"s1": 6.0})
    np.testing.assert_array_equal(moved, [False, False, True])  # Jan 21: Jan 15 (5.7 days) gives way to Jan 22
    assert not moved_dates(s2, {"s1": s1_new}, {"s1": s1_new}, {"s1": 6.0}).any()
    np.testing.assert_array_equal(moved_dates(s2, {"s1": s1_old[:0]}, {"s1": s1_old[:1]}, {"s1": 6.0}),
                                  [True, False, False])  # no S1 date before: only Jan 1 gets one within 6 days


# ----------------------------------------------------------------------------- stores
def _cut(scene: Scene, n: int, end: np.datetime64) -> Scene:
    """The scene as a cube built up to ``end`` held it: its first ``n`` S2 dates, the other sensors' up to ``end``."""
    sensors = {k: c.isel(time=slice(0, n)) if k == "s2" else c.isel(time=np.flatnonzero(c["time"].values <= end))
               for k, c in scene.sensors.items()}
    return Scene(site=scene.site, sensors=sensors, labels=scene.labels)


def _context_bundle(path: Path, window: WindowConfig) -> Path:
    torch.manual_seed(0)
    aes = {k: SensorAutoencoder(ae_preset("tiny-dense", k)) for k in ("s1", "s2")}
    cfg = FusionConfig(embed_dim=6, nested=(3, 6), window=window, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                       dropout=0.0, direct_path=True, season_hidden=8)
    config = {"model": cfg.model_dump(mode="json"), "models": {k: a.cfg.model_dump(mode="json") for k, a in aes.items()}}
    return Path(save_bundle(path, kind="fusion", sensor=None, model=ContextFusionModel(aes, cfg), config=config,
                            sensors={k: SENSORS[k] for k in ("s1", "s2")}, provenance={"note": "random weights"}))


@pytest.fixture(scope="module")
def scene() -> Scene:
    return synthetic_scene(seed=3, height_px=24, width_px=24, n_days=70)  # 12 S2 dates


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, scene: Scene) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("extend")
    t2 = scene.s2["time"].values
    return {
        "dir": d,
        "cube": save_scene(scene, d / "cube.zarr"),
        "old": save_scene(_cut(scene, N_OLD, t2[N_OLD] - np.timedelta64(1, "D")), d / "old.zarr"),
        "old_moved": save_scene(_cut(scene, N_OLD, t2[N_OLD - 1]), d / "old_moved.zarr"),
        "older": save_scene(_cut(scene, 8, t2[8] - np.timedelta64(1, "D")), d / "older.zarr"),
        "paper": Path(random_fusion_bundle(d / "paper.pt", seed=0, preset="tiny-dense")),
        "trailing": _context_bundle(d / "trailing.pt", WindowConfig(dates=4, span_days=60, side="trailing")),
        "centred": _context_bundle(d / "centred.pt", WindowConfig(dates=4, span_days=20)),
    }


_MADE: dict[tuple[str, str], Path] = {}
_COPIES = [0]


def _store(files: dict[str, Path], cube: str, bundle: str) -> Path:
    """A store of ``cube`` with ``bundle`` (embedded once, copied to a new path each call)."""
    key = (cube, bundle)
    if key not in _MADE:
        _MADE[key] = files["dir"] / f"made-{cube}-{bundle}.zarr"
        embed_cube(files[cube], files[bundle], _MADE[key], CFG, progress=False)
    _COPIES[0] += 1
    out = files["dir"] / f"{cube}-{bundle}-{_COPIES[0]}.zarr"
    shutil.copytree(_MADE[key], out)
    return out


def _extend(files: dict[str, Path], out: Path, bundle: str, cfg: EmbedConfig = CFG, **kw: Any) -> Any:
    return embed_cube(files[kw.pop("cube", "cube")], files[bundle], out, cfg, progress=False, extend=True, **kw)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(path, mode="r")
    return {k: np.asarray(a[...]) for k, a in g.arrays() if k in ARRAYS}


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()}


def _expected_changed(scene: Scene, old_cube: Scene, window: WindowConfig | None) -> np.ndarray:
    """The rule, from the cubes alone: ``(n_old, y, x)``."""
    new_t = scene.s2["time"].values
    observed = np.isfinite(scene.s2.values).any(axis=1)  # (time, y, x)
    moved = moved_dates(new_t[:N_OLD], {"s1": old_cube.s1["time"].values}, {"s1": scene.s1["time"].values},
                        {"s1": 6.0}, trailing=window is not None and window.side == "trailing")  # the bundles' tolerance
    days = day_numbers(new_t)
    got = changed_set(window, 11, days[:N_OLD], days, observed.reshape(len(new_t), -1), moved)
    return got.reshape(N_OLD, *observed.shape[1:])


# ----------------------------------------------------------------------------- (i) trailing: nothing old changes
def test_a_trailing_store_extended_equals_the_whole_run_bit_for_bit_and_keeps_every_old_value(
    files: dict[str, Path], scene: Scene, one_torch_thread: None
) -> None:
    out = _store(files, "old", "trailing")
    before = _arrays(out)
    res = _extend(files, out, "trailing")
    assert (res.dates_added, res.pixel_dates_recomputed, res.tiles_written) == (2, 0, 4)
    got, whole = _arrays(out), _arrays(_store(files, "cube", "trailing"))
    for k in ("embedding", "valid", "time"):
        assert np.array_equal(got[k], whole[k], equal_nan=True), k
    assert np.array_equal(got["embedding"][:N_OLD], before["embedding"], equal_nan=True)  # no old value written
    assert (got["extension"][:N_OLD] == 0).all() and (got["extension"][N_OLD:] == 1).all()
    ds = open_embeddings(out)
    assert ds["extension"].dims == ("time", "y", "x") and "extension_tile" not in ds
    rec = ds.attrs["extensions"]
    assert len(rec) == 1 and rec[0]["old_dates"] == N_OLD and rec[0]["new_dates"] == 12 and rec[0]["recomputed"] == {}
    whole_attrs = open_embeddings(_MADE[("cube", "trailing")]).attrs
    assert ds.attrs["fingerprint"] == whole_attrs["fingerprint"] and ds.attrs["sensor_dates"] == whole_attrs["sensor_dates"]
    assert "extending" not in ds.attrs and ds.attrs["complete"] is True
    assert not _expected_changed(scene, _cut(scene, N_OLD, scene.s2["time"].values[N_OLD] - np.timedelta64(1, "D")),
                                 WindowConfig(dates=4, span_days=60, side="trailing")).any()
    again = _extend(files, out, "trailing")  # the cube has no new date now
    assert again.dates_added == 0 and again.tiles_written == 0 and _arrays(out)["embedding"].shape == got["embedding"].shape


def test_a_trailing_store_keeps_its_last_date_when_a_later_s1_date_arrives(
    files: dict[str, Path], scene: Scene, one_torch_thread: None
) -> None:
    """The old cube ends on its last S2 date, and the next S1 date (within the 6-day tolerance) comes with the
    extension: a centred model's match of that date moves to it (the paper bundle's test below), a trailing
    model matches S1 on or before the date only, so nothing old is rewritten and the result is the whole run's."""
    old_moved = _cut(scene, N_OLD, scene.s2["time"].values[N_OLD - 1])
    s2_t, s1_new = scene.s2["time"].values[:N_OLD], scene.s1["time"].values
    assert moved_dates(s2_t, {"s1": old_moved.s1["time"].values}, {"s1": s1_new}, {"s1": 6.0}).any()
    assert not moved_dates(s2_t, {"s1": old_moved.s1["time"].values}, {"s1": s1_new}, {"s1": 6.0}, trailing=True).any()
    out = _store(files, "old_moved", "trailing")
    before = _arrays(out)
    res = _extend(files, out, "trailing")
    got, whole = _arrays(out), _arrays(_store(files, "cube", "trailing"))
    assert np.array_equal(got["embedding"], whole["embedding"], equal_nan=True)
    assert res.pixel_dates_recomputed == 0 and (got["extension"][:N_OLD] == 0).all()
    assert np.array_equal(got["embedding"][:N_OLD], before["embedding"], equal_nan=True)


def test_two_extensions_in_a_row_equal_one_and_the_store_says_which_wrote_what(
    files: dict[str, Path], one_torch_thread: None
) -> None:
    out = _store(files, "older", "trailing")
    assert _extend(files, out, "trailing", cube="old").dates_added == 2
    assert _extend(files, out, "trailing").dates_added == 2
    got, whole = _arrays(out), _arrays(_store(files, "cube", "trailing"))
    assert np.array_equal(got["embedding"], whole["embedding"], equal_nan=True)
    np.testing.assert_array_equal(got["extension"].max(axis=(1, 2)), [0] * 8 + [1, 1, 2, 2])
    np.testing.assert_array_equal(got["extension"].min(axis=(1, 2)), [0] * 8 + [1, 1, 2, 2])
    rec = open_embeddings(out).attrs["extensions"]
    assert [(e["number"], e["old_dates"], e["new_dates"]) for e in rec] == [(1, 8, 10), (2, 10, 12)]


def test_an_int8_store_grows_with_its_own_scale_and_keeps_its_old_codes(
    files: dict[str, Path], one_torch_thread: None
) -> None:
    cfg = CFG.model_copy(update={"dtype": "int8"})
    out = files["dir"] / "int8.zarr"
    embed_cube(files["old"], files["trailing"], out, cfg, progress=False)
    g = zarr.open_group(out, mode="r")
    before = {k: np.asarray(a[...]) for k, a in g.arrays() if k.startswith("embedding_")}
    scale = store.store_quantisation(out)
    _extend(files, out, "trailing", cfg)
    q = store.store_quantisation(out)
    assert np.array_equal(q.scale, scale.scale) and np.array_equal(q.offset, scale.offset)
    after = {k: np.asarray(a[...]) for k, a in zarr.open_group(out, mode="r").arrays() if k.startswith("embedding_")}
    assert before.keys() == after.keys() and len(before) == 6
    for k, v in before.items():
        np.testing.assert_array_equal(after[k][:N_OLD], v)
    ds = open_embeddings(out)
    whole = open_embeddings(_MADE[("cube", "trailing")])
    err = max(ds.attrs["storage_error"]["max_abs"])
    np.testing.assert_array_equal(ds["valid"].values, whole["valid"].values)
    np.testing.assert_allclose(ds["embedding"].values[N_OLD:], whole["embedding"].values[N_OLD:], atol=err + 1e-6)


def test_a_store_that_predates_the_sensor_record_is_extended_from_its_last_s2_date(
    files: dict[str, Path], one_torch_thread: None
) -> None:
    out = _store(files, "old_moved", "paper")
    g = zarr.open_group(out, mode="r+")
    g.attrs.put({k: v for k, v in store.read_attrs(out).items() if k != "sensor_dates"})
    res = _extend(files, out, "paper")
    assert any("does not record its cube's s1 dates" in n for n in res.notes)
    got, whole = _arrays(out), _arrays(_store(files, "cube", "paper"))
    np.testing.assert_allclose(got["embedding"], whole["embedding"], rtol=0, atol=1e-5)
    assert open_embeddings(out).attrs["sensor_dates"]["s1"]["count"] == 11


# ----------------------------------------------------------------------------- (ii) centred and paper
@pytest.mark.parametrize("bundle", ["centred", "paper"])
def test_an_extended_store_equals_the_whole_run_and_rewrites_exactly_the_changed_set(
    files: dict[str, Path], scene: Scene, bundle: str, one_torch_thread: None
) -> None:
    out = _store(files, "old_moved", bundle)
    before = _arrays(out)
    res = _extend(files, out, bundle)
    got, whole = _arrays(out), _arrays(_store(files, "cube", bundle))
    np.testing.assert_array_equal(got["valid"], whole["valid"])
    np.testing.assert_allclose(got["embedding"], whole["embedding"], rtol=0, atol=1e-5)
    window = None if bundle == "paper" else WindowConfig(dates=4, span_days=20)
    changed = _expected_changed(scene, _cut(scene, N_OLD, scene.s2["time"].values[N_OLD - 1]), window)
    assert changed.any() and not changed.all() and res.pixel_dates_recomputed == int(changed.sum())
    np.testing.assert_array_equal(got["extension"][:N_OLD], changed.astype(np.uint8))
    assert (got["extension"][N_OLD:] == 1).all()
    keep = ~changed[:, None]
    assert np.array_equal(np.where(keep, got["embedding"][:N_OLD], 0), np.where(keep, before["embedding"], 0),
                          equal_nan=True)  # bit for bit
    stale = ~np.isclose(before["embedding"], whole["embedding"][:N_OLD], rtol=0, atol=1e-5, equal_nan=True).all(axis=1)
    assert (stale & before["valid"] <= changed).all() and (stale & changed).any()  # the rule finds what moved
    if bundle == "paper":  # the last 5 dates reflect; date 4's window holds date 9, whose S1 match moved
        np.testing.assert_array_equal(changed.any(axis=(1, 2)), [False] * 4 + [True] * 6)
    rec = open_embeddings(out).attrs["extensions"][0]
    assert sum(rec["recomputed"].values()) == rec["recomputed_total"] == int(changed.sum())


# ----------------------------------------------------------------------------- (iii) refusals
def _other_grid(scene: Scene) -> Scene:
    return Scene(site=scene.site, sensors={k: c.assign_coords(x=c["x"] + 10.0) for k, c in scene.sensors.items()},
                 labels=None)


def _not_prefix(scene: Scene) -> Scene:
    keep = np.delete(np.arange(scene.s2.sizes["time"]), 3)
    return Scene(site=scene.site, sensors={**scene.sensors, "s2": scene.s2.isel(time=keep)}, labels=scene.labels)


@pytest.mark.parametrize(("case", "message"), [
    ("bundle", "--extend cannot grow it (bundle_sha256"),
    ("settings", "batch_size: stored 64, now 32"),
    ("grid", "not on one grid"),
    ("not_prefix", "the store's date 4 is 2020-01-24"),
    ("shorter", "is not in the cube"),
    ("daily_store", "does not grow daily stores"),
    ("daily", "does not grow daily stores"),
    ("resume", "fix: drop --resume"),
    ("overwrite", "--overwrite replaces it"),
    ("unfinished", "unfinished embedding run"),
])
def test_a_refused_extension_names_the_fix_and_leaves_the_store_untouched(
    files: dict[str, Path], scene: Scene, case: str, message: str, one_torch_thread: None
) -> None:
    out = _store(files, "old", "trailing")
    d = files["dir"]
    g = zarr.open_group(out, mode="r+")
    if case == "daily_store":  # stands in for a --daily store: its fingerprint records the daily settings
        g.attrs["fingerprint"] = {**store.read_attrs(out)["fingerprint"], "daily": {"method": "linear"}}
    if case == "unfinished":
        done = g["tile_done"]
        assert isinstance(done, zarr.Array)
        done[0, 0] = 0
        g.attrs["complete"] = False
    cubes = {"grid": lambda: _other_grid(scene), "not_prefix": lambda: _not_prefix(scene),
             "shorter": lambda: _cut(scene, 8, scene.s2["time"].values[7])}
    kw: dict[str, Any] = {}
    if case in cubes:
        files[case] = save_scene(cubes[case](), d / f"{case}.zarr", overwrite=True)
        kw["cube"] = case
    cfg = {"settings": CFG.model_copy(update={"batch_size": 32}), "daily": CFG.model_copy(update={"daily": True})}
    before = _snapshot(out)
    with pytest.raises((EmbeddingStoreError, EmbedError)) as err:
        _extend(files, out, "centred" if case == "bundle" else "trailing", cfg.get(case, CFG),
                resume=case == "resume", overwrite=case == "overwrite", **kw)
    assert message in str(err.value) and "fix:" in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(out) == before
    assert not Path(f"{out}.lock").exists()


def test_extend_needs_a_store(files: dict[str, Path]) -> None:
    with pytest.raises(EmbeddingStoreError, match="no embedding store at .*write it first"):
        _extend(files, files["dir"] / "none.zarr", "trailing")


# ----------------------------------------------------------------------------- (iv) kills
def _kill_after(calls: int, fn: Any) -> Any:
    """``fn`` for its first ``calls`` calls, then a kill."""
    left = [calls]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if left[0] == 0:
            raise Killed
        left[0] -= 1
        return fn(*args, **kwargs)

    return wrapped


def _grow_then_die(out: Path, plan: Any) -> None:
    store.grow_time(out, plan.scene.s2["time"].values)
    raise Killed


KILLS = {  # where the kill lands: (module, name, replacement)
    "after the journal": (ext, "grow_store", _kill_after(0, None)),
    "after the resize, before its step is recorded": (ext, "grow_store", _grow_then_die),
    "after the resize": (ext, "extend_tile", _kill_after(0, None)),
    "after 2 of 4 tiles": (ext, "extend_tile", _kill_after(2, ext.extend_tile)),
    "a tile written, not marked": (store, "mark_tile_extended", _kill_after(1, store.mark_tile_extended)),
    "before the finalise": (ext, "finalise_extension", _kill_after(0, None)),
}


@pytest.fixture(scope="module")
def uninterrupted(files: dict[str, Path]) -> dict[str, np.ndarray]:
    out = _store(files, "old_moved", "centred")
    _extend(files, out, "centred")
    return _arrays(out)


@pytest.mark.parametrize("where", list(KILLS))
def test_a_killed_extension_is_refused_until_the_same_command_finishes_it_with_the_same_bits(
    files: dict[str, Path], uninterrupted: dict[str, np.ndarray], where: str, monkeypatch: pytest.MonkeyPatch,
    one_torch_thread: None,
) -> None:
    out = _store(files, "old_moved", "centred")
    module, name, replacement = KILLS[where]
    with monkeypatch.context() as m:
        m.setattr(module, name, replacement)
        with pytest.raises(Killed):
            _extend(files, out, "centred")
    assert "extending" in store.read_attrs(out)
    with pytest.raises(EmbeddingStoreError, match="mid-extension .*rerun the same `stembed embed --extend`"):
        open_embeddings(out, allow_incomplete=True)
    with pytest.raises(EmbeddingStoreError, match="mid-extension, which --resume does not continue"):
        embed_cube(files["cube"], files["centred"], out, CFG, progress=False, resume=True)
    res = _extend(files, out, "centred")
    assert res.dates_added == 2
    got = _arrays(out)
    assert got.keys() == uninterrupted.keys()
    for k, v in uninterrupted.items():
        assert np.array_equal(got[k], v, equal_nan=True), (where, k)
    attrs = open_embeddings(out).attrs
    assert [e["number"] for e in attrs["extensions"]] == [1] and "tile_error_base" not in zarr.open_group(out)


# ----------------------------------------------------------------------------- (v) the command line, a cluster
def test_the_command_line_extends_says_what_it_did_and_refuses_resume(files: dict[str, Path]) -> None:
    out = _store(files, "old", "trailing")
    base = ["embed", "--cube", str(files["cube"]), "--bundle", str(files["trailing"]), "--out", str(out), "--quiet",
            "--set", "tile_px=12", "--set", "batch_size=64", "--set", "threads_per_worker=1", "--extend"]
    r = CliRunner().invoke(app, base)
    assert r.exit_code == 0, r.output
    assert "extended by 2 dates (0 old pixel-dates recomputed, 4 tiles written" in r.output
    r = CliRunner().invoke(app, base)
    assert r.exit_code == 0 and "nothing written (0 dates added)" in r.output
    r = CliRunner().invoke(app, [*base, "--resume"])
    assert r.exit_code == 2 and "fix: drop --resume" in r.output
    r = CliRunner().invoke(app, base[:-1])  # without --extend: the store exists
    assert r.exit_code == 2 and "--extend to add the dates a grown cube gained" in r.output


def test_a_cluster_extends_as_this_process_does(files: dict[str, Path], one_torch_thread: None) -> None:
    from distributed import LocalCluster

    here, there = _store(files, "old_moved", "paper"), _store(files, "old_moved", "paper")
    _extend(files, here, "paper")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        res = _extend(files, there, "paper", scheduler=cluster.scheduler_address)
    assert res.tiles_written == 4
    a, b = _arrays(here), _arrays(there)
    for k in a:
        assert np.array_equal(a[k], b[k], equal_nan=True), k


def test_the_api_passes_extend_and_refuses_it_in_memory(files: dict[str, Path]) -> None:
    import stembed

    with pytest.raises(UserError, match="extend are about an embedding store"):
        stembed.embed(files["cube"], files["trailing"], extend=True)
