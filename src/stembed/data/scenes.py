"""Turn a :class:`~stembed.config.DataConfig` source into validated scenes (one per site)."""

from __future__ import annotations

from stembed.config import DataConfig, SyntheticSource, WorldCerealSource, ZarrSource
from stembed.io.cube import CubeError, Scene, open_cube


def load_scenes(cfg: DataConfig) -> list[Scene]:
    """Read (or synthesise) every site named by ``cfg.source`` and validate it against the cube contract."""
    src = cfg.source
    scenes: list[Scene]
    if isinstance(src, SyntheticSource):
        from stembed.testing import synthetic_scene

        scenes = [
            synthetic_scene(seed=src.seed + i, height_px=src.height_px, width_px=src.width_px, n_days=src.n_days)
            for i in range(src.n_sites)
        ]
    elif isinstance(src, WorldCerealSource):
        from stembed.io.worldcereal import read_worldcereal

        scenes = [
            read_worldcereal(
                p, masked_classes=cfg.scl_masked_classes, min_valid_fraction=cfg.min_valid_fraction
            )
            for p in src.paths
        ]
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
    else:  # pragma: no cover - the discriminated union makes this unreachable
        raise TypeError(f"unknown data source {type(src).__name__}")
    sites = [s.site for s in scenes]
    if len(set(sites)) != len(sites):
        raise CubeError(f"site ids must be unique across the data source, got {sites}")
    for s in scenes:
        s.validate()
    return scenes
