"""Turn a :class:`~stembed.config.DataConfig` source into validated scenes (one per site)."""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path

from stembed.config import DataConfig, SceneSource, SyntheticSource, WorldCerealSource, ZarrSource
from stembed.contract import CubeError, Scene
from stembed.io.cube import open_cube, open_scene
from stembed.io.outputs import is_stembed_store
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
    plugins = [get_plugin(name) for name in cfg.extra_sensors]  # unknown names fail before any reading
    if len(set(cfg.extra_sensors)) != len(cfg.extra_sensors):
        raise CubeError(
            f"data.extra_sensors lists a sensor twice: {list(cfg.extra_sensors)}; fix: list each once"
        )
    scenes, folders = _source_scenes(cfg)
    sites = [s.site for s in scenes]
    if len(set(sites)) != len(sites):
        raise CubeError(f"site ids must be unique across the data source, got {sites}")
    if plugins:  # a companion a scene store already holds is taken from it
        scenes = [
            dataclasses.replace(
                s, sensors={**{pl.spec.name: pl.load(s, folder) for pl in plugins if pl.spec.name not in s.sensors},
                            **s.sensors}
            )
            for s, folder in zip(scenes, folders, strict=True)
        ]
    for s in scenes:
        s.validate()
    return scenes


def _source_scenes(cfg: DataConfig) -> tuple[list[Scene], list[Path | None]]:
    """The scenes of ``cfg.source``, unvalidated, and each one's site folder (a WorldCereal source's; else None)."""
    src = cfg.source
    if isinstance(src, SyntheticSource):
        from stembed.data.synthetic import synthetic_scene

        scenes = [
            synthetic_scene(seed=src.seed + i, height_px=src.height_px, width_px=src.width_px, n_days=src.n_days)
            for i in range(src.n_sites)
        ]
    elif isinstance(src, WorldCerealSource):
        from stembed.io.worldcereal import read_worldcereal

        scenes = [
            read_worldcereal(p, masked_classes=cfg.scl_masked_classes, min_valid_fraction=cfg.min_valid_fraction)
            for p in src.paths
        ]
        return scenes, [Path(p) for p in src.paths]
    elif isinstance(src, SceneSource):
        scenes = [open_scene(p) for p in scene_paths(src.paths)]
    elif isinstance(src, ZarrSource):
        scenes = _cube_pairs(src)
    else:  # pragma: no cover - the discriminated union makes this unreachable
        raise TypeError(f"unknown data source {type(src).__name__}")
    return scenes, [None] * len(scenes)


def _cube_pairs(src: ZarrSource) -> list[Scene]:
    """The scenes of single-sensor cube stores, an S2 cube and an S1 cube each."""
    if len(src.s1_paths) not in (0, len(src.s2_paths)):
        raise CubeError(
            f"data.source.s1_paths has {len(src.s1_paths)} entries but s2_paths has {len(src.s2_paths)}; "
            "give one S1 cube per S2 cube, in the same order (both sensors are needed)"
        )
    scenes = []
    for i, p in enumerate(src.s2_paths):
        if is_stembed_store(p, "scene"):
            raise CubeError(
                f"{p} is a scene store (S2 + S1 in one, as `stembed cube` writes), not a single-sensor cube; "
                f"fix: data.source: {{kind: scene, paths: [{p}]}}"
            )
        s2 = open_cube(p)
        if not src.s1_paths:
            raise CubeError(f"no S1 cube given for {p}; set data.source.s1_paths (one S1 zarr per S2 zarr)")
        scenes.append(Scene.from_cubes(str(s2.attrs.get("site", p)), s2=s2, s1=open_cube(src.s1_paths[i])))
    return scenes


def scene_paths(patterns: tuple[str, ...]) -> list[Path]:
    """Expand ``data.source.paths`` of a scene source: stores or glob patterns, each of which must match."""
    out: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(pattern))
            if not found:
                raise CubeError(f"data.source.paths: {pattern!r} matches no scene store; fix: check the pattern")
            out += found
        else:
            out.append(Path(pattern))
    if len(set(out)) != len(out):
        raise CubeError(f"data.source.paths names a scene store twice: {[str(p) for p in out]}; fix: list each once")
    return out
