"""Bundles: the unit of reuse. Weights + resolved config + sensor band order/normalisation + provenance.

A bundle is one ``torch.save`` file holding only plain types and tensors, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs). The model is always rebuilt from the
config stored in the bundle, never from defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from stembed.config import AEConfig, FusionConfig, dump_config
from stembed.errors import UserError
from stembed.sensors import CORE_SENSORS, SensorSpec, companions

BUNDLE_FORMAT = "stembed-bundle/1"
BundleKind = Literal["autoencoder", "fusion", "gapfill"]
"""``gapfill`` holds a whole fusion bundle's model plus the fusion layers for cloudy dates (models.gapfill)."""


class BundleError(UserError):
    """A file that is not a usable stembed bundle, or a bundle of the wrong kind or sensor."""


class BundleConfig(BaseModel):
    """A bundle's config in one shape for every kind, typed once at load (:meth:`from_file`).

    The file keeps its plain dict, nested by kind as stembed has always written it (:meth:`to_dict`;
    ``Bundle.config``), so the format does not change; the code reads this instead of that nesting.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: BundleKind
    models: dict[str, AEConfig]  # each sensor's autoencoder by sensor name (an autoencoder bundle: its one)
    fusion_model: FusionConfig | None = None  # the fusion layers (a gap-fill bundle: its fusion's and filler's)
    stage: dict[str, Any] = Field(default_factory=dict)  # the stage config that trained it ({}: not recorded)
    fusion_stage: dict[str, Any] = Field(default_factory=dict)  # a gap-fill bundle: the stage of its fusion

    @classmethod
    def from_file(cls, kind: BundleKind, sensor: str | None, config: dict[str, Any]) -> BundleConfig:
        """Type a bundle file's ``config`` (already in today's keyed form, :func:`upgrade_fusion`).

        Raises:
            KeyError: an entry the model needs is missing (named like ``models.s2``).
            ValidationError: a model config does not describe a model.
        """
        stage = config.get("stage") or {}
        if kind == "autoencoder":
            model = AEConfig.model_validate(config["model"])
            return cls(kind=kind, models={sensor or model.sensor: model}, stage=stage)
        fusion = config["fusion"] if kind == "gapfill" else config
        models = fusion["models"]
        for key in CORE_SENSORS:
            if key not in models:
                raise KeyError(f"models.{key}")
        fusion_model = FusionConfig.model_validate(fusion["model"])
        return cls(
            kind=kind, models={k: AEConfig.model_validate(v) for k, v in models.items()}, fusion_model=fusion_model,
            stage=stage, fusion_stage=(fusion.get("stage") or {}) if kind == "gapfill" else {},
        )

    def to_dict(self) -> dict[str, Any]:
        """The plain dict a bundle file holds (``save_bundle(config=...)``), laid out as stembed has always written it."""
        if self.kind == "gapfill":
            return {"fusion": self.fusion_part.to_dict(), "stage": self.stage}
        if self.fusion_model is None:
            (model,) = self.models.values()
            return {"model": dump_config(model), "stage": self.stage}
        models = {k: dump_config(v) for k, v in self.models.items()}
        return {"model": dump_config(self.fusion_model), "models": models, "stage": self.stage}

    @property
    def fusion_part(self) -> BundleConfig:
        """The fusion bundle's config within this one: itself, or a gap-fill bundle's fusion with that stage."""
        if self.kind == "autoencoder":
            raise ValueError("an autoencoder bundle has no fusion part")
        if self.kind == "fusion":
            return self
        return self.model_copy(update={"kind": "fusion", "stage": self.fusion_stage, "fusion_stage": {}})

    @property
    def companions(self) -> tuple[str, ...]:
        """The companion sensors (every sensor but S1 and S2), in token order."""
        return companions(self.models)

    @property
    def s1_gap_days(self) -> float:
        """S1's matching tolerance (days) the bundle was trained with: its stage's ``data.s1_max_gap_days``, or
        6.0 (that setting's default) where the bundle records none."""
        data = self.stage.get("data") or {}
        return float(data.get("s1_max_gap_days", 6.0))


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle. ``sensor`` is the AE's sensor key, or None for a fusion bundle.

    ``config`` is the dict the file holds (what ``stembed info`` shows); ``cfg`` is the same, typed.
    """

    kind: BundleKind
    sensor: str | None
    config: dict[str, Any]
    cfg: BundleConfig
    sensors: dict[str, SensorSpec]
    provenance: dict[str, Any]
    metrics: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    path: Path | None = None

    def build_model(self) -> nn.Module:
        """Rebuild the model from the stored config and load the weights (strict); eval mode."""
        from stembed.models.autoencoder import SensorAutoencoder
        from stembed.models.fusion import build_fusion, paper_fusion
        from stembed.models.gapfill import GapFillModel

        model: nn.Module
        cfg = self.cfg
        if cfg.fusion_model is None:
            (ae,) = cfg.models.values()
            model = SensorAutoencoder(ae)
        else:
            model = build_fusion(cfg.models, cfg.fusion_model)
            if cfg.kind == "gapfill":
                model = GapFillModel(paper_fusion(model, "a gap-fill bundle"))
        _load_weights(model, self.state_dict, self.path)
        return model.eval()


_FIX_DAMAGED = "fix: retrain it, or pass the bundle.pt of an intact stembed run"


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path | None) -> None:
    """``model.load_state_dict(state, strict=True)``, with a mismatch reported as a one-line BundleError."""
    where = f"bundle {path}" if path is not None else "the bundle"
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in wanted]
    shapes = [
        f"{k} is {tuple(state[k].shape)}, the model needs {tuple(v.shape)}"
        for k, v in wanted.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, names in (("lacks weights", missing), ("holds unknown weights", unexpected)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            problems.append(f"{label} {', '.join(names[:3])}{more}")
    if shapes:
        more = f" and {len(shapes) - 2} more" if len(shapes) > 2 else ""
        problems.append(f"has weights of the wrong shape ({'; '.join(shapes[:2])}{more})")
    if problems:
        raise BundleError(
            f"{where} does not match the model its config describes: {'; '.join(problems)}; {_FIX_DAMAGED}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # anything the checks above did not foresee (e.g. a dtype torch refuses)
        raise BundleError(f"{where}: its weights do not load ({e}); {_FIX_DAMAGED}".replace("\n", " ")) from e


def save_bundle(
    path: str | Path,
    *,
    kind: BundleKind,
    sensor: str | None,
    model: nn.Module,
    config: dict[str, Any],
    sensors: dict[str, SensorSpec],
    provenance: dict[str, Any],
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle atomically (temp file, then rename), so a crash never leaves a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": BUNDLE_FORMAT,
        "kind": kind,
        "sensor": sensor,
        "config": config,
        "sensors": {k: v.to_dict() for k, v in sensors.items()},
        "provenance": provenance,
        "metrics": metrics or {},
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(payload, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


_NAMES = {"s1": "Sentinel-1", "s2": "Sentinel-2"}


def _describe(kind: str, sensor: str | None) -> str:
    if kind == "fusion":
        return "a fusion model"
    if kind == "gapfill":
        return "a gap-fill model (a fusion model plus fusion layers for cloudy dates)"
    return f"an {_NAMES.get(str(sensor), sensor)} autoencoder"


def load_bundle(
    path: str | Path,
    *,
    expect_kind: BundleKind | tuple[BundleKind, ...] | None = None,
    expect_sensor: str | None = None,
) -> Bundle:
    """Load a bundle with ``weights_only=True`` and check it is the kind (one of the kinds) and sensor the caller needs."""
    from stembed.pretrained import resolve_bundle

    path = resolve_bundle(path)  # pretrained:NAME -> the shipped file
    raw = _read_payload(path)
    kind, sensor = raw["kind"], raw.get("sensor")
    kinds = (expect_kind,) if isinstance(expect_kind, str) else expect_kind
    if (kinds is not None and kind not in kinds) or (expect_sensor is not None and sensor != expect_sensor):
        want = " or ".join(_describe(k, expect_sensor) for k in (kinds or (kind,)))
        raise BundleError(f"{path} holds {_describe(kind, sensor)}, but {want} is needed here; pass the right bundle")
    _check_entry_types(path, raw)
    sensors = _sensor_specs(path, raw["sensors"])
    config, state = raw["config"], raw["state_dict"]
    if kind in ("fusion", "gapfill"):
        config, state = upgrade_fusion(kind, config, state)
    return Bundle(
        kind=kind,
        sensor=sensor,
        config=config,
        cfg=_typed_config(path, kind, sensor, config),
        sensors=sensors,
        provenance=raw["provenance"],
        metrics=raw.get("metrics", {}),
        state_dict=state,
        path=path,
    )


def stage1_bundle(path: str | Path, sensor: str) -> Bundle:
    """A sensor's stage-1 autoencoder: an autoencoder bundle's, or the frozen one inside a fusion bundle (so new
    fusion layers can be trained on a shipped model's autoencoders, e.g. ``pretrained:belgium``)."""
    b = load_bundle(path, expect_kind=("autoencoder", "fusion"))
    if b.kind == "autoencoder":
        if b.sensor != sensor:
            raise BundleError(f"{b.path} holds {_describe(b.kind, b.sensor)}, but {_describe('autoencoder', sensor)} is "
                              "needed here; pass the right bundle")
        return b
    if sensor not in b.cfg.models:
        raise BundleError(f"{b.path} is a fusion model of {sorted(b.cfg.models)}, without a {sensor} autoencoder; "
                          "pass a bundle that has one")
    lead = f"autoencoders.{sensor}."
    model = b.cfg.models[sensor]
    stage = {"from_fusion_bundle": str(b.path), "stage": b.cfg.stage}
    return Bundle(
        kind="autoencoder", sensor=sensor,
        config=BundleConfig(kind="autoencoder", models={sensor: model}, stage=stage).to_dict(),
        cfg=BundleConfig(kind="autoencoder", models={sensor: model}, stage=stage),
        sensors={sensor: b.sensors[sensor]}, provenance=b.provenance, metrics={},
        state_dict={k[len(lead) :]: v for k, v in b.state_dict.items() if k.startswith(lead)}, path=b.path,
    )


_NEEDED = ("kind", "config", "sensors", "provenance", "state_dict")


def _read_payload(path: Path) -> dict[str, Any]:
    """The file's dict, checked to be a stembed bundle of this format and a known kind with every entry present."""
    if not path.is_file():
        raise BundleError(f"bundle {path} does not exist; train one with `stembed train s1|s2|fusion`")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a foreign file; name the file and the cause
        raise BundleError(f"{path} is not a stembed bundle (torch.load failed: {type(e).__name__}: {e})") from e
    if not isinstance(raw, dict) or "format" not in raw:
        raise BundleError(f"{path} is not a stembed bundle (no 'format' entry); pass a bundle.pt from a stembed run")
    if raw["format"] != BUNDLE_FORMAT:
        raise BundleError(
            f"{path} has bundle format {raw['format']!r}, but this stembed reads {BUNDLE_FORMAT!r}; "
            "use the stembed version that wrote it, or retrain"
        )
    lacking = [k for k in _NEEDED if k not in raw]
    if lacking:
        raise BundleError(
            f"bundle {path} is damaged: it lacks the entries {lacking} (a bundle holds {list(_NEEDED)}); "
            f"{_FIX_DAMAGED}"
        )
    if raw["kind"] not in ("autoencoder", "fusion", "gapfill"):
        raise BundleError(f"{path} has unknown bundle kind {raw['kind']!r}")
    return raw


def _check_entry_types(path: Path, raw: dict[str, Any]) -> None:
    """The mapping entries are mappings and every weight a tensor (a damaged file fails here, not in the model)."""
    wrong = [
        f"its {k} entry is a {type(raw[k]).__name__}, not a mapping"
        for k in ("config", "sensors", "provenance", "state_dict")
        if not isinstance(raw[k], dict)
    ]
    if not wrong:
        wrong = [
            f"its weight {k!r} is a {type(v).__name__}, not a tensor"
            for k, v in raw["state_dict"].items()
            if not isinstance(v, torch.Tensor)
        ]
    if wrong:
        raise BundleError(f"bundle {path} is damaged: {wrong[0]}; {_FIX_DAMAGED}")


def _sensor_specs(path: Path, raw: dict[str, Any]) -> dict[str, SensorSpec]:
    """The bundle's sensor specs by name (what cubes must match to be embedded with it)."""
    try:
        return {k: SensorSpec.from_dict(v) for k, v in raw.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(
            f"bundle {path} is damaged: its sensor specs do not read ({type(e).__name__}: {e}); "
            f"{_FIX_DAMAGED}"
        ) from e


def _typed_config(path: Path, kind: BundleKind, sensor: str | None, config: dict[str, Any]) -> BundleConfig:
    """:meth:`BundleConfig.from_file`, a config that does not describe a model reported as a damaged bundle."""
    try:
        return BundleConfig.from_file(kind, sensor, config)
    except (KeyError, ValidationError) as e:
        what = f"lacks the entry {e}" if isinstance(e, KeyError) else f"is invalid ({e.error_count()} errors)"
        raise BundleError(f"bundle {path} is damaged: its model config {what}; {_FIX_DAMAGED}") from e


# ----------------------------------------------------------------------------- bundles written before sensors were keyed
_OLD_MODEL_KEYS = ("s1_model", "s2_model", "extra_models")
_OLD_PREFIXES = (  # state-dict prefix of a fusion model up to stembed 123f5ca -> today's (models.fusion.FusionModel)
    ("s1.", "autoencoders.s1."), ("s2.", "autoencoders.s2."), ("extra.", "autoencoders."),
    ("project_s1.", "project.s1."), ("project_s2.", "project.s2."), ("project_extra.", "project."),
    ("head_s1.", "heads.s1."), ("head_s2.", "heads.s2."), ("head_extra.", "heads."),
)


def _upgrade_fusion_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """``s1_model``/``s2_model``/``extra_models`` (before sensors were keyed) -> ``models`` by sensor name."""
    if "models" in cfg or not any(k in cfg for k in _OLD_MODEL_KEYS):
        return cfg
    models = {k: cfg[f"{k}_model"] for k in ("s1", "s2") if f"{k}_model" in cfg}
    extra = cfg.get("extra_models") or {}
    models |= extra if isinstance(extra, dict) else {}
    return {**{k: v for k, v in cfg.items() if k not in _OLD_MODEL_KEYS}, "models": models}


def _upgrade_fusion_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Rename a fusion model's weights under ``prefix`` from the pre-keyed names (``project_s1.weight``, ``s1.…``,
    ``extra.toy.…``) to today's (``project.s1.weight``, ``autoencoders.s1.…``); names already new are kept."""
    if prefix + "project_s2.weight" not in state:
        return state
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            for old, new in _OLD_PREFIXES:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            key = prefix + rest
        out[key] = value
    return out


def upgrade_fusion(
    kind: str, config: dict[str, Any], state: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A fusion or gap-fill bundle's config and weights in today's keyed form, whatever stembed wrote them.

    Bundles written before sensors were keyed (up to 123f5ca) store ``s1_model``/``s2_model``/``extra_models`` and
    weights named ``project_s1``/``head_s2``/``s1.``/``extra.<k>.``; they load as if written today (same numbers).
    """
    if kind == "gapfill":
        fusion = config.get("fusion")
        if isinstance(fusion, dict):
            config = {**config, "fusion": _upgrade_fusion_config(fusion)}
        return config, _upgrade_fusion_state(_upgrade_fusion_state(state, "fusion."), "filler.")
    return _upgrade_fusion_config(config), _upgrade_fusion_state(state, "")
