"""From scenes and a DataConfig to train/val/test datasets, grouped so no site (or block) is in two splits."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr
from torch.utils.data import Dataset

from stembed.config import DataConfig, SamplingConfig
from stembed.contract import Scene
from stembed.data.datasets import FusionPatchDataset, PatchDataset, SensorArrays
from stembed.data.sampling import (
    SPLITS,
    PatchIndex,
    Region,
    SamplingError,
    assign_splits,
    day_numbers,
    make_regions,
    sample_patches,
)
from stembed.preprocess import match_s1_to_s2
from stembed.sensors import ANCHOR, PAIRED, get_plugin


@dataclass
class SplitData:
    """Datasets per split plus a record of what went where (for the run's metrics and provenance)."""

    datasets: dict[str, Dataset[Any]]
    patches: dict[str, list[PatchIndex]]
    regions: dict[str, list[Region]]
    info: dict[str, Any] = field(default_factory=dict)


def _scene_cube(scene: Scene, sensor: str) -> xr.DataArray:
    """The scene's cube of ``sensor``: ``s1``, ``s2`` or a companion sensor in ``scene.extra``."""
    try:
        return scene.sensors[sensor]
    except KeyError:
        raise SamplingError(
            f"site {scene.site} has no {sensor!r} cube (it has s1, s2 and "
            f"{sorted(scene.extra) or 'no companion sensors'}); "
            f"fix: add {sensor!r} to data.extra_sensors so the scenes load it"
        ) from None


def sensor_arrays(scene: Scene, sensor: str) -> SensorArrays:
    """A scene's S1, S2 or companion-sensor cube (on its own dates) as arrays."""
    cube = _scene_cube(scene, sensor)
    return SensorArrays(np.ascontiguousarray(cube.values, dtype=np.float32), day_numbers(cube["time"].values))


def matched_arrays(scene: Scene, sensor: str, max_gap_days: float, *, trailing: bool = False) -> SensorArrays:
    """A non-S2 sensor (S1 or companion) on the S2 dates: the nearest date within ``max_gap_days`` (``trailing``: on
    or before the S2 date only), else NaN.

    ``days`` holds the sensor date used, or the S2 day where none was close enough (see datasets).
    """
    if sensor == ANCHOR:
        raise SamplingError(
            "matched_arrays puts another sensor on the S2 dates; fix: use sensor_arrays(scene, 's2')"
        )
    s2_times = scene.s2["time"].values
    m = match_s1_to_s2(_scene_cube(scene, sensor), s2_times, max_gap_days=max_gap_days, trailing=trailing)
    s2_days = day_numbers(s2_times)
    used = m["s1_time"].values  # match_s1_to_s2 names the matched date s1_time whatever the sensor
    have = ~np.isnat(used)
    days = np.where(have, day_numbers(np.where(have, used, s2_times)), s2_days)
    return SensorArrays(np.ascontiguousarray(m.values, dtype=np.float32), days.astype(np.int64))


def matched_s1_arrays(scene: Scene, max_gap_days: float) -> SensorArrays:
    """S1 on the S2 dates (nearest within ``max_gap_days``); missing S1 dates take the S2 day (see datasets)."""
    return matched_arrays(scene, "s1", max_gap_days)


def _split_patches(
    scenes: list[Scene], driver: list[SensorArrays], sampling: SamplingConfig, cfg: DataConfig, rng: np.random.Generator
) -> tuple[dict[str, list[PatchIndex]], dict[str, list[Region]], dict[str, Any]]:
    for scene, arr in zip(scenes, driver, strict=True):
        if arr.values.shape[0] < sampling.window_dates:
            raise SamplingError(
                f"site {scene.site} has {arr.values.shape[0]} usable dates but a training window needs "
                f"{sampling.window_dates}; lower data.sampling.window_dates (>= n_frames={sampling.n_frames}) "
                "or use a longer period"
            )
    regions = make_regions([a.values.shape[2:] for a in driver], cfg.split, sampling.patch_px)
    groups = assign_splits(len(regions), cfg.split)
    centre_ok = [np.isfinite(a.values).any(axis=1) for a in driver]
    patches: dict[str, list[PatchIndex]] = {}
    split_regions = {name: [regions[g] for g in groups[name]] for name in SPLITS}
    info: dict[str, Any] = {"split_by": cfg.split.by, "splits": {}}
    for name in SPLITS:
        patches[name] = []
        for g in groups[name]:
            r = regions[g]
            patches[name] += sample_patches(centre_ok[r.site], driver[r.site].days, r, sampling, rng)
        info["splits"][name] = {
            "n_patches": len(patches[name]),
            "groups": [
                {"site": scenes[regions[g].site].site, "y": list(regions[g].y), "x": list(regions[g].x)}
                for g in groups[name]
            ],
        }
        if groups[name] and not patches[name]:
            raise SamplingError(
                f"the {name} split got no patches (its groups: {info['splits'][name]['groups']}); the data is too "
                "small or too cloudy for this sampling: lower data.sampling.spatial_stride / window_stride"
            )
    return patches, split_regions, info


def band_stats(data: SplitData) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band mean and std of the observed values in the training split's regions (for AEConfig)."""
    ds = data.datasets["train"]
    sites = ds.sites  # type: ignore[attr-defined]  # the train split's PatchDataset
    total = count = sq = None
    for g in data.regions["train"]:
        v = sites[g.site].values[:, :, g.y[0] : g.y[1], g.x[0] : g.x[1]]  # (time, band, y, x)
        ok = np.isfinite(v)
        vv = np.where(ok, v, 0.0).astype(np.float64)
        s, c, q = vv.sum(axis=(0, 2, 3)), ok.sum(axis=(0, 2, 3)), (vv**2).sum(axis=(0, 2, 3))
        total, count, sq = (s, c, q) if total is None else (total + s, count + c, sq + q)
    if count is None or (count == 0).any():
        raise SamplingError("a band has no observed value in the training split; cannot standardise inputs")
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean**2, 0.0))
    std = np.maximum(std, 1e-4)  # a constant band must not divide by zero
    return tuple(float(m) for m in mean), tuple(float(x) for x in std)


def train_spectra(data: SplitData) -> np.ndarray:
    """Every fully observed pixel-date's spectrum (N, C) in the training split's regions: each is the centre
    pixel of some training window (for ``init: centre_pca``)."""
    sites = data.datasets["train"].sites  # type: ignore[attr-defined]  # the train split's PatchDataset
    out = []
    for g in data.regions["train"]:
        v = sites[g.site].values[:, :, g.y[0] : g.y[1], g.x[0] : g.x[1]]  # (time, band, y, x)
        rows = v.transpose(0, 2, 3, 1).reshape(-1, v.shape[1])
        out.append(rows[np.isfinite(rows).all(axis=1)])
    return np.concatenate(out).astype(np.float64)


def build_sensor_data(
    scenes: list[Scene], sensor: str, cfg: DataConfig, rng: np.random.Generator, context_px: int | None = None
) -> SplitData:
    """Patches of one sensor on its own dates (stage 1); ``context_px``: the encoder's (see datasets)."""
    sampling = cfg.resolved_sampling(sensor)
    arrays = [sensor_arrays(s, sensor) for s in scenes]
    patches, regions, info = _split_patches(scenes, arrays, sampling, cfg, rng)
    ds: dict[str, Dataset[Any]] = {k: PatchDataset(arrays, v, sampling.patch_px, context_px) for k, v in patches.items()}
    return SplitData(ds, patches, regions, info)


def build_fusion_data(
    scenes: list[Scene],
    cfg: DataConfig,
    rng: np.random.Generator,
    context_px: int | None = None,
    extra: tuple[str, ...] = (),
    trailing: bool = False,
) -> SplitData:
    """Aligned S1 + S2 (+ ``extra`` companion) patches on the S2 dates (stage 2); the S2 centre pixel decides
    which patches exist. Each non-S2 sensor is matched within :func:`match_gap_days` (``trailing``: only its dates
    on or before the S2 date, as a trailing model reads them)."""
    sampling = cfg.resolved_sampling(ANCHOR)
    sensors = {ANCHOR: [sensor_arrays(s, ANCHOR) for s in scenes]}
    for k, gap in match_gap_days((PAIRED, *extra), cfg.s1_max_gap_days).items():
        sensors[k] = [matched_arrays(s, k, gap, trailing=trailing) for s in scenes]
    patches, regions, info = _split_patches(scenes, sensors[ANCHOR], sampling, cfg, rng)
    ds: dict[str, Dataset[Any]] = {
        k: FusionPatchDataset(sensors, v, sampling.patch_px, context_px) for k, v in patches.items()
    }
    return SplitData(ds, patches, regions, info)


def match_gap_days(sensors: Iterable[str], s1_max_gap_days: float) -> dict[str, float]:
    """How far (days) each non-S2 sensor's date may lie from an S2 date to fill that fusion frame (S2, the anchor,
    is left out: its own dates are the frames): S1's ``s1_max_gap_days`` (``data.s1_max_gap_days`` in training),
    a companion's from its plugin."""
    return {
        k: s1_max_gap_days if k == PAIRED else get_plugin(k).match_max_gap_days for k in sensors if k != ANCHOR
    }
