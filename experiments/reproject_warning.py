"""Is rasterio's "Dataset has no geotransform" warning during `stembed cube` harmless?

Builds the same cube N times from the local test catalog (the real Belgian patch served as COGs by
``stembed.testing.StacTestServer``, as in tests/cube_build/test_stac_cube.py), with stembed's filter for that warning
turned off, counts the warnings each build raised and checks that every build's S2 and S1 arrays are
bit-identical to the first build's. ``stembed.io.stac_load.quiet_reproject_warning`` hides the warning on
the strength of this table. Last line: one JSON object.

    .venv/bin/python experiments/reproject_warning.py --builds 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyproj
import xarray as xr
from rasterio.errors import NotGeoreferencedWarning

import stembed.io.stac_load as stac_load
from stembed.cube_build import CubeRequest, build_cube
from stembed.io.cube import open_scene
from stembed.io.stac import RetryPolicy, utm_grid
from stembed.testing import StacTestServer, worldcereal_stac_catalog

SITE = Path(__file__).resolve().parents[1].parent / "shared/data/worldcereal_s2_s1_patches/00002806639B424A"


def times(site: Path) -> dict[str, pd.DatetimeIndex]:
    """Every 6th S2 and every 4th S1 date of the patch (the test catalog's subset)."""
    out = {}
    for key, pattern, every in (("s2", "S2_L2A_10m_*.nc", 6), ("s1", "S1_GRD-ASCENDING_20m_*.nc", 4)):
        (path,) = sorted(site.glob(pattern))
        with xr.open_dataset(path) as ds:
            out[key] = pd.DatetimeIndex(ds["timestamp"].values)[::every]
    return out


@contextmanager
def no_filter() -> Iterator[None]:
    """Stands in for stembed's filter of the warning, hiding nothing: the builds count what it would hide."""
    yield


def main() -> None:
    """Build the cube ``--builds`` times; print each build's warnings and whether its arrays equal the first's."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--builds", type=int, default=8)
    ap.add_argument("--site", type=Path, default=SITE)
    a = ap.parse_args()
    stac_load.quiet_reproject_warning = no_filter  # count what the filter would hide
    seen: list[str] = []
    warnings.showwarning = lambda message, category, *rest: (
        seen.append(str(message)) if issubclass(category, NotGeoreferencedWarning) else None
    )
    warnings.simplefilter("always", NotGeoreferencedWarning)
    with tempfile.TemporaryDirectory() as tmp:
        t = times(a.site)
        catalog = worldcereal_stac_catalog(a.site, Path(tmp) / "stac", s2_times=t["s2"], s1_times=t["s1"]).parent
        centre = pyproj.Transformer.from_crs("EPSG:32631", "EPSG:4326", always_xy=True).transform(
            501_360.0 + 320, 5_629_680.0 - 320)  # the patch's UTM grid: its whole 64 x 64 px
        grid = utm_grid(point=centre, size_m=640)
        first, rows = None, []
        print(f"{'build':>5} {'warnings':>8} {'identical to build 0':>21}")
        for i in range(a.builds):
            before = len(seen)
            with StacTestServer(catalog) as srv:
                request = CubeRequest(grid=grid, start="2017-08-01", end="2018-11-30", site="BE-patch",
                                      catalog=srv.api, retry=RetryPolicy(retries=3, backoff_s=0.01))
                out = build_cube(request, Path(tmp) / f"cube{i}.zarr", progress=False).path
            scene = open_scene(out)
            arrays = [np.asarray(scene.s2.values), np.asarray(scene.s1.values)]
            first = first or arrays
            same = all(np.array_equal(x, y, equal_nan=True) for x, y in zip(arrays, first, strict=True))
            rows.append({"build": i, "warnings": len(seen) - before, "identical": same})
            print(f"{i:>5} {len(seen) - before:>8} {str(same):>21}", flush=True)
    print(json.dumps({"builds": rows, "builds_that_warned": sum(r["warnings"] > 0 for r in rows),
                      "all_identical": all(r["identical"] for r in rows)}))


if __name__ == "__main__":
    main()
