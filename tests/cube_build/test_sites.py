"""``stembed cube --sites``: many scene stores in one call on a local dask cluster, from the test catalog.

One module-scoped run builds three sites (two good, one outside the catalog's coverage) with two
workers; one good site was half built before (its first piece staged, its lock left by a dead run),
as a killed run leaves it. The tests read that run's stores, report and output, then rerun it.
Sites are 8 x 8 px over a few months (a couple of seconds each), as in ``test_stac_cube.py``.
"""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import xarray as xr
from typer.testing import CliRunner

from stembed.cli import app
from stembed.cube_build import CubeBuildError, CubeRequest, build_cube, staging_dir
from stembed.io.cube import open_scene
from stembed.io.outputs import lock_path
from stembed.io.sites import REPORT_NAME, SitesError, read_sites
from stembed.io.stac import RetryPolicy, utm_grid
from stembed.testing import StacTestServer, worldcereal_stac_catalog
from stembed.types import TIME, X, Y

FAST = RetryPolicy(retries=2, backoff_s=0.01)
X_LEFT, Y_TOP = 501_360.0, 5_629_680.0  # the WorldCereal patch's top-left corner (EPSG:32631)


def lonlat(x: float, y: float) -> tuple[float, float]:
    import pyproj

    return pyproj.Transformer.from_crs("EPSG:32631", "EPSG:4326", always_xy=True).transform(x, y)


# site A: a point (8 x 8 px at the patch's corner); B: a box inside the patch, two yearly pieces; C: a box
# in the Alps, where the catalog has nothing (fails with an empty search)
A_POINT = lonlat(X_LEFT + 40, Y_TOP - 40)
B_BOX = (*lonlat(X_LEFT + 300, Y_TOP - 380), *lonlat(X_LEFT + 370, Y_TOP - 310))
SITES_CSV = (
    "site,lon,lat,size_m,west,south,east,north,start,end\n"
    f"A,{A_POINT[0]},{A_POINT[1]},80,,,,,,\n"
    f"B,,,,{B_BOX[0]},{B_BOX[1]},{B_BOX[2]},{B_BOX[3]},2017-10-01,2018-09-30\n"
    "C,,,,10.0,46.0,10.001,46.001,,\n"
)
PERIOD = ["--start", "2018-03-01", "--end", "2018-09-30"]  # A's and C's period


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, belgian_dir: Path):
    times = []
    for pattern, every in (("S2_L2A_10m_*.nc", 6), ("S1_GRD-ASCENDING_20m_*.nc", 4)):  # as test_stac_cube.py
        (path,) = sorted(belgian_dir.glob(pattern))
        with xr.open_dataset(path) as ds:
            times.append(pd.DatetimeIndex(ds["timestamp"].values)[::every])
    root = worldcereal_stac_catalog(
        belgian_dir, tmp_path_factory.mktemp("stac"), s2_times=times[0], s1_times=times[1]
    ).parent
    with StacTestServer(root) as srv:
        yield srv


def sites_cmd(table: Path, out_dir: Path, server: StacTestServer, *extra: str) -> list[str]:
    return ["cube", "--sites", str(table), "--out-dir", str(out_dir), *PERIOD, "--catalog", server.api,
            "--retries", "2", "--quiet", *extra]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, server: StacTestServer):
    """B half built by a killed run (first S2 piece staged, lock of a dead pid), then --sites A, B, C."""
    import stembed.cube_build.build as cb

    tmp = tmp_path_factory.mktemp("sites")
    table = tmp / "sites.csv"
    table.write_text(SITES_CSV)
    out_dir = tmp / "out"
    (b,) = [s for s in read_sites(table, start="2018-03-01", end="2018-09-30") if s.site == "B"]
    real, calls = cb.build_piece, []

    def stop_after_one(*args, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise CubeBuildError("killed")
        return real(*args, **kw)

    request = CubeRequest(grid=b.grid, start=b.start, end=b.end, site="B", catalog=server.api, retry=FAST)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cb, "build_piece", stop_after_one)
        with pytest.raises(CubeBuildError, match="killed"):
            build_cube(request, out_dir / "B.zarr", progress=False)
    assert len(list((staging_dir(out_dir / "B.zarr") / "pieces").glob("*.zarr"))) == 1
    lock_path(out_dir / "B.zarr").write_text(json.dumps(
        {"stembed_output_lock": 1, "pid": dead_pid(), "host": socket.gethostname(), "command": "cube",
         "started": "2024-01-01T00:00:00"}
    ))
    res = CliRunner().invoke(app, sites_cmd(table, out_dir, server, "--workers", "2"))
    return table, out_dir, res


def report(out_dir: Path) -> dict[str, dict[str, str]]:
    with (out_dir / REPORT_NAME).open() as f:
        return {row["site"]: row for row in csv.DictReader(f)}


# ----------------------------------------------------------------------------- one call, many stores
@pytest.mark.slow
def test_sites_are_built_in_one_call_and_a_failed_one_is_reported(first_run) -> None:
    table, out_dir, res = first_run
    assert res.exit_code == 1, res.output
    rows = report(out_dir)
    assert [rows[s]["status"] for s in "ABC"] == ["built", "built", "failed"]
    assert "found no 'sentinel-2-l2a' items" in rows["C"]["error"] and not rows["C"]["traceback"]
    assert "1 site(s) failed: C" in res.output
    assert f"2 built, 0 already built, 1 failed of 3 sites; report: {out_dir / REPORT_NAME}" in res.output
    assert not (out_dir / "C.zarr").exists()
    grids = {"A": utm_grid(point=A_POINT, size_m=80), "B": utm_grid(bbox=B_BOX)}
    for site, grid in grids.items():
        scene = open_scene(out_dir / f"{site}.zarr")
        assert scene.site == site == scene.s2.attrs["site"]
        assert (scene.s2[Y].values == grid.y).all() and (scene.s2[X].values == grid.x).all()
        assert scene.s2.attrs["crs"] == grid.crs and scene.s2.sizes[TIME] >= 6
        assert int(rows[site]["s2_dates"]) == scene.s2.sizes[TIME]
        assert not staging_dir(out_dir / f"{site}.zarr").exists()
        assert not lock_path(out_dir / f"{site}.zarr").exists()
    b_prov = json.loads(open_scene(out_dir / "B.zarr").s2.attrs["provenance"])
    assert b_prov["period"] == ["2017-10-01", "2018-09-30"]  # the row's own period


@pytest.mark.slow
def test_killed_site_resumed_from_its_staged_piece(first_run) -> None:
    _, out_dir, _ = first_run
    # the staged 2017 S2 piece was reused; the dead run's lock was taken over
    assert report(out_dir)["B"]["pieces_reused"] == "1"


@pytest.mark.slow
def test_a_site_equals_its_single_site_build(first_run, server: StacTestServer, tmp_path: Path) -> None:
    _, out_dir, _ = first_run
    single = tmp_path / "A.zarr"
    res = CliRunner().invoke(app, [
        "cube", "--point", str(A_POINT[0]), str(A_POINT[1]), "--size-m", "80", *PERIOD, "--out", str(single),
        "--catalog", server.api, "--retries", "2", "--quiet",
    ])
    assert res.exit_code == 0, res.output
    a, b = open_scene(out_dir / "A.zarr"), open_scene(single)
    for x, y in ((a.s2, b.s2), (a.s1, b.s1)):
        xr.testing.assert_identical(x.drop_attrs(), y.drop_attrs())


@pytest.mark.slow
def test_rerun_skips_built_sites_and_retries_failed_ones(first_run, server: StacTestServer) -> None:
    table, out_dir, _ = first_run
    before = {s: (out_dir / f"{s}.zarr" / "zarr.json").stat().st_mtime_ns for s in "AB"}
    res = CliRunner().invoke(app, sites_cmd(table, out_dir, server, "--workers", "1"))
    assert res.exit_code == 1, res.output
    rows = report(out_dir)
    assert [rows[s]["status"] for s in "ABC"] == ["already built", "already built", "failed"]
    assert "0 built, 2 already built, 1 failed of 3 sites" in res.output
    assert {s: (out_dir / f"{s}.zarr" / "zarr.json").stat().st_mtime_ns for s in "AB"} == before
    # a table whose sites are all built starts no cluster and succeeds; a changed row is not silently kept
    ab = table.with_name("ab.csv")
    ab.write_text("".join(SITES_CSV.splitlines(keepends=True)[:3]))
    res = CliRunner().invoke(app, sites_cmd(ab, out_dir, server))
    assert res.exit_code == 0 and "0 built, 2 already built, 0 failed of 2 sites" in res.output, res.output
    moved = table.with_name("moved.csv")
    moved.write_text(SITES_CSV.splitlines(keepends=True)[0] + f"A,{A_POINT[0]},{A_POINT[1]},160,,,,,,\n")
    res = CliRunner().invoke(app, sites_cmd(moved, out_dir, server))
    assert res.exit_code == 1 and "A.zarr was built with other settings (grid" in res.output, res.output


# ----------------------------------------------------------------------------- a bad table: nothing is built
HEADER = "site,lon,lat,size_m,west,south,east,north\n"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("", "is empty"),
        ("lon,lat,size_m\n4.3,50.8,100\n", "no 'site' column"),
        ("site,lng,lat,size_m\na,4.3,50.8,100\n", "unknown column(s) 'lng'"),
        ("site,west,south,east\na,4.3,50.8,4.4\n", "neither the point columns"),
        (HEADER + "a,4.3,50.8,100,,,,\nb,4.3,50.8,100,,,,\nA,4.4,50.8,100,,,,\n",
         "line 4: site 'A' repeats 'a' of line 2"),
        (HEADER + "a,4.3,fifty,100,,,,\n", "line 2 (site 'a'): lat is 'fifty', not a number"),
        (HEADER + "a,4.3,50.8,100,4.3,50.8,4.4,50.9\n", "gives both a point"),
        (HEADER + "a,,,,,,,\n", "gives no area"),
        (HEADER + "a,4.3,50.8,,,,,\n", "has no size_m"),
        (HEADER + "a,,,,4.4,50.8,4.3,50.9\n", "is not a lon/lat box"),
        (HEADER + "../a,4.3,50.8,100,,,,\n", "not a safe file name"),
        (HEADER + "a,4.3,50.8,100,,,,,extra\n", "has 9 fields but the header has 8"),
        ("site,lon,lat,size_m,start\na,4.3,50.8,100,2018-13-45\n", "'2018-13-45' is not a date"),
    ],
    ids=["empty", "no-site", "unknown", "no-area-columns", "duplicate", "number", "both", "neither",
         "partial", "box-order", "unsafe-id", "extra-field", "bad-date"],
)
def test_bad_table_is_refused_before_anything_is_written(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "sites.csv"
    path.write_text(table)
    out_dir = tmp_path / "out"
    res = CliRunner().invoke(app, ["cube", "--sites", str(path), "--out-dir", str(out_dir), *PERIOD])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert not out_dir.exists()
    with pytest.raises(SitesError, match="fix:"):
        read_sites(path, start="2018-01-01", end="2018-12-31")


def test_row_without_a_period_needs_start_end(tmp_path: Path) -> None:
    path = tmp_path / "sites.csv"
    path.write_text("site,lon,lat,size_m\na,4.3,50.8,100\n")
    with pytest.raises(SitesError, match="line 2 .site 'a'. has no start date; fix: fill its 'start' column"):
        read_sites(path)
    (site,) = read_sites(path, start="2018-01-01", end="2018-12-31")
    assert (site.start, site.end, site.line, site.grid.width_px) == ("2018-01-01", "2018-12-31", 2, 10)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "x.zarr"], "--out cannot go with it"),
        (["--point", "4.3", "50.8"], "--point cannot go with it"),
        ([], "--sites needs --out-dir"),
    ],
)
def test_sites_option_conflicts(tmp_path: Path, args: list[str], message: str) -> None:
    path = tmp_path / "sites.csv"
    path.write_text("site,lon,lat,size_m\na,4.3,50.8,100\n")
    out_dir = [] if not args else ["--out-dir", str(tmp_path / "out")]
    res = CliRunner().invoke(app, ["cube", "--sites", str(path), *out_dir, *PERIOD, *args])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    assert list(tmp_path.iterdir()) == [path]


def test_out_dir_without_sites_is_refused(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["cube", "--out-dir", str(tmp_path / "o"), *PERIOD, "--point", "4", "50"])
    assert res.exit_code == 2 and "--out-dir go with --sites" in res.output, res.output
    res = CliRunner().invoke(app, ["cube", "--point", "4", "50", "--size-m", "80", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "missing --start, --end" in res.output, res.output
