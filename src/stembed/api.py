"""The Python API: what a notebook calls, and what the command line calls too, so the two cannot drift.

Every function here is re-exported at the top of the package (``stembed.embed``, ``stembed.open_scene``, ...)
and imports its heavy dependencies (torch, dask) only when called, so ``import stembed`` stays light.

:func:`embed` takes a scene store path, a :class:`~stembed.contract.Scene` or an ``xr.Dataset`` with ``s2`` and
``s1`` variables, and runs the checks of ``stembed embed`` (same messages, same errors) before it computes
anything. Without ``out`` it embeds in this process and returns the embeddings in memory (small areas); with
``out`` it writes an embedding store tile by tile on dask (:func:`embed_store`, what ``stembed embed`` runs)
and returns it opened lazily. For one bundle and one ``batch_size`` both give the same bits.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stembed.errors import UserError

if TYPE_CHECKING:
    import xarray as xr

    from stembed.config import CubeConfig, EmbedConfig
    from stembed.contract import Scene
    from stembed.cube_build.extend import ExtendResult
    from stembed.inference.plan import EmbedPlan
    from stembed.inference.run import EmbedResult
    from stembed.models.bundle import Bundle
    from stembed.training.run_folder import Run

_STORE_ONLY = ("resume", "overwrite", "scheduler", "extend")


def open_scene(path: str | Path, *, check_values: bool = True) -> Scene:
    """Open a scene store (``stembed cube`` or :func:`save_scene` wrote it) lazily, and check it against the
    cube contract.

    Args:
        path: the scene store (zarr).
        check_values: also check every value's range (reads the whole store); False checks structure only.

    Returns:
        The scene: ``scene.s2``, ``scene.s1`` (and companions) are ``(time, band, y, x)`` DataArrays.

    Raises:
        CubeError: no scene store at ``path``, or it breaks the cube contract (the message names the fix).
    """
    from stembed.io.cube import open_scene as _open

    return _open(path, check_values=check_values)


def save_scene(scene: Scene | xr.Dataset, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a scene (or a Dataset of cubes, as :func:`embed` takes one) as a scene store, atomically.

    Returns:
        ``path``: the store, which ``stembed embed --cube`` and :func:`embed` read.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        CubeError: the scene breaks the cube contract.
    """
    from stembed.io.cube import save_scene as _save

    return _save(as_scene(scene), path, overwrite=overwrite)


def extend_store(
    store: str | Path, end: str, *, config: CubeConfig | None = None, progress: bool = True
) -> ExtendResult:
    """Grow a scene store built by ``stembed cube`` (what ``stembed cube --extend STORE --end END`` runs): append the
    dates after its last one up to ``end``, with the settings it records; dates it holds are never rewritten.

    Args:
        store: the scene store (zarr) to grow, in place.
        end: the new last day, ``YYYY-MM-DD``, after the store's end.
        config: settings you give (only the fields set count); each must equal the store's, except ``retries`` and
            ``piece_months``, which this run uses.

    Returns:
        What was done: ``result.s2_dates_added``, ``result.s1_dates_added``, ``result.end``, ``result.notes``.

    Raises:
        CubeBuildError: ``end`` not after the store's end, a setting differing from the store's, a store without
            ``stembed cube``'s provenance, or a failed fetch (rerun to resume).
        OutputError: another run holds the store.
    """
    from stembed.cube_build.extend import extend_store as _extend

    return _extend(store, end, config=config, progress=progress)


def load_bundle(spec: str | Path) -> Bundle:
    """Load a bundle: a ``bundle.pt`` path, or ``pretrained:NAME`` for a built-in one (``stembed info`` lists them).

    Returns:
        The bundle: its ``kind``, ``config``, band ``sensors``, ``provenance`` and weights;
        ``bundle.build_model()`` rebuilds the torch model.

    Raises:
        BundleError: not a stembed bundle, or damaged (the message names the fix).
        PretrainedError: no built-in bundle of that name.
    """
    from stembed.models.bundle import load_bundle as _load

    return _load(spec)


def open_run(run_dir: str | Path) -> Run:
    """Reopen a finished training run folder (``stembed train --run-dir``): its config, bundle and data splits.

    Returns:
        The run: ``run.config`` (its stage config, read back from ``config.yaml``), ``run.bundle``, and
        ``run.data()``, its train, val and test patches rebuilt as training built them.

    Raises:
        RunError: not a finished run's folder (no ``config.yaml`` or ``bundle.pt``, or a config that is not a
            training stage's); the message names the fix.
        ConfigError, BundleError: its ``config.yaml`` or ``bundle.pt`` is damaged.
    """
    from stembed.training.run_folder import open_run as _open

    return _open(run_dir)


def open_embeddings(path: str | Path, features: int | None = None) -> xr.Dataset:
    """Open an embedding store lazily (dask), decoded to float32.

    Args:
        path: the store ``stembed embed`` (or :func:`embed` with ``out``) wrote.
        features: only the first that many features, one of the nested sizes the store holds whole
            (``stembed info`` on its bundle lists them); None: all.

    Returns:
        ``embedding`` ``(time, feature, y, x)`` (NaN where the S2 centre pixel was not observed), ``valid``
        ``(time, y, x)``, ``spatial_ref``, and the store's attributes (bundle, config, provenance).

    Raises:
        EmbeddingStoreError: not an embedding store, an unfinished one, or a ``features`` it does not hold.
    """
    from stembed.io.embeddings import open_embeddings as _open

    return _open(path, features=features)


def embed(
    scene: str | Path | Scene | xr.Dataset,
    bundle: str | Path | Bundle,
    out: str | Path | None = None,
    *,
    config: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    scheduler: str | None = None,
    progress: bool = False,
    extend: bool = False,
    **settings: Any,
) -> xr.Dataset:
    """Embed every pixel and valid S2 date of a scene with a fusion (or gap-fill) bundle.

    Args:
        scene: a scene store path, a :class:`~stembed.contract.Scene`, or an ``xr.Dataset`` whose ``s2`` and
            ``s1`` variables (and any companion sensor's) are cubes on ``(time, band, y, x)``.
        bundle: a ``bundle.pt`` path, ``pretrained:NAME``, or a bundle from :func:`load_bundle`.
        out: None embeds in memory (small areas: the result must fit in RAM); a path writes an embedding store
            there, tile by tile on dask, as ``stembed embed --out`` does (``scene`` must then be a store path).
        config: a YAML ``EmbedConfig`` file, as ``stembed embed --config``.
        resume: finish an interrupted store (``stembed embed --resume``; with ``out``).
        overwrite: replace a store stembed wrote (``--overwrite``; with ``out``).
        scheduler: the address of a running dask scheduler (``--scheduler``; with ``out``).
        progress: show a progress bar.
        extend: grow the store ``out`` with the dates the scene store gained (``--extend``; with ``out``).
        **settings: ``EmbedConfig`` fields, as ``stembed embed --set KEY=VALUE`` (``tile_px=32``,
            ``batch_size=64``, ``daily=True``, ``features=3``, ``workers=2``, ...); they win over ``config``.

    Returns:
        ``embedding`` ``(time, feature, y, x)`` float32 (NaN where the S2 centre pixel was not observed),
        ``valid`` ``(time, y, x)`` (and ``flag`` with ``daily=True``) on the S2 grid, with ``spatial_ref``;
        with ``out``, the store opened lazily.

    Raises:
        BundleError, CubeError, ConfigError, EmbedError: the bundle, the scene or a setting is unusable; the
            message names the problem and the fix, as the command line's does.
        UserError: a store setting (``resume``, ``dtype``, ...) without ``out``, or ``out`` with a scene in memory.
        FileExistsError, EmbeddingStoreError, OutputError: ``out`` is taken (with ``out`` only).
    """
    bundle_path = _bundle_path(bundle)
    if out is not None:
        if not isinstance(scene, str | Path):
            raise UserError(
                "out= writes a store tile by tile on dask workers, which read the scene from a store; fix: "
                "stembed.save_scene(scene, 'scene.zarr') first and pass 'scene.zarr', or leave out= off to "
                "embed in memory"
            )
        res = embed_store(scene, bundle_path, out, config=config, resume=resume, overwrite=overwrite,
                          scheduler=scheduler, progress=progress, extend=extend, **settings)
        return open_embeddings(res.out)
    given = [name for name, value in zip(_STORE_ONLY, (resume, overwrite, scheduler, extend), strict=True)
             if value not in (False, None)]
    if given:
        raise UserError(f"{', '.join(given)} are about an embedding store; fix: pass out=PATH, or drop them")
    return _embed_in_memory(scene, bundle_path, _in_memory_settings(config, settings), progress=progress)


def _in_memory_settings(config: str | Path | None, settings: Mapping[str, Any]) -> EmbedConfig:
    """The ``EmbedConfig`` of an in-memory embedding: one whose values are float32 as computed."""
    cfg = embed_settings(config, settings)
    if cfg.dtype != "float32":
        raise UserError(
            f"dtype={cfg.dtype!r} sets how a store keeps the values; in memory they are float32; "
            "fix: pass out=PATH to write a store, or drop dtype"
        )
    return cfg


def embed_store(
    cube: str | Path,
    bundle: str | Path,
    out: str | Path,
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
    scheduler: str | None = None,
    progress: bool = True,
    extend: bool = False,
    **settings: Any,
) -> EmbedResult:
    """Embed the scene store ``cube`` into the embedding store ``out``, tile by tile on dask: ``stembed embed``.

    ``overrides`` are ``KEY=VALUE`` strings (``--set``), ``settings`` ``EmbedConfig`` fields; ``settings`` win.
    Every check runs before anything is written; see :func:`stembed.inference.run.embed_cube`. ``extend``: grow
    the store with the dates ``cube`` gained (``stembed embed --extend``; ``result.dates_added``).

    Returns:
        What the run did: tiles written and skipped, the storage error, seconds, notes for the user.

    Raises:
        ConfigError: both ``workers`` and ``scheduler``, or a bad setting.
    """
    from stembed.config import ConfigError
    from stembed.inference.run import embed_cube

    if settings.get("workers") is not None and scheduler is not None:
        raise ConfigError("--workers starts a local cluster and --scheduler uses a running one; pass one")
    cfg = embed_settings(config, settings, overrides)
    return embed_cube(cube, _bundle_path(bundle), out, cfg, resume=resume, overwrite=overwrite,
                      scheduler=scheduler, progress=progress, extend=extend)


def embed_settings(
    config: str | Path | None = None, settings: Mapping[str, Any] | None = None, overrides: Sequence[str] = (),
) -> EmbedConfig:
    """The ``EmbedConfig`` of a YAML file, then ``--set`` overrides, then keyword settings (each wins over the last).

    Raises:
        ConfigError: an unknown key or a bad value (each named).
    """
    from stembed.config import EmbedConfig, load_config

    # JSON is YAML: each value parses back to itself (True -> true, None -> null, "savgol" -> 'savgol')
    given = [f"{key}={json.dumps(value, default=str)}" for key, value in (settings or {}).items()]
    return load_config(EmbedConfig, config, [*overrides, *given])


def as_scene(obj: str | Path | Scene | xr.Dataset) -> Scene:
    """A :class:`~stembed.contract.Scene` from a scene store path, a Scene, or a Dataset of cubes.

    A Dataset holds one cube per sensor as variables named after it (``s2``, ``s1``, companions) on ``(time,
    band, y, x)``. As xarray aligns the variables of a Dataset, each sensor takes its own bands (by name) and
    the dates on which it has a value. Attributes a cube lacks (``crs``, ``site``, ``sensor``, ``provenance``)
    come from the Dataset's, else from ``spatial_ref``; the scene is then checked against the cube contract
    (structure only: :func:`embed` checks the values).

    Raises:
        CubeError: a sensor is missing, or a cube breaks the contract (the message names the fix).
    """
    import xarray as xr

    from stembed.contract import Scene

    if isinstance(obj, Scene):
        return obj
    if isinstance(obj, str | Path):
        return open_scene(obj, check_values=False)
    if isinstance(obj, xr.Dataset):
        scene = _scene_from_dataset(obj)
        _check_structure(scene)
        return scene
    raise TypeError(
        f"a scene is a scene store path, a stembed Scene or an xr.Dataset of cubes, not a {type(obj).__name__}; "
        "fix: stembed.open_scene(path), or xr.Dataset({'s2': s2_cube, 's1': s1_cube})"
    )


# ----------------------------------------------------------------------------- helpers
def _bundle_path(bundle: str | Path | Bundle) -> str | Path:
    """The file of a bundle given as a path, ``pretrained:NAME`` or a loaded bundle (tiles and workers read it)."""
    if isinstance(bundle, str | Path):
        return bundle
    path = getattr(bundle, "path", None)
    if path is None:
        raise UserError(
            "this bundle was not loaded from a file, and embedding reads the file (its sha256 goes into the "
            "output's provenance); fix: save it with stembed.models.bundle.save_bundle, or pass its path"
        )
    return Path(path)


def _scene_from_dataset(ds: xr.Dataset) -> Scene:
    """The scene of a Dataset of cubes (see :func:`as_scene`)."""
    import numpy as np

    from stembed.contract import CubeError, Scene, provenance_json
    from stembed.sensors import ANCHOR, SCENE_SENSORS, SENSORS, companions, load_builtin_plugins
    from stembed.types import BAND, CUBE_DIMS, TIME

    load_builtin_plugins()
    names = [str(v) for v in ds.data_vars]
    missing = [k for k in SCENE_SENSORS if k not in names]
    if missing:
        raise CubeError(
            f"the Dataset has no {' or '.join(missing)} variable (it has {names}); fix: one cube per sensor, "
            "named after it: xr.Dataset({'s2': s2_cube, 's1': s1_cube})"
        )
    sensors = {}
    for name in [*SCENE_SENSORS, *(n for n in companions(names) if n in SENSORS)]:
        da = ds[name]
        if tuple(da.dims) != CUBE_DIMS:
            raise CubeError(
                f"the Dataset's {name} has dims {tuple(da.dims)}, the cube contract's are {CUBE_DIMS}; "
                f"fix: ds['{name}'].transpose{CUBE_DIMS}"
            )
        bands = [str(b) for b in da[BAND].values]
        lacking = [b for b in SENSORS[name].bands if b not in bands]
        if lacking:
            raise CubeError(
                f"the Dataset's {name} lacks the bands {lacking} (it has {bands}); fix: give the {name} cube "
                f"every band of {list(SENSORS[name].bands)}"
            )
        da = da.sel({BAND: list(SENSORS[name].bands)})
        has_value = np.asarray(da.notnull().any(dim=[d for d in CUBE_DIMS if d != TIME]).values)
        da = da.isel({TIME: np.flatnonzero(has_value)})
        attrs = dict(da.attrs)
        for key in ("crs", "site", "provenance"):
            if key not in attrs and key in ds.attrs:
                attrs[key] = ds.attrs[key]
        if "crs" not in attrs and "spatial_ref" in da.coords and "crs_wkt" in da["spatial_ref"].attrs:
            attrs["crs"] = str(da["spatial_ref"].attrs["crs_wkt"])
        attrs.setdefault("sensor", name)
        attrs.setdefault("site", "scene")
        attrs.setdefault("provenance", provenance_json({"source": "an in-memory xr.Dataset (stembed.api)"}))
        sensors[name] = da.assign_attrs(attrs)
    return Scene(site=str(sensors[ANCHOR].attrs["site"]), sensors=sensors)


def _check_structure(scene: Scene) -> None:
    """The structural checks :func:`stembed.io.cube.open_scene` runs on a store, for a scene in memory."""
    from stembed.contract import CubeError

    scene.validate_cubes(check_values=False)
    if scene.s2.attrs.get("site") != scene.site:
        raise CubeError(
            f"Scene.site is {scene.site!r} but its S2 cube says site {scene.s2.attrs.get('site')!r}; "
            "fix: build the Scene with site=cube.attrs['site']"
        )


def _embed_in_memory(scene: str | Path | Scene | xr.Dataset, bundle: str | Path, cfg: EmbedConfig, *,
                     progress: bool) -> xr.Dataset:
    """Plan and check as ``stembed embed`` does, then embed each tile in this process: the same tiles, halo
    and batches, and the torch threads a one-worker run of ``stembed embed`` uses, so the same bits."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from stembed.inference.blocks import embed_tile, read_block
    from stembed.inference.engine import resolve_device
    from stembed.inference.plan import check_cube_values, n_features, plan_embedding
    from stembed.models.fusion import FusionBase
    from stembed.models.gapfill import GapFillModel

    if isinstance(scene, str | Path):
        plan = plan_embedding(scene, bundle, cfg, scheduler=None)
    else:
        in_memory = as_scene(scene)
        plan = plan_embedding(f"the scene {in_memory.site!r}", bundle, cfg, scheduler=None, scene=in_memory)
    check_cube_values(plan.scene, plan.cube)
    device = resolve_device(cfg.device)
    model = plan.bundle.build_model().to(device).eval()  # a gap-fill bundle: its fusion and filler layers
    if not isinstance(model, FusionBase | GapFillModel):  # pragma: no cover - the kind is checked by the plan
        raise TypeError("expected a fusion or gap-fill model")
    halo, k = plan.model.anchor.cfg.context_px, n_features(plan.model, cfg)
    grid, s2 = plan.grid, plan.scene.s2
    n_time = s2.sizes["time"] if plan.daily is None else plan.daily.last_day - plan.daily.first_day + 1
    values = np.full((n_time, k, s2.sizes["y"], s2.sizes["x"]), np.nan, dtype=np.float32)
    flags = None if plan.daily is None else np.zeros((n_time, s2.sizes["y"], s2.sizes["x"]), dtype=np.uint8)
    threads = torch.get_num_threads()
    if plan.threads is not None:
        torch.set_num_threads(plan.threads)
    try:
        for tile in tqdm(grid.tiles(), desc="tiles", disable=not progress):
            rows, cols = grid.bounds(*tile)
            block = read_block(plan.scene, rows, cols, halo, plan.max_gap_days, trailing=plan.model.cfg.trailing)
            tile_values, tile_flags = embed_tile(model, block, batch_size=cfg.batch_size, device=device,
                                                 precision=cfg.precision, daily=plan.daily, features=k)
            values[:, :, rows, cols] = tile_values
            if flags is not None and tile_flags is not None:
                flags[:, rows, cols] = tile_flags
    finally:
        torch.set_num_threads(threads)
    return _embedding_dataset(plan, values, flags)


def _embedding_dataset(plan: EmbedPlan, values: Any, flags: Any) -> xr.Dataset:
    """In-memory embeddings laid out as :func:`open_embeddings` gives a store: variables, coordinates, attributes."""
    import numpy as np
    import xarray as xr

    from stembed.config import dump_config
    from stembed.contract import cube_transform, with_georef
    from stembed.inference.daily import FLAG_MEANINGS, daily_dates
    from stembed.types import FEATURE, TIME, X, Y

    s2, daily = plan.scene.s2, plan.daily
    times = s2[TIME].values if daily is None else daily_dates(np.arange(daily.first_day, daily.last_day + 1))
    features = [f"E{i + 1}" for i in range(values.shape[1])]
    coords = {TIME: times, FEATURE: features, Y: s2[Y].values, X: s2[X].values}
    crs = str(s2.attrs["crs"])
    emb = with_georef(xr.DataArray(values, dims=(TIME, FEATURE, Y, X), coords=coords, attrs={"crs": crs}))
    emb.attrs = {"grid_mapping": "spatial_ref", "long_name": "fused embedding"}
    ds = xr.Dataset({"embedding": emb, "valid": ((TIME, Y, X), np.isfinite(values).all(axis=1))})
    if flags is not None:
        ds["flag"] = xr.DataArray(flags, dims=(TIME, Y, X), attrs={
            "flag_values": list(range(len(FLAG_MEANINGS))), "flag_meanings": " ".join(FLAG_MEANINGS)})
    model = plan.model
    ds.attrs = {
        "crs": crs,
        "transform": list(cube_transform(s2)),
        "features": features,
        "site": plan.scene.site,
        "bundle": {"path": str(plan.bundle_path.resolve()), "sha256": plan.bundle_sha256,
                   "provenance": plan.bundle.provenance},
        "config": dump_config(plan.cfg),
        "companion_sensors": list(model.companions),
        "window": None if model.cfg.window is None else dump_config(model.cfg.window),
        "nested": [n for n in model.prefixes if n <= values.shape[1]],
        "notes": list(plan.notes),
        "method": "in memory (stembed.api.embed): the tiles of stembed embed, in this process",
    }
    return ds
