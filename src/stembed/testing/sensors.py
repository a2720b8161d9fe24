"""A toy companion sensor for tests of the sensor-plugin plumbing (:func:`toy_sensor_plugin`)."""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from stembed.contract import Scene, make_cube
from stembed.sensors import SensorPlugin, SensorSpec
from stembed.types import BAND, TIME, X, Y

TOY_SENSOR = SensorSpec(
    name="toy",
    bands=("SEASON", "TEXTURE"),
    valid_range=(0.0, 1.0),
    normalisation=(
        "synthetic test sensor (stembed.testing.toy_sensor_plugin), daily over the S2 period: "
        "SEASON = seasonal sine shifted by a smoothed S2 B08 median, TEXTURE = smoothed S2 B08-B04 median modulated by the "
        "season, plus seeded noise; clipped to [0, 1]; about 3 % of days NaN"
    ),
)


def toy_sensor_plugin() -> SensorPlugin:
    """A companion-sensor plugin named ``"toy"`` (2 bands, [0, 1]) whose cube derives from the scene itself.

    For tests of the plugin plumbing and a fast three-sensor fusion on :func:`synthetic_scene`: its
    daily cube varies in space (smoothed S2 medians, so it is learnable and tied to the landscape) and
    in time (a seasonal sine), and is seeded by the site id. Not registered at import; register it with
    ``stembed.sensors.register_sensor(toy_sensor_plugin())`` (registering it twice is a no-op).
    """
    return SensorPlugin(
        spec=TOY_SENSOR, latent_dim=2, reduced_tokens=4, match_max_gap_days=0.5, load=_toy_load
    )


def _toy_load(scene: Scene, site_folder: Any) -> xr.DataArray:
    """The toy sensor's cube: daily (00:00) from the first to the last S2 day, on the S2 grid."""
    from scipy.ndimage import uniform_filter

    s2 = scene.s2
    seed = int.from_bytes(hashlib.sha256(f"toy:{scene.site}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    t2 = pd.DatetimeIndex(s2[TIME].values).normalize()
    times = pd.date_range(t2.min(), t2.max(), freq="D")

    def field(values: np.ndarray) -> np.ndarray:
        """A band's temporal median, smoothed over 5x5 px and scaled to about [-1, 1]."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels
            med = np.nanmedian(values, axis=0)
        med = np.where(np.isfinite(med), med, np.nanmean(med) if np.isfinite(med).any() else 0.0)
        f = uniform_filter(med, size=5, mode="nearest")
        return (f - f.mean()) / (np.abs(f - f.mean()).max() + 1e-9)

    nir, red = s2.sel({BAND: "B08"}).values, s2.sel({BAND: "B04"}).values
    f_nir, f_contrast = field(nir), field(nir - red)
    phase = 2 * np.pi * (times.dayofyear.to_numpy() - 100) / 365.25
    season = np.sin(phase)[:, None, None]  # (time, 1, 1)
    band0 = 0.5 + 0.25 * season + 0.15 * f_nir[None]
    band1 = 0.5 + 0.3 * f_contrast[None] * (0.6 + 0.4 * season)
    values = np.stack([band0, band1], axis=1)  # (time, band, y, x)
    values = values + 0.02 * rng.standard_normal(values.shape)
    values[rng.random(times.size) < 0.03] = np.nan
    return make_cube(
        np.clip(values, 0.0, 1.0), times=times, bands=TOY_SENSOR.bands, y=s2[Y].values, x=s2[X].values,
        crs=str(s2.attrs["crs"]), sensor=TOY_SENSOR.name, site=scene.site,
        provenance={"source": "stembed.testing.toy_sensor_plugin", "synthetic": True, "seed": seed,
                    "site_folder": None if site_folder is None else str(site_folder)},
    )
