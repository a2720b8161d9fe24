"""``stembed cube --extend``: a scene store that grows, offline on the local STAC catalog of the WorldCereal patch.

The stores are 16 x 16 px. Store A is built for 2018-03-01..2018-06-30 (4 S2 dates kept, 2018-06-20 dropped by the
cloud filter; 10 S1 dates, the last 2018-06-26); the reference is a single build of 2018-03-01..2018-09-30. Each
test copies A and extends the copy, so every test starts from the same bytes.

The kill tests stop the extension with an exception no code path catches (``Killed``, a ``BaseException``, as a
kill would) at each step: while fetching, after staging, inside the append of a cube, between the two cubes, before
the commit and after it. The store is then either the old one (same bytes, readable) or refused by ``open_scene``
with the command that finishes it; rerunning the same command gives the store an uninterrupted run gives.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from typer.testing import CliRunner

import stembed.cube_build.append as append_mod
import stembed.cube_build.extend as extend_mod
from stembed.cli import app
from stembed.config import CubeConfig
from stembed.cube_build import (
    CubeBuildError,
    CubeRequest,
    build_cube,
    cube_settings,
    extend_staging_dir,
    extend_store,
)
from stembed.io.cube import CubeError, open_scene, save_scene
from stembed.io.outputs import OutputError, lock_output, lock_path
from stembed.io.stac import RetryPolicy, utm_grid
from stembed.preprocess import match_s1_to_s2
from stembed.testing import StacTestServer, synthetic_scene, worldcereal_stac_catalog
from stembed.types import TIME

START, END_A, END_B = "2018-03-01", "2018-06-30", "2018-09-30"
FAST = RetryPolicy(retries=3, backoff_s=0.01)


class Killed(BaseException):
    """A simulated kill: no ``except Exception`` on the way stops it."""


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory, belgian_dir: Path) -> Path:
    """Every 6th S2 date and every 4th S1 date of the patch (as test_stac_cube.py), February to October 2018."""
    times = {}
    for key, pattern in (("s2", "S2_L2A_10m_*.nc"), ("s1", "S1_GRD-ASCENDING_20m_*.nc")):
        (path,) = sorted(belgian_dir.glob(pattern))
        with xr.open_dataset(path) as ds:
            t = pd.DatetimeIndex(ds["timestamp"].values)[:: 6 if key == "s2" else 4]
        times[key] = t[(t >= "2018-02-01") & (t <= "2018-10-31")]
    root = tmp_path_factory.mktemp("stac")
    return worldcereal_stac_catalog(belgian_dir, root, s2_times=times["s2"], s1_times=times["s1"]).parent


@pytest.fixture(scope="module")
def server(catalog: Path):
    with StacTestServer(catalog) as srv:
        yield srv


def request(server: StacTestServer, end: str) -> CubeRequest:
    import pyproj

    x, y = 501_360.0 + 300 + 80, 5_629_680.0 - 200 - 80  # the centre of a 16 px square inside the patch
    lon, lat = pyproj.Transformer.from_crs("EPSG:32631", "EPSG:4326", always_xy=True).transform(x, y)
    return CubeRequest(grid=utm_grid(point=(lon, lat), size_m=160), start=START, end=end, site="be-patch",
                       catalog=server.api, min_dates=2, retry=FAST)


@pytest.fixture(scope="module")
def store_a(tmp_path_factory: pytest.TempPathFactory, server: StacTestServer) -> Path:
    out = tmp_path_factory.mktemp("a") / "a.zarr"
    build_cube(request(server, END_A), out, progress=False)
    return out


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory, server: StacTestServer) -> Path:
    """The single build of the whole period."""
    out = tmp_path_factory.mktemp("whole") / "whole.zarr"
    build_cube(request(server, END_B), out, progress=False)
    return out


@pytest.fixture(scope="module")
def extended(tmp_path_factory: pytest.TempPathFactory, store_a: Path, server: StacTestServer) -> Path:
    """A extended to END_B by an uninterrupted run."""
    out = tmp_path_factory.mktemp("extended") / "a.zarr"
    shutil.copytree(store_a, out)
    res = extend_store(out, END_B, progress=False)
    assert (res.s2_dates_added, res.s1_dates_added, res.old_end, res.end) == (4, 7, END_A, END_B)
    return out


@pytest.fixture
def store(tmp_path: Path, store_a: Path) -> Path:
    """A fresh copy of store A."""
    out = tmp_path / "a.zarr"
    shutil.copytree(store_a, out)
    return out


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file of a store, by relative path."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def without_when(doc: Any) -> Any:
    """A provenance or attribute document without the extension records' timestamps."""
    if isinstance(doc, dict):
        return {k: without_when(v) for k, v in doc.items() if k != "when"}
    if isinstance(doc, list):
        return [without_when(v) for v in doc]
    return doc


def root_attrs(store: Path) -> dict[str, Any]:
    return json.loads((store / "zarr.json").read_text())["attributes"]


def assert_same_store(got: Path, ref: Path) -> None:
    """Same dates and values, same provenance and root attributes (but for when each extension ran)."""
    a, b = open_scene(got), open_scene(ref)
    for sensor in ("s2", "s1"):
        xr.testing.assert_identical(a.sensors[sensor].drop_attrs(), b.sensors[sensor].drop_attrs())
        pa, pb = (json.loads(s.sensors[sensor].attrs["provenance"]) for s in (a, b))
        assert without_when(pa) == without_when(pb)
    assert without_when(root_attrs(got)) == without_when(root_attrs(ref))
    assert not extend_staging_dir(got).exists() and not lock_path(got).exists()


# ----------------------------------------------------------------------------- (a) equal to a single build
def test_extending_equals_a_single_build_but_the_old_last_s1_date(store_a: Path, whole: Path, extended: Path) -> None:
    e, w, a = open_scene(extended), open_scene(whole), open_scene(store_a)
    np.testing.assert_array_equal(e.s2[TIME].values, w.s2[TIME].values)
    np.testing.assert_array_equal(e.s2.values, w.s2.values)  # S2: value for value (NaN where NaN)
    np.testing.assert_array_equal(e.s1[TIME].values, w.s1[TIME].values)
    differs = ~((e.s1.values == w.s1.values) | (np.isnan(e.s1.values) & np.isnan(w.s1.values)))
    old_last = a.s1[TIME].values[-1]
    # exactly one S1 date differs: A's last, whose centred mean in the single build takes the first new date in
    assert list(e.s1[TIME].values[differs.any(axis=(1, 2, 3))]) == [old_last]
    np.testing.assert_array_equal(e.s1.sel({TIME: old_last}).values, a.s1.sel({TIME: old_last}).values)  # as written
    # on the S2 dates (as fusion matches them): exactly the S2 dates matched to that S1 date differ
    me, mw = (match_s1_to_s2(s.s1, s.s2[TIME].values) for s in (e, w))
    differs = ~((me.values == mw.values) | (np.isnan(me.values) & np.isnan(mw.values))).all(axis=(1, 2, 3))
    assert list(me[TIME].values[differs]) == list(me[TIME].values[me["s1_time"].values == old_last])
    # the provenance is the single build's (dates, items, S1 matches), the end moved, the extension recorded
    for sensor in ("s2", "s1"):
        pe, pw = (json.loads(s.sensors[sensor].attrs["provenance"]) for s in (e, w))
        assert (pe["dates"], pe["items"], pe["period"]) == (pw["dates"], pw["items"], pw["period"])
    pe, pw = (json.loads(s.s1.attrs["provenance"]) for s in (e, w))
    assert pe["s2_dates_with_s1_within_gap"] == pw["s2_dates_with_s1_within_gap"]
    (record,) = root_attrs(extended)["extensions"]
    assert {k: record[k] for k in ("old_end", "new_end", "s2_dates_added", "s1_dates_added")} == {
        "old_end": END_A, "new_end": END_B, "s2_dates_added": 4, "s1_dates_added": 7}
    assert record["s2_searched_from"] == "2018-06-21"  # after A's last S2 date considered (06-20, dropped)
    assert record["s1_fetched_from"] == "2018-06-26" == str(pd.Timestamp(old_last).date())
    assert pe["extensions"] == [record]


# ----------------------------------------------------------------------------- (b) refusals leave the store as it was
def _no_provenance(tmp_path: Path) -> Path:
    out = tmp_path / "synthetic.zarr"
    save_scene(synthetic_scene(height_px=8, width_px=8, n_days=60), out)
    return out


@pytest.mark.parametrize(
    ("end", "config", "error", "message"),
    [
        (END_A, None, CubeBuildError, "--end 2018-06-30 is not after the store's end 2018-06-30.*fix: pass a later"),
        ("2018-05-01", None, CubeBuildError, "not after the store's end 2018-06-30"),
        ("2018-13-01", None, CubeBuildError, "is not a date; fix: use YYYY-MM-DD"),
        (END_B, {"min_dates": 4}, CubeBuildError, r"--min-dates \(min_dates\) is 4 but the store was built with 2.*fix"),
        (END_B, {"brdf": False, "s2_collection": "s2-other"}, CubeBuildError, "--no-brdf.*--s2-collection.*s2-other"),
        (END_B, {"scl_classes": [3]}, CubeBuildError, "the cloud mask given is.*fix: drop those options"),
        (END_B, {"catalog": "http://127.0.0.1:9/"}, CubeBuildError, "--catalog.*store was built with"),
    ],
    ids=["end-equal", "end-earlier", "end-not-a-date", "min-dates", "brdf-collection", "scl-classes", "catalog"],
)
def test_refusals_leave_the_store_untouched(
    store: Path, end: str, config: dict[str, Any] | None, error: type[Exception], message: str
) -> None:
    before = snapshot(store)
    cfg = cube_settings(settings=config) if config is not None else None
    with pytest.raises(error, match=message):
        extend_store(store, end, config=cfg, progress=False)
    assert snapshot(store) == before
    assert not extend_staging_dir(store).exists() and not lock_path(store).exists()


def test_settings_equal_to_the_stores_are_accepted(store: Path) -> None:
    """A setting given with the store's value (or the orbit it used for 'auto'), and the fetch settings, pass."""
    cfg = CubeConfig(min_dates=2, s1_orbit="ascending", brdf=True, retries=1, piece_months=3)
    res = extend_store(store, "2018-07-04", config=cfg, progress=False)
    assert (res.s2_dates_added, res.s1_dates_added) == (0, 0)


def test_a_store_without_cube_provenance_is_refused(tmp_path: Path) -> None:
    out = _no_provenance(tmp_path)
    before = snapshot(out)
    with pytest.raises(CubeBuildError, match="no provenance of stembed cube to extend from.*fix: build one"):
        extend_store(out, "2030-01-01", progress=False)
    assert snapshot(out) == before
    with pytest.raises(CubeBuildError, match="no stembed scene store there; fix"):
        extend_store(tmp_path / "missing.zarr", "2030-01-01", progress=False)


def test_a_plug_in_cloud_mask_must_be_named_again(store: Path) -> None:
    """A store built with a ``--cloud-mask module:Name`` plug-in records only its description: the extension needs
    the plug-in named again (and describing itself the same)."""
    meta_path = store / "s2" / "s2" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    prov = json.loads(meta["attributes"]["provenance"])
    prov["cloud_mask"] = {"kind": "cloudsen12", "weights": "cloudsen12.pt"}
    meta["attributes"]["provenance"] = json.dumps(prov)
    meta_path.write_text(json.dumps(meta))
    before = snapshot(store)
    with pytest.raises(CubeBuildError, match="cloud mask is a plug-in.*fix: pass the same --cloud-mask module:Name"):
        extend_store(store, END_B, progress=False)
    with pytest.raises(CubeBuildError, match="the cloud mask given is .*'kind': 'scl'"):
        extend_store(store, END_B, config=CubeConfig(cloud_mask="scl"), progress=False)
    assert snapshot(store) == before


def test_a_locked_store_is_refused(store: Path) -> None:
    before = snapshot(store)
    with lock_output(store, command="cube"), pytest.raises(OutputError, match="being written by another stembed run"):
        extend_store(store, END_B, progress=False)
    assert snapshot(store) == before and not extend_staging_dir(store).exists()


# ----------------------------------------------------------------------------- (c) kills at every step
def _kill_at(step: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the extension stop at ``step``; the list records the pieces built (for the resume check)."""
    built: list[str] = []

    def fail(*args: Any, **kw: Any) -> None:
        raise Killed(step)

    if step == "fetch":  # the S2 piece is staged, the S1 piece is not
        real = extend_mod.build_piece

        def second_fails(stage: Path, piece: Any, sensor: str, *args: Any) -> None:
            built.append(sensor)
            if len(built) == 2:
                raise Killed(step)
            real(stage, piece, sensor, *args)

        monkeypatch.setattr(extend_mod, "build_piece", second_fails)
    elif step == "staged":  # the new part is complete, the store not touched yet
        monkeypatch.setattr(append_mod, "mark_extending", fail)
    elif step == "inside-s2":  # S2 grown and its new dates written, its time axis not
        monkeypatch.setattr(append_mod, "write_time", fail)
    elif step == "between-cubes":  # S2 complete, S1 not started
        real_group = append_mod.append_group

        def s1_fails(store: Path, sensor: str, *args: Any) -> None:
            if sensor == "s1":
                raise Killed(step)
            real_group(store, sensor, *args)

        monkeypatch.setattr(append_mod, "append_group", s1_fails)
    elif step == "commit":  # both cubes complete, the marker still set
        monkeypatch.setattr(append_mod, "commit_extension", fail)
    elif step == "cleanup":  # committed, the staging folder still there
        monkeypatch.setattr(extend_mod, "remove_stage", fail)
    return built


def _record_pieces(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The sensors of the pieces built from now on."""
    built: list[str] = []
    real = extend_mod.build_piece

    def record(stage: Path, piece: Any, sensor: str, *args: Any) -> None:
        built.append(sensor)
        real(stage, piece, sensor, *args)

    monkeypatch.setattr(extend_mod, "build_piece", record)
    return built


def _stale_lock(store: Path) -> None:
    """The lock file a SIGKILLed run leaves: its pid is no longer running."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock_path(store).write_text(json.dumps({"stembed_output_lock": 1, "pid": dead.pid, "host": socket.gethostname(),
                                            "command": "cube --extend", "started": "2026-01-01T00:00:00"}))


@pytest.mark.parametrize("step", ["fetch", "staged", "inside-s2", "between-cubes", "commit", "cleanup"])
def test_a_killed_extension_leaves_the_old_store_or_one_the_rerun_finishes(
    store: Path, extended: Path, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(store)
    built = _kill_at(step, monkeypatch)
    with pytest.raises(Killed):
        extend_store(store, END_B, progress=False)
    if step in ("fetch", "staged"):  # the old store, readable, not one byte changed
        assert snapshot(store) == before
        assert open_scene(store).s2.sizes[TIME] == 4
    elif step == "cleanup":  # complete already
        assert_same_store_but_staging(store, extended)
    else:  # refused, naming the fix; and an extension to another end may not start on it
        with pytest.raises(CubeError, match="mid-extension to 2018-09-30.*run the same cube --extend command to finish"):
            open_scene(store)
        marked = snapshot(store)
        with pytest.raises(CubeBuildError, match="mid-extension to 2018-09-30.*finish that one first"):
            extend_store(store, "2018-10-31", progress=False)
        assert snapshot(store) == marked
    monkeypatch.undo()
    assert built == (["s2", "s1"] if step == "fetch" else [])
    rebuilt = _record_pieces(monkeypatch)
    _stale_lock(store)  # as a real kill leaves it
    res = extend_store(store, END_B, progress=False)
    assert_same_store(store, extended)
    # resumed: the pieces staged before the kill are not fetched again
    assert rebuilt == {"fetch": ["s1"], "staged": []}.get(step, [])
    assert res.finished_interrupted == (step in ("inside-s2", "between-cubes", "commit"))
    if step != "cleanup":
        assert (res.s2_dates_added, res.s1_dates_added) == (4, 7)


def assert_same_store_but_staging(store: Path, ref: Path) -> None:
    a, b = open_scene(store), open_scene(ref)
    for sensor in ("s2", "s1"):
        xr.testing.assert_identical(a.sensors[sensor].drop_attrs(), b.sensors[sensor].drop_attrs())
    assert extend_staging_dir(store).exists()


# ----------------------------------------------------------------------------- (d) the command line
def test_cli_extend(store: Path, extended: Path, server: StacTestServer) -> None:
    runner = CliRunner()
    base = ["cube", "--extend", str(store), "--quiet"]
    before = snapshot(store)
    for args, message in (
        (["--end", END_B, "--bbox", "3.0", "50.8", "3.1", "50.9"], "--extend takes the area, site, start and output"),
        (["--end", END_B, "--out", "x.zarr", "--start", START], "so --out, --start cannot go with it; fix: drop"),
        ([], "--extend needs --end NEW_DATE"),
        (["--end", END_B, "--min-dates", "6"], "--min-dates (min_dates) is 6 but the store was built with 2"),
        (["--end", END_A], "is not after the store's end 2018-06-30"),
    ):
        res = runner.invoke(app, [*base, *args])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    assert snapshot(store) == before
    res = runner.invoke(app, [*base, "--end", END_B, "--catalog", server.api, "--min-dates", "2", "--retries", "1"])
    assert res.exit_code == 0, res.output
    assert f"extended {store} from 2018-06-30 to 2018-09-30: 4 S2 and 7 S1 dates added (now 8 S2, 17 S1" in res.output
    assert_same_store(store, extended)
    res = runner.invoke(app, [*base, "--end", END_B])  # the same command again: nothing to do
    assert res.exit_code == 0 and "is extended to 2018-09-30 already: nothing to do" in res.output, res.output
    assert_same_store(store, extended)
    assert "--extend" in runner.invoke(app, ["cube", "--help"]).output


# ----------------------------------------------------------------------------- (e) no new date
def test_no_new_date_records_the_new_end(store: Path, extended: Path) -> None:
    """Nothing between 2018-06-30 and 2018-07-04 (next S2 date 07-05, next S1 date 07-08): the end moves, 0 added;
    a later extension from there equals the direct one."""
    a = open_scene(store)
    res = extend_store(store, "2018-07-04", progress=False)
    assert (res.s2_dates_added, res.s1_dates_added, res.end) == (0, 0, "2018-07-04")
    assert "0 S2 and 0 S1 dates added" in res.summary()
    e = open_scene(store)
    for sensor in ("s2", "s1"):
        xr.testing.assert_identical(e.sensors[sensor].drop_attrs(), a.sensors[sensor].drop_attrs())
        assert json.loads(e.sensors[sensor].attrs["provenance"])["period"] == [START, "2018-07-04"]
    assert [r["new_end"] for r in root_attrs(store)["extensions"]] == ["2018-07-04"]
    with pytest.raises(CubeBuildError, match="not after the store's end 2018-07-04"):
        extend_store(store, "2018-07-01", progress=False)
    res = extend_store(store, END_B, progress=False)
    assert (res.s2_dates_added, res.s1_dates_added, res.old_end) == (4, 7, "2018-07-04")
    b, ref = open_scene(store), open_scene(extended)
    for sensor in ("s2", "s1"):
        xr.testing.assert_identical(b.sensors[sensor].drop_attrs(), ref.sensors[sensor].drop_attrs())
    assert [r["new_end"] for r in root_attrs(store)["extensions"]] == ["2018-07-04", END_B]
    assert os.listdir(store.parent) == ["a.zarr"]  # no staging folder, no lock left
