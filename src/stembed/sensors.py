"""Sensor facts: band order and normalisation contract, one frozen object per sensor.

These objects are the single source of truth for the band order a model sees and for
how raw values become the 0–1 floats in a cube. They travel inside every bundle, so a
model can refuse a cube whose bands or normalisation differ from those it was trained on.

Sentinel-2 is the anchor sensor (its dates are the embedding dates) and Sentinel-1 its built-in
companion. Further *companion sensors* plug in without touching the S1/S2 code: a module builds a
:class:`SensorPlugin` (spec + autoencoder defaults + date matching + a cube loader) and calls
:func:`register_sensor` at import. Built-in plugins (:mod:`stembed.io.agera5`) are registered by
:func:`load_builtin_plugins`, which the lookups call on a miss, so this module stays import-light
(stdlib only; the loaders import xarray themselves).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stembed.errors import UserError

if TYPE_CHECKING:
    import xarray as xr


@dataclass(frozen=True)
class SensorSpec:
    """Immutable description of one sensor's model-ready cube.

    Attributes:
        name: short key used in configs and bundles (``"s1"``, ``"s2"``).
        bands: channel order seen by the model; a cube's ``band`` coordinate must equal it.
        valid_range: the closed interval every finite cube value lies in after normalisation.
        normalisation: human-readable recipe from the raw product to the cube values.
        resolution_m: pixel size of the cube grid.
    """

    name: str
    bands: tuple[str, ...]
    valid_range: tuple[float, float]
    normalisation: str
    resolution_m: float = 10.0

    def __post_init__(self) -> None:
        if len(set(self.bands)) != len(self.bands):
            raise ValueError(f"sensor {self.name!r}: duplicate band names in {self.bands}")
        lo, hi = self.valid_range
        if not lo < hi:
            raise ValueError(f"sensor {self.name!r}: valid_range {self.valid_range} is empty")

    @property
    def n_bands(self) -> int:
        """Number of channels."""
        return len(self.bands)

    def to_dict(self) -> dict[str, Any]:
        """Plain-types form, for bundles and zarr attributes."""
        d = asdict(self)
        d["bands"] = list(self.bands)
        d["valid_range"] = list(self.valid_range)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SensorSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=str(d["name"]),
            bands=tuple(d["bands"]),
            valid_range=(float(d["valid_range"][0]), float(d["valid_range"][1])),
            normalisation=str(d["normalisation"]),
            resolution_m=float(d.get("resolution_m", 10.0)),
        )


S2_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
S1_BANDS = ("VV", "VH")

# dB limits of the Sentinel-1 normalisation (spec §1.3): clip to [-30, 5] dB, then (dB + 30) / 35.
S1_DB_MIN = -30.0
S1_DB_MAX = 5.0

S2 = SensorSpec(
    name="s2",
    bands=S2_BANDS,
    valid_range=(0.0, 1.0),
    normalisation=(
        "Sentinel-2 L2A surface reflectance (DN * 1e-4, after any BOA_ADD_OFFSET), 20 m bands "
        "resampled to 10 m, cloud/shadow pixels set to NaN, clipped to [0, 1]"
    ),
)

S1 = SensorSpec(
    name="s1",
    bands=S1_BANDS,
    valid_range=(0.0, 1.0),
    normalisation=(
        "Sentinel-1 backscatter in linear power, 3-frame centred rolling mean along time "
        "(min 1 frame), 10*log10, clipped to [-30, 5] dB, then (dB + 30) / 35"
    ),
)

SENSORS: dict[str, SensorSpec] = {"s1": S1, "s2": S2}
"""Every registered sensor's spec by key: ``s1``, ``s2`` and the registered companion sensors."""

ANCHOR = "s2"
"""The sensor whose dates are the embedding's dates (every other sensor is matched to them)."""
PAIRED = "s1"
"""The anchor's built-in partner: in every scene and fusion model, matched to the anchor's dates within
``data.s1_max_gap_days`` (a companion sensor's tolerance comes from its plugin)."""
CORE_SENSORS = (PAIRED, ANCHOR)
"""The sensors every fusion model has, in token order; companion sensors follow."""
SCENE_SENSORS = (ANCHOR, PAIRED)
"""The sensors every scene has, anchor first: the order of ``Scene.sensors`` and of a scene store's groups."""
BUILTIN_PLUGIN_MODULES = ("stembed.io.agera5",)
"""Modules that register the built-in companion sensors when imported."""
_RESERVED_NAMES = ("labels",)  # other groups of a scene store (stembed.io.cube.save_scene)


class SensorError(UserError):
    """An unknown sensor name or a bad sensor registration; the message names the problem and the fix."""


@dataclass(frozen=True)
class SensorPlugin:
    """What a companion sensor adds beyond its spec: model defaults, date matching, and how its cube is built.

    Attributes:
        spec: band order and normalisation of its cubes.
        latent_dim: default latent size of its autoencoder (``config.ae_preset`` uses it).
        reduced_tokens: default ``AEConfig.reduced_tokens`` for it.
        match_max_gap_days: a fusion frame on an S2 date takes the sensor's nearest date within this
            many days, else NaN (``data.build.matched_arrays``).
        load: ``(scene, site_folder or None) -> cube`` (time, band, y, x) on the scene's S2 grid, in the
            cube contract for ``spec``; ``site_folder`` is the scene's source folder when it has one.
    """

    spec: SensorSpec
    latent_dim: int
    reduced_tokens: int
    match_max_gap_days: float
    load: Callable[[Any, Path | None], xr.DataArray]

    def __post_init__(self) -> None:
        if self.latent_dim < 1 or self.reduced_tokens < 1:
            raise SensorError(
                f"sensor {self.spec.name!r}: latent_dim ({self.latent_dim}) and reduced_tokens "
                f"({self.reduced_tokens}) must be >= 1; fix: pass positive sizes to SensorPlugin"
            )
        if not self.match_max_gap_days >= 0:
            raise SensorError(
                f"sensor {self.spec.name!r}: match_max_gap_days is {self.match_max_gap_days}; "
                "fix: pass a gap in days >= 0"
            )
        if not callable(self.load):
            raise SensorError(f"sensor {self.spec.name!r}: load is not callable; fix: pass the cube loader")

    @property
    def name(self) -> str:
        """The sensor key (``spec.name``)."""
        return self.spec.name


PLUGINS: dict[str, SensorPlugin] = {}
"""Registered companion sensors by key (never ``s1``/``s2``)."""


def register_sensor(plugin: SensorPlugin, *, replace: bool = False) -> None:
    """Add a companion sensor to :data:`SENSORS` and :data:`PLUGINS`.

    Registration is global and keyed by ``plugin.spec.name``; a second registration under the same
    name is refused unless ``replace`` (re-registering the identical plugin, e.g. on a module reload,
    is a no-op), so two modules cannot silently shadow each other.

    Raises:
        SensorError: the name is ``s1``/``s2`` or already registered, or ``plugin`` is not a SensorPlugin.
    """
    if not isinstance(plugin, SensorPlugin):
        raise SensorError(
            f"register_sensor got a {type(plugin).__name__}; fix: wrap the spec in "
            "stembed.sensors.SensorPlugin(spec=..., latent_dim=..., reduced_tokens=..., "
            "match_max_gap_days=..., load=...)"
        )
    name = plugin.spec.name
    if name in (*CORE_SENSORS, *_RESERVED_NAMES):
        raise SensorError(
            f"cannot register a companion sensor named {name!r}: s1 and s2 are built in and "
            f"{list(_RESERVED_NAMES)} name other parts of a scene store; fix: give the new sensor's "
            "SensorSpec another name"
        )
    if not name or not name.isidentifier() or name != name.lower():
        raise SensorError(
            f"sensor name {name!r} is not a lower-case identifier; fix: use a key such as 'agera5' "
            "(it names config fields, zarr groups and bundle entries)"
        )
    old = PLUGINS.get(name)
    if old is not None and not _same_plugin(old, plugin) and not replace:
        raise SensorError(
            f"a sensor named {name!r} is already registered; fix: pick another name, or pass "
            "replace=True to register_sensor to swap it out on purpose"
        )
    PLUGINS[name] = plugin
    SENSORS[name] = plugin.spec


def know_spec(spec: SensorSpec) -> None:
    """Make a companion sensor's spec known for cube validation, without its plugin.

    For processes that only *read* its cubes, e.g. ``stembed embed`` workers, which take the spec
    from the bundle (that travels with the job) rather than from a registration they never ran.

    Raises:
        SensorError: another spec is already known under that name.
    """
    old = SENSORS.get(spec.name)
    if old is not None and old != spec:
        raise SensorError(
            f"the bundle's sensor {spec.name!r} differs from the registered one ({old.bands} vs {spec.bands}); "
            "fix: use a bundle trained with this sensor definition"
        )
    SENSORS[spec.name] = spec


def _same_plugin(a: SensorPlugin, b: SensorPlugin) -> bool:
    """Equal, or the same definition imported twice (a module reload makes a new ``load`` object)."""
    if a == b:
        return True
    same_load = all(
        getattr(a.load, k, None) == getattr(b.load, k, object()) for k in ("__module__", "__qualname__")
    )
    return same_load and (a.spec, a.latent_dim, a.reduced_tokens, a.match_max_gap_days) == (
        b.spec, b.latent_dim, b.reduced_tokens, b.match_max_gap_days
    )


def companions(names: Iterable[str]) -> tuple[str, ...]:
    """The companion sensors among ``names`` (every name but the core sensors'), in the given order."""
    return tuple(k for k in names if k not in CORE_SENSORS)


def load_builtin_plugins() -> None:
    """Import the modules of the built-in companion sensors, which register them (idempotent)."""
    for module in BUILTIN_PLUGIN_MODULES:
        importlib.import_module(module)


def _unknown(name: Any) -> SensorError:
    return SensorError(
        f"unknown sensor {name!r}; known sensors: {sorted(SENSORS)} (companion sensors: {sorted(PLUGINS)}); "
        "fix: check the name, or import the module that registers it (e.g. import stembed.io.agera5), "
        "which calls stembed.sensors.register_sensor(SensorPlugin(...))"
    )


def get_sensor(name: str) -> SensorSpec:
    """Look up a registered sensor's spec by key (built-in plugins are loaded on a miss).

    Raises:
        SensorError: no sensor of that name is registered; the message lists the known ones.
    """
    if not isinstance(name, str):
        raise _unknown(name)
    if name not in SENSORS:
        load_builtin_plugins()
    try:
        return SENSORS[name]
    except KeyError:
        raise _unknown(name) from None


def get_plugin(name: str) -> SensorPlugin:
    """Look up a companion sensor's plugin by key (built-in plugins are loaded on a miss).

    Raises:
        SensorError: ``name`` is ``s1``/``s2`` (no plugin: built into the pipeline) or not registered.
    """
    if not isinstance(name, str):
        raise _unknown(name)
    if name not in PLUGINS:
        load_builtin_plugins()
    if name in CORE_SENSORS:
        raise SensorError(
            f"{name!r} is built into the pipeline, not a companion-sensor plugin; fix: list only companion "
            f"sensors in data.extra_sensors (registered: {sorted(PLUGINS)})"
        )
    try:
        return PLUGINS[name]
    except KeyError:
        raise _unknown(name) from None
