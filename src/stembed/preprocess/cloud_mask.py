"""Which Sentinel-2 pixels are clear: the :class:`CloudMask` protocol, the Sen2Cor :class:`SCLMask`, and
:func:`load_cloud_mask` for ``stembed cube --cloud-mask`` (``scl`` or a user's ``module:Factory``). No torch here;
a model-based mask brings its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import import_module
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from stembed.errors import CubeBuildError
from stembed.preprocess.prepare import SCL_MASKED_DEFAULT


@runtime_checkable
class CloudMask(Protocol):
    """Which S2 pixels are clear. Plug a model-based mask (e.g. a CloudSEN12-type network) in here.

    ``assets``: the extra item assets it reads (loaded onto the cube grid with ``nearest``);
    ``needs_reflectance``: whether :meth:`clear` wants the reflectance bands;
    :meth:`clear` gets ``reflectance`` (time, band, y, x) float32 in the cube band order, *after* the
    BOA offset and *before* BRDF (None when not needed), and ``extra`` {asset: (time, y, x) array};
    it returns a bool array (time, y, x), True = clear. :meth:`describe` goes into the provenance.

    A user's model mask is a class with these members, e.g. in ``mymasks.py``::

        class CloudSen12Mask:
            assets = ()
            needs_reflectance = True
            def __init__(self): self.net = load_my_weights("cloudsen12.pt")
            def clear(self, reflectance, extra): return self.net.predict(reflectance) == 0
            def describe(self): return {"kind": "cloudsen12", "weights": "cloudsen12.pt"}

    and ``stembed cube --cloud-mask mymasks:CloudSen12Mask`` builds it (no arguments).
    """

    # read-only members: a class attribute (``assets = ()``), a ClassVar or a property all fit
    @property
    def assets(self) -> tuple[str, ...]:
        """The extra item assets :meth:`clear` reads."""

    @property
    def needs_reflectance(self) -> bool:
        """Whether :meth:`clear` wants the reflectance bands."""

    def clear(self, reflectance: np.ndarray | None, extra: dict[str, np.ndarray]) -> np.ndarray:
        """The clear-sky mask (time, y, x) of one piece; True = clear."""

    def describe(self) -> dict[str, Any]:
        """What this mask is and how it was set up, for the store's provenance."""


@dataclass(frozen=True)
class SCLMask:
    """The Sen2Cor scene classification: pixels of ``classes`` (plus 0 = no data) are not clear."""

    classes: tuple[int, ...] = SCL_MASKED_DEFAULT
    asset: str = "SCL"
    needs_reflectance: ClassVar[bool] = False

    @property
    def assets(self) -> tuple[str, ...]:
        """The SCL asset, the one extra asset this mask reads."""
        return (self.asset,)

    def masked_classes(self) -> list[int]:
        """The SCL classes that are not clear, always including 0 (no data)."""
        return sorted({int(c) for c in self.classes} | {0})

    def clear(self, reflectance: np.ndarray | None, extra: dict[str, np.ndarray]) -> np.ndarray:
        """True where the SCL class is not among :meth:`masked_classes`."""
        return ~np.isin(np.asarray(extra[self.asset]), self.masked_classes())

    def describe(self) -> dict[str, Any]:
        """``kind``, asset and masked classes, for the store's provenance."""
        return {"kind": "scl", "asset": self.asset, "masked_classes": self.masked_classes()}


def load_cloud_mask(spec: str, *, scl_classes: Sequence[int] | None = None) -> CloudMask:
    """``"scl"`` -> :class:`SCLMask` (``scl_classes`` or the default classes); ``"module:name"`` -> ``name()``.

    Raises:
        CubeBuildError: the module or name cannot be imported, or the object is not a :class:`CloudMask`.
    """
    if spec == "scl":
        return SCLMask(tuple(scl_classes) if scl_classes is not None else SCL_MASKED_DEFAULT)
    if scl_classes is not None:
        raise CubeBuildError("--scl-classes only applies to --cloud-mask scl")
    module, _, name = spec.partition(":")
    if not module or not name:
        raise CubeBuildError(f"--cloud-mask {spec!r}: use 'scl' or 'package.module:ClassOrFactory'")
    try:
        factory = getattr(import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise CubeBuildError(
            f"--cloud-mask {spec!r} cannot be imported ({e}); fix: check the module path"
        ) from e
    mask = factory()
    if not isinstance(mask, CloudMask):
        raise CubeBuildError(
            f"--cloud-mask {spec!r} built a {type(mask).__name__}, which lacks the CloudMask members (assets, "
            "needs_reflectance, clear, describe); see stembed.preprocess.CloudMask"
        )
    return mask
