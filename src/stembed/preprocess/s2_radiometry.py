"""Sentinel-2 L2A radiometry: digital numbers -> surface reflectance, and BRDF nadir normalisation (no torch, no IO).

* :func:`boa_add_offset`: the ``BOA_ADD_OFFSET`` of an item (-1000 from processing baseline 04.00, read from
  ``s2:processing_baseline``, else judged by the date);
* :func:`dn_to_reflectance`: ``(DN + offset) * 1e-4`` (times a BRDF c-factor), NaN where DN is 0;
* :func:`nbar_c_factor` / :func:`c_factor_on_grid`: sen2nbar's c-factor from the sun/view angle grids of an item's
  granule metadata (``MTD_TL.xml``, a *local* file: fetching it is :mod:`stembed.io.stac_load`'s job).
  **B8A**: sen2nbar has no coefficients for it; B8A is corrected with B08's coefficients (both come from
  the same MODIS NIR band, 841-876 nm, which B8A's 865 nm lies in) and B8A's own view angles.

sen2nbar and pyproj are imported inside the functions that use them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import xarray as xr

from stembed.errors import CubeBuildError
from stembed.sensors import S2
from stembed.types import X, Y

if TYPE_CHECKING:  # the grid module imports pyproj; preprocess stays light to import
    from stembed.geometry import GridSpec

BOA_ADD_OFFSET = -1000.0
"""ESA's L2A offset for processing baseline >= 04.00: reflectance = (DN + BOA_ADD_OFFSET) / 10000."""
_BASELINE_04 = (4, 0)
_BASELINE_04_START = pd.Timestamp("2022-01-25")  # first products of baseline 04.00
_DN_SCALE = 1e-4


def boa_add_offset(item: Any) -> tuple[float, str]:
    """The BOA_ADD_OFFSET of an S2 L2A item and where it came from.

    -1000 from processing baseline 04.00 on (``s2:processing_baseline``), else 0. Items without the
    property are judged by date (baseline 04.00 started on 2022-01-25) and the source says so.
    """
    baseline = item.properties.get("s2:processing_baseline")
    if baseline is not None:
        try:
            major, minor = (int(p) for p in str(baseline).split(".")[:2])
        except ValueError as e:
            raise CubeBuildError(
                f"item {item.id} has s2:processing_baseline {baseline!r}, not 'NN.NN'; the BOA offset is unknown"
            ) from e
        return (BOA_ADD_OFFSET if (major, minor) >= _BASELINE_04 else 0.0), f"baseline {baseline}"
    when = (
        pd.Timestamp(item.datetime).tz_localize(None)
        if item.datetime.tzinfo is None
        else pd.Timestamp(item.datetime).tz_convert(None)
    )
    offset = BOA_ADD_OFFSET if when >= _BASELINE_04_START else 0.0
    return offset, "no s2:processing_baseline; inferred from the date (04.00 from 2022-01-25)"


def dn_to_reflectance(dn: np.ndarray, *, boa_add_offset: float = 0.0, c_factor: Any = None) -> np.ndarray:
    """L2A digital numbers -> float32 reflectance: NaN where DN is 0, ``(DN + offset) * 1e-4 * c_factor``.

    Computed in float64 and rounded once. ``c_factor`` (broadcastable, e.g. (band, y, x)) is the BRDF
    nadir factor of :func:`nbar_c_factor`; None leaves the reflectance as observed.
    """
    dn = np.asarray(dn)
    refl = np.where(dn == 0, np.nan, (dn.astype(np.float64) + boa_add_offset) * _DN_SCALE)
    if c_factor is not None:
        refl = refl * np.asarray(c_factor, dtype=np.float64)
    return refl.astype(np.float32)


def nbar_c_factor(angles: xr.DataArray) -> xr.DataArray:
    """sen2nbar's c-factor for the 10 cube bands from an angle array like ``sen2nbar.metadata.angles_from_metadata``.

    ``angles`` has dims (band, angle, ...): band ``"Sun"`` and the S2 band names, angle ``"Zenith"``
    and ``"Azimuth"`` in degrees. Returns (band, ...) with band = ``S2.bands``. B8A takes B08's BRDF
    coefficients with its own view angles (sen2nbar's table has no B8A; see the module docstring).
    """
    from sen2nbar.c_factor import c_factor

    sun_zenith = angles.sel(band="Sun", angle="Zenith", drop=True)
    sun_azimuth = angles.sel(band="Sun", angle="Azimuth", drop=True)
    parts: dict[str, xr.DataArray] = {}
    # two calls: the nine bands sen2nbar knows, then B8A under B08's name (its coefficients)
    for bands, coefs in (([b for b in S2.bands if b != "B8A"], None), (["B8A"], ["B08"])):
        view_zenith = angles.sel(band=bands, angle="Zenith", drop=True)
        view_azimuth = angles.sel(band=bands, angle="Azimuth", drop=True)
        if coefs is not None:
            view_zenith, view_azimuth = (a.assign_coords(band=coefs) for a in (view_zenith, view_azimuth))
        c = c_factor(sun_zenith, view_zenith, sun_azimuth - view_azimuth)
        if c.sizes.get("band") != len(bands):
            raise CubeBuildError(f"sen2nbar has BRDF coefficients for {c['band'].values.tolist()} of {bands}")
        parts.update(zip(bands, (c.isel(band=i) for i in range(len(bands))), strict=True))
    out = [parts[b].drop_vars("band").expand_dims(band=[b]) for b in S2.bands]
    return xr.concat(out, dim="band")


def c_factor_on_grid(
    metadata: Path, grid: GridSpec, *, item_id: str, item_crs: Callable[[], str]
) -> np.ndarray:
    """The BRDF c-factor (band, y, x) on ``grid`` from one item's local granule metadata file (``MTD_TL.xml``).

    The angle grids (5 km) are read by sen2nbar from the local file (sen2nbar never touches the network),
    NaN cells (outside the detectors) filled by nearest neighbour (sen2nbar's own rule), the c-factor
    computed per band and interpolated linearly to every pixel centre (transformed into the item's CRS
    when it differs from the grid's). ``item_crs`` gives the item's CRS when the metadata does not.
    """
    from sen2nbar.metadata import angles_from_metadata
    from sen2nbar.utils import _extrapolate_c_factor

    from stembed.geometry import same_crs

    try:
        angles = angles_from_metadata(str(metadata))
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise CubeBuildError(
            f"the granule metadata of {item_id} has no readable sun/view angle grids ({type(e).__name__}: {e}); "
            "fix: pass --no-brdf"
        ) from e
    c = _extrapolate_c_factor(nbar_c_factor(angles))
    src_crs = str(angles.attrs.get("epsg") or item_crs())
    interp = {"method": "linear", "kwargs": {"fill_value": "extrapolate"}}
    if same_crs(src_crs, grid.crs):
        out = c.interp(x=grid.x, y=grid.y, **interp)
    else:
        import pyproj

        xx, yy = np.meshgrid(grid.x, grid.y)
        sx, sy = pyproj.Transformer.from_crs(grid.crs, src_crs, always_xy=True).transform(xx, yy)
        out = c.interp(x=xr.DataArray(sx, dims=(Y, X)), y=xr.DataArray(sy, dims=(Y, X)), **interp)
    values = out.transpose("band", Y, X).values.astype(np.float64)
    if not np.isfinite(values).all():
        raise CubeBuildError(f"the BRDF c-factor of {item_id} is not finite everywhere; fix: pass --no-brdf")
    return values
