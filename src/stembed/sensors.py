"""Sensor facts: band order and normalisation contract, one frozen object per sensor.

These objects are the single source of truth for the band order a model sees and for
how raw values become the 0–1 floats in a cube. They travel inside every bundle, so a
model can refuse a cube whose bands or normalisation differ from those it was trained on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


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


def get_sensor(name: str) -> SensorSpec:
    """Look up a registered sensor by key, with an error listing the known keys."""
    try:
        return SENSORS[name]
    except KeyError:
        raise ValueError(f"unknown sensor {name!r}; known sensors: {sorted(SENSORS)}") from None
