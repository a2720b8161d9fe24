"""Seeded synthetic S1/S2 scenes: the ``synthetic`` data source, demos and tests (public API, no torch).

:func:`synthetic_scene` draws a small field landscape and observes it the way the satellites do,
then sends the raw values through the same preprocessing as real data
(:func:`~stembed.preprocess.prepare_s2`, :func:`~stembed.preprocess.prepare_s1`). What a model can
learn from it:

* space: Voronoi parcels, each of one land-cover type, with per-parcel phenology jitter and a
  smooth within-parcel texture;
* time: a double-logistic greenness curve per land cover (summer crop, winter crop, deciduous
  forest, grassland, bare/urban, water) mixed into plausible 10-band spectra (red low and NIR high
  when green), smooth in time;
* gaps: an irregular S2 calendar (5-day revisit, dropped acquisitions, some fully cloudy dates),
  smooth cloud blobs with displaced shadows and cirrus, flagged in an SCL-like layer;
* radar: S1 VV/VH on its own calendar (two 12-day orbits 5 days apart) driven by land cover and
  biomass, soil moisture and wind on water, with multiplicative gamma speckle (4 looks).

Every random draw comes from one ``np.random.default_rng(seed)``: same seed, same scene.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from stembed.contract import Scene, make_cube
from stembed.preprocess import SCL_MASKED_DEFAULT, prepare_s1, prepare_s2
from stembed.sensors import S1, S2
from stembed.types import BAND, CUBE_DIMS, TIME, X, Y

LAND_COVER = ("summer_crop", "winter_crop", "deciduous_forest", "grassland", "bare_urban", "water")
"""Land-cover classes of the synthetic scene; ``labels["land_cover"]`` holds indices into this tuple."""

_CRS = "EPSG:32631"
_X_LEFT, _Y_TOP = 600_000.0, 5_700_000.0  # top-left corner of the grid (UTM 31N, inland Europe)
_RES = 10.0

# 10-band spectra in S2.bands order: B02 B03 B04 B05 B06 B07 B08 B8A B11 B12
_GREEN_LEAF = (0.030, 0.060, 0.030, 0.100, 0.290, 0.370, 0.400, 0.420, 0.210, 0.100)
_FOREST_LEAF = (0.020, 0.045, 0.020, 0.075, 0.240, 0.320, 0.350, 0.370, 0.160, 0.070)
_SOIL = (0.070, 0.100, 0.130, 0.160, 0.190, 0.210, 0.230, 0.240, 0.320, 0.270)
_LITTER = (0.050, 0.070, 0.080, 0.110, 0.150, 0.170, 0.190, 0.200, 0.250, 0.180)
_URBAN = (0.100, 0.110, 0.120, 0.130, 0.140, 0.150, 0.160, 0.165, 0.190, 0.170)
_WATER = (0.050, 0.045, 0.030, 0.020, 0.015, 0.012, 0.010, 0.009, 0.005, 0.003)
_CLOUD = (0.550, 0.550, 0.560, 0.570, 0.580, 0.580, 0.590, 0.580, 0.400, 0.280)

# per land cover: greenness curve (base, amplitude, start/end of season as day of year, rise/fall
# widths in days), leaf and background spectra, and VV/VH dB at zero and full greenness
_CLASSES: dict[str, dict[str, Any]] = {
    "summer_crop": dict(curve=(0.05, 0.85, 150, 255, 8, 6), leaf=_GREEN_LEAF, bg=_SOIL,
                        vv=(-13.0, -9.0), vh=(-22.0, -14.0)),
    "winter_crop": dict(curve=(0.25, 0.70, 85, 190, 10, 5), leaf=_GREEN_LEAF, bg=_SOIL,
                        vv=(-12.0, -10.0), vh=(-21.0, -15.0)),
    "deciduous_forest": dict(curve=(0.20, 0.70, 125, 290, 7, 10), leaf=_FOREST_LEAF, bg=_LITTER,
                             vv=(-8.0, -7.0), vh=(-14.0, -12.5)),
    "grassland": dict(curve=(0.45, 0.35, 95, 290, 15, 15), leaf=_GREEN_LEAF, bg=_LITTER,
                      vv=(-12.0, -10.0), vh=(-20.0, -16.0)),
    "bare_urban": dict(curve=(0.03, 0.0, 100, 250, 10, 10), leaf=_GREEN_LEAF, bg=_URBAN,
                       vv=(-5.0, -5.0), vh=(-12.0, -12.0)),
    "water": dict(curve=(0.0, 0.0, 100, 250, 10, 10), leaf=_GREEN_LEAF, bg=_WATER,
                  vv=(-21.0, -21.0), vh=(-27.0, -27.0)),
}
_CLASS_SHARE = (0.25, 0.2, 0.15, 0.2, 0.1, 0.1)  # how often each land cover is drawn for a parcel
_WATER_ID, _URBAN_ID = LAND_COVER.index("water"), LAND_COVER.index("bare_urban")


def synthetic_scene(
    *,
    seed: int = 0,
    height_px: int = 48,
    width_px: int = 48,
    n_days: int = 365,
    start: str = "2020-01-01",
    site: str | None = None,
) -> Scene:
    """A seeded synthetic :class:`~stembed.io.cube.Scene`: S2 and S1 cubes on their own dates, plus labels.

    Args:
        seed: the only source of randomness.
        height_px, width_px: grid size (10 m pixels).
        n_days: length of the period starting at ``start``.
        start: first day (ISO date).
        site: site id; default ``f"synthetic-{seed}"``.

    Returns:
        A scene that passes :meth:`Scene.validate`; ``labels`` holds ``land_cover`` (indices into
        :data:`LAND_COVER`) and ``parcel`` ids on the same grid.
    """
    if height_px < 1 or width_px < 1 or n_days < 1:
        raise ValueError(f"need height_px, width_px, n_days >= 1, got {height_px}, {width_px}, {n_days}")
    rng = np.random.default_rng(seed)
    site = f"synthetic-{seed}" if site is None else site
    shape = (height_px, width_px)
    t0 = pd.Timestamp(start)

    parcel, land_cover = _parcels(rng, shape)
    pheno = _phenology_params(rng, parcel, land_cover)

    s2_times = _s2_times(rng, t0, n_days)
    reflectance, scl = _observe_s2(rng, s2_times, land_cover, pheno)
    s1_times, s1_orbit = _s1_times(rng, t0, n_days)
    s1_linear = _observe_s1(rng, s1_times, s1_orbit, land_cover, pheno)

    y = _Y_TOP - _RES / 2 - _RES * np.arange(height_px)
    x = _X_LEFT + _RES / 2 + _RES * np.arange(width_px)
    provenance = {
        "source": "stembed.data.synthetic.synthetic_scene",
        "synthetic": True,
        "seed": seed,
        "parameters": {"height_px": height_px, "width_px": width_px, "n_days": n_days, "start": start},
    }
    labels = xr.Dataset(
        {"land_cover": ((Y, X), land_cover.astype(np.int16)), "parcel": ((Y, X), parcel.astype(np.int32))},
        coords={Y: y, X: x},
        attrs={"land_cover_names": list(LAND_COVER), "crs": _CRS},
    )
    return _scene(site, provenance, y, x, s2=(s2_times, reflectance, scl), s1=(s1_times, s1_linear), labels=labels)


def _scene(
    site: str, provenance: dict[str, Any], y: np.ndarray, x: np.ndarray, *,
    s2: tuple[np.ndarray, np.ndarray, np.ndarray], s1: tuple[np.ndarray, np.ndarray], labels: xr.Dataset,
) -> Scene:
    """The scene of the observed values: S2 ``(times, reflectance, scl)`` and S1 ``(times, linear power)``, each
    prepared as a cube store holds it."""
    (s2_times, reflectance, scl), (s1_times, s1_linear) = s2, s1
    coords = {Y: y, X: x}
    s2_cube = prepare_s2(
        xr.DataArray(reflectance, dims=CUBE_DIMS, coords={TIME: s2_times, BAND: list(S2.bands), **coords}),
        xr.DataArray(scl, dims=(TIME, Y, X), coords={TIME: s2_times, **coords}),
    )
    s1_cube = prepare_s1(
        xr.DataArray(s1_linear, dims=CUBE_DIMS, coords={TIME: s1_times, BAND: list(S1.bands), **coords})
    )

    def cube(da: xr.DataArray, sensor: str, extra: dict[str, Any]) -> xr.DataArray:
        return make_cube(da.values, times=da[TIME].values, bands=da[BAND].values, y=y, x=x, crs=_CRS,
                         sensor=sensor, site=site, provenance={**provenance, **extra})

    return Scene(
        site=site,
        sensors={
            "s2": cube(s2_cube, "s2", {"raw_dates": len(s2_times), "scl_masked_classes": list(SCL_MASKED_DEFAULT)}),
            "s1": cube(s1_cube, "s1", {"raw_dates": len(s1_times), "orbits": "two 12-day orbits, 5 days apart"}),
        },
        labels=labels,
    )


# ----------------------------------------------------------------------------- landscape
def _smooth_fields(rng: np.random.Generator, n: int, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """``n`` smooth standard-normal-ish fields: coarse white noise, bilinearly upsampled."""

    def interp(n_out: int, n_in: int) -> np.ndarray:
        pos = np.linspace(0.0, n_in - 1.0, n_out)
        i0 = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
        w = pos - i0
        m = np.zeros((n_out, n_in))
        m[np.arange(n_out), i0] = 1.0 - w
        m[np.arange(n_out), i0 + 1] = w
        return m

    h, w = shape
    ch, cw = int(np.ceil(h / scale_px)) + 2, int(np.ceil(w / scale_px)) + 2
    coarse = rng.standard_normal((n, ch, cw))
    f = np.einsum("yi,nij,xj->nyx", interp(h, ch), coarse, interp(w, cw))
    f -= f.mean(axis=(1, 2), keepdims=True)
    return f / (f.std(axis=(1, 2), keepdims=True) + 1e-9)


def _parcels(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Voronoi parcels (~12x12 px on average) and a land cover per pixel; each class drawn at least once."""
    h, w = shape
    n = min(h * w, max(len(LAND_COVER), round(h * w / 144)))
    seeds = rng.choice(h * w, size=n, replace=False)
    sy, sx = np.divmod(seeds, w)
    yy, xx = np.mgrid[0:h, 0:w]
    d2 = (yy[..., None] - sy) ** 2 + (xx[..., None] - sx) ** 2
    parcel = d2.argmin(axis=-1)
    kinds = rng.choice(len(LAND_COVER), size=n, p=_CLASS_SHARE)
    first = min(n, len(LAND_COVER))
    kinds[:first] = rng.permutation(len(LAND_COVER))[:first]
    return parcel, kinds[parcel]


def _phenology_params(
    rng: np.random.Generator, parcel: np.ndarray, land_cover: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-pixel greenness curve and spectra: class values, per-parcel jitter, smooth per-pixel texture."""
    n_parcels = int(parcel.max()) + 1
    table = [_CLASSES[name] for name in LAND_COVER]
    curve = np.array([c["curve"] for c in table])[land_cover]  # (H, W, 6)
    jitter_days = rng.normal(0.0, 8.0, size=(n_parcels, 2))[parcel]
    amp_scale = rng.uniform(0.85, 1.1, size=n_parcels)[parcel]
    bg_scale = rng.uniform(0.85, 1.15, size=n_parcels)[parcel]
    texture = _smooth_fields(rng, 2, parcel.shape, scale_px=6.0)
    return {
        "land_cover": land_cover,
        "base": curve[..., 0],
        "amp": curve[..., 1] * amp_scale * (1.0 + 0.05 * texture[0]),
        "sos": curve[..., 2] + jitter_days[..., 0],
        "eos": curve[..., 3] + jitter_days[..., 1],
        "rise": curve[..., 4],
        "fall": curve[..., 5],
        "leaf": np.array([c["leaf"] for c in table])[land_cover].transpose(2, 0, 1),  # (band, H, W)
        "bg": np.array([c["bg"] for c in table])[land_cover].transpose(2, 0, 1) * bg_scale,
        "brightness": 1.0 + 0.04 * texture[1],
        "vv": np.array([c["vv"] for c in table])[land_cover],  # (H, W, 2): zero / full greenness
        "vh": np.array([c["vh"] for c in table])[land_cover],
    }


def _greenness(times: pd.DatetimeIndex, p: dict[str, np.ndarray]) -> np.ndarray:
    """Double-logistic greenness (time, H, W) in [0, 1] from the day of year."""
    doy = np.asarray(times.dayofyear, dtype=np.float64)[:, None, None]
    up = 1.0 / (1.0 + np.exp(-(doy - p["sos"]) / p["rise"]))
    down = 1.0 / (1.0 + np.exp(-(doy - p["eos"]) / p["fall"]))
    return np.clip(p["base"] + p["amp"] * (up - down), 0.0, 1.0)


# ----------------------------------------------------------------------------- Sentinel-2
def _s2_times(rng: np.random.Generator, t0: pd.Timestamp, n_days: int) -> pd.DatetimeIndex:
    """5-day revisit from a random phase, 10 % of acquisitions dropped, morning overpass times."""
    days = np.arange(rng.integers(0, 5), n_days, 5)
    days = days[rng.random(days.size) >= 0.1]
    minutes = rng.uniform(10.5 * 60, 11.0 * 60, size=days.size)
    return t0 + pd.to_timedelta(days, unit="D") + pd.to_timedelta(np.round(minutes * 60), unit="s")


def _observe_s2(
    rng: np.random.Generator, times: pd.DatetimeIndex, land_cover: np.ndarray, p: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Surface reflectance seen through clouds (time, band, H, W) and its SCL (time, H, W)."""
    t, (h, w) = len(times), land_cover.shape
    g = _greenness(times, p)  # (T, H, W)
    surface = g[:, None] * p["leaf"][None] + (1.0 - g[:, None]) * p["bg"][None]
    surface *= p["brightness"][None, None] * rng.normal(1.0, 0.02, size=(t, 1, 1, 1))  # texture, illumination
    surface += rng.normal(0.0, 0.004, size=surface.shape)

    water = land_cover == _WATER_ID
    scl = np.where(water, 6, np.where((g > 0.35) & (land_cover != _URBAN_ID), 4, 5)).astype(np.uint8)

    # cloud cover per date: clear, partly cloudy, mostly cloudy, overcast
    kind = rng.choice(4, size=t, p=(0.35, 0.45, 0.1, 0.1))
    cover = np.choose(kind, [np.zeros(t), rng.uniform(0.05, 0.6, t), rng.uniform(0.7, 0.95, t), np.ones(t)])
    field = _smooth_fields(rng, t, (h, w), scale_px=12.0)
    level = np.array([np.quantile(f, 1 - c) if c > 0 else np.inf for f, c in zip(field, cover, strict=True)])
    depth = field - level[:, None, None]  # >= 0 inside a cloud (everywhere when overcast)
    cloud = depth >= 0
    opacity = np.clip(0.7 + 0.3 * depth, 0.7, 1.0)[:, None]

    shift = np.stack([rng.integers(3, 8, t), rng.integers(-7, -2, t)], axis=1)  # shadow (dy, dx) per date
    shadow = np.zeros_like(cloud)
    for i, (dy, dx) in enumerate(shift):
        if dy < h and -dx < w:
            shadow[i, dy:, : w + dx] = cloud[i, : h - dy, -dx:]
    shadow &= ~cloud
    cirrus_dates = rng.random(t) < 0.15
    cirrus = (_smooth_fields(rng, t, (h, w), scale_px=16.0) > 0.8) & cirrus_dates[:, None, None] & ~cloud

    cloud_top = np.asarray(_CLOUD)[None, :, None, None]
    refl = np.where(cloud[:, None], (1.0 - opacity) * surface + opacity * cloud_top, surface)
    refl = np.where(shadow[:, None], refl * 0.35, refl)
    refl = np.where(cirrus[:, None], refl + 0.06, refl)
    scl = np.broadcast_to(scl, (t, h, w)).copy()
    scl[shadow] = 3
    scl[cirrus] = 10
    scl[cloud] = np.where(depth[cloud] > 0.5, 9, 8)
    return refl.astype(np.float32), scl


# ----------------------------------------------------------------------------- Sentinel-1
def _s1_times(rng: np.random.Generator, t0: pd.Timestamp, n_days: int) -> tuple[pd.DatetimeIndex, np.ndarray]:
    """Two ascending orbits on a 12-day repeat, 5 days apart (gaps alternate 5 / 7 days); 5 % missing."""
    phase = int(rng.integers(0, 12))
    orbit_a = np.arange(phase, n_days, 12)
    orbit_b = np.arange((phase + 5) % 12, n_days, 12)
    days = np.concatenate([orbit_a, orbit_b])
    orbit = np.concatenate([np.zeros(orbit_a.size, int), np.ones(orbit_b.size, int)])
    order = np.argsort(days)
    days, orbit = days[order], orbit[order]
    keep = rng.random(days.size) >= 0.05
    days, orbit = days[keep], orbit[keep]
    seconds = np.where(orbit == 0, 17 * 3600 + 32 * 60, 17 * 3600 + 40 * 60)
    times = t0 + pd.to_timedelta(days, unit="D") + pd.to_timedelta(seconds, unit="s")
    return times, orbit


def _observe_s1(
    rng: np.random.Generator,
    times: pd.DatetimeIndex,
    orbit: np.ndarray,
    land_cover: np.ndarray,
    p: dict[str, np.ndarray],
) -> np.ndarray:
    """VV/VH linear power (time, band, H, W) with soil moisture, wind on water and gamma speckle."""
    t = len(times)
    g = _greenness(times, p)[:, None]  # (T, 1, H, W)
    lo = np.stack([p["vv"][..., 0], p["vh"][..., 0]])[None]  # (1, 2, H, W)
    hi = np.stack([p["vv"][..., 1], p["vh"][..., 1]])[None]
    db = lo + (hi - lo) * g
    land = (land_cover != _WATER_ID) & (land_cover != _URBAN_ID)
    moisture = np.zeros(t)  # soil wetness in dB: AR(1), about 1 dB standard deviation
    for i, step in enumerate(rng.normal(0.0, 0.6, t)):
        moisture[i] = (0.8 * moisture[i - 1] if i else 0.0) + step
    moisture = moisture[:, None, None, None] * land
    wind = (rng.random(t) < 0.3) * rng.uniform(0.0, 6.0, t)
    db = db + moisture + wind[:, None, None, None] * (land_cover == _WATER_ID)
    db = db + 0.4 * orbit[:, None, None, None] + 0.5 * _smooth_fields(rng, 1, land_cover.shape, 8.0)[0]
    speckle = rng.gamma(shape=4.0, scale=0.25, size=db.shape)
    return (10.0 ** (db / 10.0) * speckle).astype(np.float32)
