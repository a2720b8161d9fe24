"""``stembed cube``: a scene store (S2 L2A + S1 RTC on one UTM 10 m grid) for any place and period, from STAC.

The build orchestration, in its own rank above ``io`` and ``preprocess``:

* :mod:`~stembed.cube_build.request`: :class:`CubeRequest` (what decides a cube's content), :class:`BuildResult`,
  and the settings every site shares (:func:`cube_settings`: a :class:`~stembed.config.CubeConfig` from a file,
  ``--set`` and options);
* :mod:`~stembed.cube_build.build`: :func:`build_cube`, one site: search (:mod:`stembed.io.stac`), staging,
  pieces, assembly (the steps are described there); :func:`build_area` (``stembed cube --out``);
* :mod:`~stembed.cube_build.pieces`: one piece of the period per sensor, loaded (:mod:`stembed.io.stac_load`),
  made into reflectance / backscatter (:mod:`stembed.preprocess`) and staged;
* :mod:`~stembed.cube_build.extend`: :func:`extend_store` (``stembed cube --extend``), a store that grows: the
  dates after its last one appended with its own settings, in place under a journal
  (:mod:`~stembed.cube_build.append`), so a kill leaves the old store or one the same command finishes;
* :mod:`~stembed.cube_build.sites`: :func:`build_cubes`, many sites as dask tasks; :func:`build_sites_table`
  (``stembed cube --sites``).

The loading lives in :mod:`stembed.io.stac_load`, the S2 radiometry (BOA offset, BRDF) and cloud masks in
:mod:`stembed.preprocess`, the grid in :mod:`stembed.geometry`.
"""

from stembed.cube_build.build import build_area, build_cube, staging_dir
from stembed.cube_build.extend import ExtendResult, extend_staging_dir, extend_store
from stembed.cube_build.request import (
    MIN_DATES_DEFAULT,
    BuildResult,
    CubeRequest,
    cube_settings,
    shared_settings,
)
from stembed.cube_build.sites import SitesRun, build_cubes, build_site, build_sites_table
from stembed.errors import CubeBuildError

__all__ = [
    "MIN_DATES_DEFAULT",
    "BuildResult",
    "CubeBuildError",
    "CubeRequest",
    "ExtendResult",
    "SitesRun",
    "build_area",
    "build_cube",
    "build_cubes",
    "build_site",
    "build_sites_table",
    "cube_settings",
    "extend_staging_dir",
    "extend_store",
    "shared_settings",
    "staging_dir",
]
