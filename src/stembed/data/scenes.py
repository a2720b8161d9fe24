"""Turn a :class:`~stembed.config.DataConfig` source into validated scenes (one per site)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from stembed.config import DataConfig, SyntheticSource, WorldCerealSource, ZarrSource
from stembed.io.cube import CubeError, Scene, open_cube
from stembed.sensors import get_plugin


def load_scenes(cfg: DataConfig) -> list[Scene]:
    """Read (or synthesise) every site named by ``cfg.source`` and validate it against the cube contract.

    Each scene also gets the cubes of ``cfg.extra_sensors`` (companion sensors, ``Scene.extra``), built
    by their plugin's ``load(scene, site_folder)``; ``site_folder`` is the WorldCereal folder of the
    site, None for synthetic and zarr sources.

    Raises:
        CubeError: a site breaks the cube contract, or a companion sensor cannot be built for it.
        SensorError: a name in ``cfg.extra_sensors`` is not a registered companion sensor.
    """
    src = cfg.source
    plugins = [get_plugin(name) for name in cfg.extra_sensors]  # unknown names fail before any reading
    if len(set(cfg.extra_sensors)) != len(cfg.extra_sensors):
        raise CubeError(
            f"data.extra_sensors lists a sensor twice: {list(cfg.extra_sensors)}; fix: list each once"
        )
    scenes: list[Scene]
    folders: list[Path | None]
    if isinstance(src, SyntheticSource):
        from stembed.testing import synthetic_scene

        scenes = [
            synthetic_scene(seed=src.seed + i, height_px=src.height_px, width_px=src.width_px, n_days=src.n_days)
            for i in range(src.n_sites)
        ]
        folders = [None] * len(scenes)
    elif isinstance(src, WorldCerealSource):
        from stembed.io.worldcereal import read_worldcereal

        scenes = [
            read_worldcereal(
                p, masked_classes=cfg.scl_masked_classes, min_valid_fraction=cfg.min_valid_fraction
            )
            for p in src.paths
        ]
        folders = [Path(p) for p in src.paths]
    elif isinstance(src, ZarrSource):
        if len(src.s1_paths) not in (0, len(src.s2_paths)):
            raise CubeError(
                f"data.source.s1_paths has {len(src.s1_paths)} entries but s2_paths has {len(src.s2_paths)}; "
                "give one S1 cube per S2 cube (same order), or none for S2-only training"
            )
        scenes = []
        for i, p in enumerate(src.s2_paths):
            s2 = open_cube(p)
            s1 = open_cube(src.s1_paths[i]) if src.s1_paths else None
            if s1 is None:
                raise CubeError(
                    f"no S1 cube given for {p}; set data.source.s1_paths (one S1 zarr per S2 zarr)"
                )
            scenes.append(Scene(site=str(s2.attrs.get("site", p)), s2=s2, s1=s1))
        folders = [None] * len(scenes)
    else:  # pragma: no cover - the discriminated union makes this unreachable
        raise TypeError(f"unknown data source {type(src).__name__}")
    sites = [s.site for s in scenes]
    if len(set(sites)) != len(sites):
        raise CubeError(f"site ids must be unique across the data source, got {sites}")
    if plugins:
        scenes = [
            dataclasses.replace(s, extra={**s.extra, **{pl.spec.name: pl.load(s, folder) for pl in plugins}})
            for s, folder in zip(scenes, folders, strict=True)
        ]
    for s in scenes:
        s.validate()
    return scenes
