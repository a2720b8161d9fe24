"""Pixel geometry, pure arithmetic (numpy and pyproj; no torch, no IO, no stembed layer above ``errors``).

Two grids live here, both in pixels:

* **On the ground**: :class:`GridSpec`, one UTM grid of 10 m pixels whose edges sit on multiples of the
  resolution in the zone's coordinates (the Sentinel-2 tile grid); :func:`utm_epsg`, :func:`grid_around_bbox`
  and :func:`grid_around_point` build one. ``stembed cube`` loads every item onto such a grid; the user-facing
  constructor that validates ``--bbox``/``--point`` is :func:`stembed.io.stac.utm_grid`.
* **In the dense encoder**: :class:`DenseGeometry`, the context window the ``dense`` encoder reads around a
  patch centre, from the kernel sizes of an ``AEConfig`` (:func:`dense_geometry`; ``stembed.config`` re-exports
  both, since ``AEConfig.context_px`` needs them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import pyproj

RESOLUTION_M = 10.0
"""The cube grid's pixel size (the Sentinel-2 10 m bands)."""
_SNAP_TOL_M = 1e-3


# ----------------------------------------------------------------------------- the grid on the ground
@dataclass(frozen=True)
class GridSpec:
    """One UTM grid of ``resolution_m`` pixels: ``x_left``/``y_top`` is the outer top-left corner."""

    epsg: int
    x_left: float
    y_top: float
    width_px: int
    height_px: int
    resolution_m: float = RESOLUTION_M
    note: str = ""

    @property
    def crs(self) -> str:
        """The grid's CRS as ``EPSG:<code>``."""
        return f"EPSG:{self.epsg}"

    @property
    def x(self) -> np.ndarray:
        """Pixel-centre x coordinates (increasing)."""
        return self.x_left + self.resolution_m * (np.arange(self.width_px) + 0.5)

    @property
    def y(self) -> np.ndarray:
        """Pixel-centre y coordinates (decreasing)."""
        return self.y_top - self.resolution_m * (np.arange(self.height_px) + 0.5)

    def bbox_lonlat(self) -> tuple[float, float, float, float]:
        """The grid's bounds in lon/lat (envelope of the densified outline), for the item search."""
        tr = pyproj.Transformer.from_crs(self.crs, "EPSG:4326", always_xy=True)
        x0, x1 = self.x_left, self.x_left + self.width_px * self.resolution_m
        y1, y0 = self.y_top, self.y_top - self.height_px * self.resolution_m
        west, south, east, north = tr.transform_bounds(x0, y0, x1, y1, densify_pts=21)
        return float(west), float(south), float(east), float(north)

    def geobox(self) -> Any:
        """The odc-geo ``GeoBox`` of this grid (odc-geo imported here only)."""
        from affine import Affine
        from odc.geo.geobox import GeoBox

        r = self.resolution_m
        return GeoBox(
            (self.height_px, self.width_px), Affine(r, 0.0, self.x_left, 0.0, -r, self.y_top), self.crs
        )

    def to_dict(self) -> dict[str, Any]:
        """The grid as plain values, for JSON attributes and provenance."""
        return asdict(self)


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS84 UTM zone holding (lon, lat) (the regular 6-degree zones)."""
    zone = int(math.floor((lon + 180.0) / 6.0)) % 60 + 1
    return (32600 if lat >= 0 else 32700) + zone


def same_crs(a: str, b: str) -> bool:
    """Whether two CRS descriptions (``"EPSG:32631"``, WKT, ...) name the same CRS."""
    return bool(pyproj.CRS.from_user_input(a) == pyproj.CRS.from_user_input(b))


def grid_around_bbox(w: float, s: float, e: float, n: float, resolution_m: float = RESOLUTION_M) -> GridSpec:
    """The grid covering the lon/lat box completely (its UTM envelope, snapped outwards), in its centre's zone.

    The box is taken as given (``W < E``, ``S < N``, in degrees: the caller checks). A box spanning two
    UTM zones goes in the zone of its centre; :attr:`GridSpec.note` says so.
    """
    epsg = utm_epsg((w + e) / 2, (s + n) / 2)
    zones = sorted({utm_epsg(lon, lat) for lon in (w, e) for lat in (s, n)})
    note = ""
    if len(zones) > 1:
        note = (
            f"the box spans UTM zones {', '.join(f'EPSG:{z}' for z in zones)}; the cube uses EPSG:{epsg}, the zone "
            "of its centre (pixels of the other zone are reprojected onto it)"
        )
    tr = pyproj.Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
    x0, y0, x1, y1 = tr.transform_bounds(w, s, e, n, densify_pts=21)
    xl = math.floor(x0 / resolution_m + _SNAP_TOL_M) * resolution_m
    xr = math.ceil(x1 / resolution_m - _SNAP_TOL_M) * resolution_m
    yb = math.floor(y0 / resolution_m + _SNAP_TOL_M) * resolution_m
    yt = math.ceil(y1 / resolution_m - _SNAP_TOL_M) * resolution_m
    return GridSpec(
        epsg,
        float(xl),
        float(yt),
        int(round((xr - xl) / resolution_m)),
        int(round((yt - yb) / resolution_m)),
        resolution_m,
        note,
    )


def grid_around_point(lon: float, lat: float, size_m: float, resolution_m: float = RESOLUTION_M) -> GridSpec:
    """The square of ``size_m`` (rounded up to whole pixels) centred on (lon, lat), snapped to the nearest edges."""
    epsg = utm_epsg(lon, lat)
    cx, cy = pyproj.Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True).transform(lon, lat)
    n_px = int(math.ceil(float(size_m) / resolution_m - _SNAP_TOL_M))
    xl = round((cx - n_px * resolution_m / 2) / resolution_m) * resolution_m
    yt = round((cy + n_px * resolution_m / 2) / resolution_m) * resolution_m
    return GridSpec(epsg, float(xl), float(yt), n_px, n_px, resolution_m, "")


# ----------------------------------------------------------------------------- the dense encoder's window
class DenseKernels(Protocol):
    """What :func:`dense_geometry` reads of an ``AEConfig``."""

    @property
    def multiscale_kernels(self) -> Sequence[int]:
        """The multiscale block's kernel sizes (the widest sets the level-1 reach)."""

    @property
    def dense_pool_window(self) -> int:
        """The window the dense CBAM channel gate pools over."""

    @property
    def dense_spatial_kernel(self) -> int:
        """The kernel of the dense CBAM spatial gate."""


@dataclass(frozen=True)
class DenseGeometry:
    """Where the dense encoder reads, in pixel offsets from the patch centre (pure arithmetic, no torch).

    The paper's strided stack puts the 4x4 token grid at offsets ``-7, -3, 1, 5`` from the centre (the
    anchors of its stride-4 cells). The dense encoder keeps those anchors; each stage of it is a valid
    convolution, so it reads ``reach`` pixels further out. ``low_shift``: index 0 of the map that feeds
    the token block sits at input pixel ``low_shift``.
    """

    token_offsets: tuple[int, ...]
    level1_radius: int  # multiscale conv + channel pool + spatial conv + max-pool, at dilation 1
    level2_radius: int  # 3x3 conv + channel pool + spatial conv + max-pool, at dilation 2
    low_shift: int  # left shrink of the whole stack: level1 + level2 + 2 (the second stride-2 conv looks back)
    right_shrink: int  # level1 + level2 + 1 (the first stride-2 conv looks forward)
    margin: int  # context on each side of the centre pixel (max of the two sides)
    unused_right: int  # pixels of the symmetric window the stack never reads on the right/bottom


def dense_geometry(cfg: DenseKernels) -> DenseGeometry:
    """The context window of the ``dense`` encoder for these kernel sizes (see :class:`DenseGeometry`)."""
    pw, ks = cfg.dense_pool_window // 2, cfg.dense_spatial_kernel // 2
    r1 = max(cfg.multiscale_kernels) // 2 + pw + ks + 1
    r2 = 2 * (1 + pw + ks + 1)
    offsets = (-7, -3, 1, 5)
    left, right = r1 + r2 + 2, r1 + r2 + 1
    margin = max(left - offsets[0], right + offsets[-1])
    return DenseGeometry(
        token_offsets=offsets, level1_radius=r1, level2_radius=r2, low_shift=left, right_shrink=right,
        margin=margin, unused_right=margin - (right + offsets[-1]),
    )
