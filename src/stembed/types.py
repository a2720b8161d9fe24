"""Dimension names (stdlib only).

Every xarray object that crosses a module boundary uses these names: cubes are
``(time, band, y, x)``, embedding cubes ``(time, feature, y, x)``.
"""

from __future__ import annotations

TIME = "time"
BAND = "band"
Y = "y"
X = "x"
FEATURE = "feature"

CUBE_DIMS: tuple[str, str, str, str] = (TIME, BAND, Y, X)
