"""What ``stembed cube`` is asked for (:class:`CubeRequest`: everything that decides a cube's content) and
what it did (:class:`BuildResult`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stembed.config import CubeConfig, load_config
from stembed.errors import CubeBuildError
from stembed.geometry import GridSpec
from stembed.io.stac import PLANETARY_COMPUTER, S1_COLLECTION, S2_COLLECTION, RetryPolicy
from stembed.preprocess import CloudMask, SCLMask, load_cloud_mask

MIN_DATES_DEFAULT = 6
"""S2 dates a cube needs for one 11-frame window reflected at the ends (``data.windows.min_dates(11)``)."""
ORBITS = ("auto", "ascending", "descending", "both")
"""The values of ``--s1-orbit``."""


@dataclass(frozen=True)
class CubeRequest:
    """Everything that decides the cube's content (and so whether a staged build can be resumed)."""

    grid: GridSpec
    start: str
    end: str
    site: str
    catalog: str = PLANETARY_COMPUTER
    s2_collection: str = S2_COLLECTION
    s1_collection: str = S1_COLLECTION
    cloud_mask: CloudMask = field(default_factory=SCLMask)
    brdf: bool = True
    min_valid_fraction: float = 0.03
    min_dates: int = MIN_DATES_DEFAULT
    s1_orbit: str = "auto"
    s1_max_gap_days: float = 6.0
    piece_months: int = 12
    resampling: str = "nearest"
    chunk_px: int = 2048
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.s1_orbit not in ORBITS:
            raise CubeBuildError(f"--s1-orbit is {self.s1_orbit!r}; use one of {', '.join(ORBITS)}")
        if not 0.0 <= self.min_valid_fraction <= 1.0:
            raise CubeBuildError(f"--min-valid-fraction is {self.min_valid_fraction}; use a share in [0, 1]")
        if self.min_dates < 1:
            raise CubeBuildError(f"--min-dates is {self.min_dates}; use at least 1")
        if not self.s1_max_gap_days >= 0:
            raise CubeBuildError(f"--s1-max-gap-days is {self.s1_max_gap_days}; use >= 0 days")
        if self.resampling not in ("nearest", "bilinear", "cubic", "average"):
            raise CubeBuildError(
                f"--resampling is {self.resampling!r}; use nearest, bilinear, cubic or average"
            )
        if not self.site:
            raise CubeBuildError("the site id is empty; fix: pass --site NAME")

    def identity(self) -> dict[str, Any]:
        """The JSON facts a staged build must match to be resumed (retry settings do not count)."""
        return {
            "format": 1,
            "grid": self.grid.to_dict(),
            "start": self.start,
            "end": self.end,
            "site": self.site,
            "catalog": self.catalog,
            "s2_collection": self.s2_collection,
            "s1_collection": self.s1_collection,
            "cloud_mask": self.cloud_mask.describe(),
            "brdf": self.brdf,
            "min_valid_fraction": self.min_valid_fraction,
            "min_dates": self.min_dates,
            "s1_orbit": self.s1_orbit,
            "s1_max_gap_days": self.s1_max_gap_days,
            "piece_months": self.piece_months,
            "resampling": self.resampling,
        }


@dataclass(frozen=True)
class BuildResult:
    """What :func:`build_cube` did."""

    path: Path
    s2_dates: int
    s1_dates: int
    s2_dates_with_s1: int
    s1_max_gap_days: float  # the tolerance of s2_dates_with_s1
    s1_orbit: str
    pieces_loaded: int
    pieces_reused: int
    notes: tuple[str, ...]


def cube_settings(
    config: str | Path | None = None, settings: Mapping[str, Any] | None = None, overrides: Sequence[str] = (),
) -> CubeConfig:
    """The ``CubeConfig`` of a YAML file, then ``--set`` overrides, then keyword settings (each wins over the last;
    a setting of None is not given).

    Raises:
        ConfigError: an unknown key or a value of the wrong type (each named).
    """
    # JSON is YAML: each value parses back to itself (False -> false, [0, 1] -> [0, 1], "scl" -> 'scl')
    given = [f"{key}={json.dumps(value)}" for key, value in (settings or {}).items() if value is not None]
    return load_config(CubeConfig, config, [*overrides, *given])


def shared_settings(cfg: CubeConfig) -> dict[str, Any]:
    """The :class:`CubeRequest` fields every site of ``cfg`` shares (all but area, period and id), the cloud mask
    built once.

    Raises:
        CubeBuildError: the cloud mask cannot be built.
    """
    return dict(
        catalog=cfg.catalog or PLANETARY_COMPUTER, s2_collection=cfg.s2_collection, s1_collection=cfg.s1_collection,
        cloud_mask=load_cloud_mask(cfg.cloud_mask, scl_classes=cfg.scl_classes), brdf=cfg.brdf,
        min_valid_fraction=cfg.min_valid_fraction, min_dates=cfg.min_dates, s1_orbit=cfg.s1_orbit,
        s1_max_gap_days=cfg.s1_max_gap_days, piece_months=cfg.piece_months, retry=RetryPolicy(retries=cfg.retries),
    )
