"""The monitoring loop of docs/guide/monitoring.md (issue "Monitoring" item 4), run as the page writes it: its
one-time setup, then its ``monitor.sh`` once a month, on an offline STAC catalog of the Belgian patch (every
second S2 and S1 item, February to August 2018) with the built-in trailing bundle.

It checks what the page promises: each month's table holds every row of the month before with the same values,
a second run of a month changes nothing, and the grown embedding store is one embedding of the whole period, bit
for bit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from stembed.config import EmbedConfig
from stembed.inference.run import embed_cube
from stembed.io.embeddings import open_embeddings
from stembed.testing import StacTestServer, worldcereal_stac_catalog

PAGE = Path(__file__).resolve().parents[1] / "docs" / "guide" / "monitoring.md"
MONTHS = ("2018-05-31", "2018-06-30", "2018-07-31")
pytestmark = pytest.mark.slow


def page_scripts() -> tuple[str, str]:
    """The page's two bash blocks (setup, monitor.sh), without their first line (why the docs test skips them)."""
    blocks = re.findall(r"```bash\n(.*?)```", PAGE.read_text(), flags=re.S)
    setup, monitor = (b.split("\n", 1)[1] for b in blocks if b.startswith("# not run in the tests: tests/test_monitoring"))
    return setup, monitor


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, belgian_dir: Path):
    times = {}
    for key, pattern in (("s2", "S2_L2A_10m_*.nc"), ("s1", "S1_GRD-ASCENDING_20m_*.nc")):
        (path,) = sorted(belgian_dir.glob(pattern))
        with xr.open_dataset(path) as ds:
            t = pd.DatetimeIndex(ds["timestamp"].values)
        times[key] = t[(t >= "2018-02-01") & (t <= "2018-08-31")][::2]
    root = tmp_path_factory.mktemp("stac")
    catalog = worldcereal_stac_catalog(belgian_dir, root, s2_times=times["s2"], s1_times=times["s1"]).parent
    with StacTestServer(catalog) as srv:
        yield srv


def run(script: str, cwd: Path, **env: str) -> str:
    """``bash -e`` in ``cwd`` with this environment's ``stembed`` first on the PATH; its output (fails loudly)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    res = subprocess.run(["bash", "-e", "-c", script], cwd=cwd, env={**os.environ, "PATH": path, **env},
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout + res.stderr


def test_the_pages_loop_grows_the_store_and_never_changes_a_row_already_written(
    tmp_path: Path, server: StacTestServer
) -> None:
    setup, monitor = page_scripts()
    pd.DataFrame({"lon": [3.0232, 3.0239, 3.0246], "lat": [50.8155, 50.8159, 50.8163], "id": ["a", "b", "c"]}).to_csv(
        tmp_path / "parcels.csv", index=False)
    run(setup, tmp_path, CATALOG=server.api)
    previous = None
    for end in MONTHS:
        run(monitor, tmp_path, END=end)
        table = pd.read_csv(tmp_path / "tables" / f"parcels_{end}.csv")
        assert pd.Timestamp(table["time"].max()) < pd.Timestamp(end) + pd.Timedelta(days=1)
        assert table["id"].nunique() == 3
        if previous is not None:  # every row of last month's table, with the same values
            assert len(table) > len(previous)
            key = ["id", "time"]
            old = previous.set_index(key)
            pd.testing.assert_frame_equal(table.set_index(key).loc[old.index], old)
        previous = table
    store = tmp_path / "area_emb.zarr"
    grown = open_embeddings(store)
    assert [e["new_dates"] > e["old_dates"] for e in grown.attrs["extensions"]] == [True] * len(MONTHS)
    assert all(e["recomputed"] == {} for e in grown.attrs["extensions"])  # trailing: nothing old rewritten
    first_dates = int(grown.attrs["extensions"][0]["old_dates"])
    np.testing.assert_array_equal(grown["extension"].values[:first_dates], 0)
    before = grown["embedding"].values
    again = run(monitor, tmp_path, END=MONTHS[-1])  # the same month again: nothing to add
    assert "0 dates added" in again
    np.testing.assert_array_equal(open_embeddings(store)["embedding"].values, before)
    whole = embed_cube(tmp_path / "area.zarr", "pretrained:belgium-trailing", tmp_path / "whole.zarr", EmbedConfig(),
                       progress=False)
    np.testing.assert_array_equal(open_embeddings(whole.out)["embedding"].values, before)  # bit for bit
    assert np.isnan(before[:5]).all() and np.isfinite(before[5:]).any()  # the first 5 dates: too little history
