"""Reopen a finished ``stembed train`` run folder: its typed stage config, its bundle, and its data splits rebuilt
as training built them.

Experiments, benchmarks and ``stembed eval recon --bundle`` rebuild a run's data here rather than by hand: the
copies that re-read ``config.yaml`` themselves drifted apart (one forgot the companion sensors). The splits
come from the config (scenes, split, sampling, seed) and the bundle's model configs (their context window, their
sensors), as :mod:`stembed.training.run` builds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from stembed.config import AEStageConfig, DataConfig, FusionStageConfig, GapFillStageConfig, load_config
from stembed.contract import Scene
from stembed.data.build import SplitData, build_fusion_data, build_sensor_data
from stembed.data.scenes import load_scenes
from stembed.errors import UserError
from stembed.models.bundle import Bundle, BundleConfig, load_bundle
from stembed.sensors import ANCHOR

StageConfig = AEStageConfig | FusionStageConfig | GapFillStageConfig
"""The config of a training stage, as a run folder's ``config.yaml`` holds it."""

# stage (config.yaml's ``stage``) -> its config class and the kind of bundle it writes
_STAGES: dict[str, tuple[type[StageConfig], str]] = {
    "ae": (AEStageConfig, "autoencoder"),
    "fusion": (FusionStageConfig, "fusion"),
    "gapfill": (GapFillStageConfig, "gapfill"),
}
_FIX = "fix: pass the folder a finished `stembed train` run wrote (its --run-dir: config.yaml, metrics.json, bundle.pt)"


class RunError(UserError):
    """A folder that is not a finished training run; the message names what is missing and the fix."""


@dataclass(frozen=True)
class Run:
    """A finished training run folder, reopened by :func:`open_run`.

    Attributes:
        path: the run folder.
        config: its stage config, read back from ``config.yaml`` as ``stembed train --config`` reads one.
        bundle: its ``bundle.pt``; ``bundle.build_model()`` rebuilds the trained model.
    """

    path: Path
    config: StageConfig
    bundle: Bundle

    def data(self) -> SplitData:
        """The run's train, val and test patches, rebuilt as training built them (:func:`split_data` with the
        config's data and seed): ``info`` is the ``data`` entry of ``metrics.json`` (a dense run's adds the
        ``n_tiles`` it cut from these patches' regions). Rebuilt on every call: it reads every scene, so keep
        the result."""
        data = self.config.data
        return split_data(self.bundle.cfg, load_scenes(data), data, np.random.default_rng(self.config.train.seed))


def split_data(cfg: BundleConfig, scenes: list[Scene], data: DataConfig, rng: np.random.Generator) -> SplitData:
    """The patches the models of ``cfg`` train on, drawn from ``scenes`` as ``data`` says: an autoencoder's own
    sensor on its own dates; for a fusion or gap-fill model, the anchor (S2) with S1 and every companion sensor it
    reads on the anchor's dates. Each patch is read with the encoders' context window (the anchor's, for a fusion).

    Training builds its splits here too (:mod:`stembed.training.run`), so a run's splits rebuild as they were.
    """
    if cfg.fusion_model is None:
        ((sensor, model),) = cfg.models.items()
        return build_sensor_data(scenes, sensor, data, rng, context_px=model.context_px)
    return build_fusion_data(scenes, data, rng, context_px=cfg.models[ANCHOR].context_px, extra=cfg.companions,
                             trailing=cfg.fusion_model.trailing)


def open_run(run_dir: str | Path) -> Run:
    """Reopen a finished ``stembed train`` run folder: its config, its bundle, and (``Run.data()``) its splits.

    Raises:
        RunError: the folder is missing, lacks ``config.yaml`` or ``bundle.pt``, holds a config that is not a
            training stage's, or a bundle of another stage.
        ConfigError: ``config.yaml`` does not validate.
        BundleError: ``bundle.pt`` is not a readable stembed bundle.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise RunError(f"run folder {path} does not exist or is not a folder; {_FIX}")
    config_file, bundle_file = path / "config.yaml", path / "bundle.pt"
    if not config_file.is_file():
        raise RunError(f"{path} has no config.yaml, so it is not a training run's folder; {_FIX}")
    stage = _stage(config_file)
    if stage not in _STAGES:
        raise RunError(f"{config_file} is not a training stage's config (its stage is {stage!r}); {_FIX}")
    if not bundle_file.is_file():
        raise RunError(
            f"{path} has no bundle.pt: its training did not finish; fix: rerun its `stembed train` command with "
            f"--resume {path / 'checkpoints' / 'last.ckpt'} to finish it, or pass a finished run"
        )
    cls, kind = _STAGES[stage]
    config = load_config(cls, config_file)
    bundle = load_bundle(bundle_file)
    sensor = config.sensor if isinstance(config, AEStageConfig) else None
    if (bundle.kind, bundle.sensor) != (kind, sensor):
        raise RunError(
            f"{path} mixes two runs: config.yaml is a stage '{stage}' config{f' for {sensor}' if sensor else ''} "
            f"but bundle.pt holds a {bundle.kind} bundle{f' for {bundle.sensor}' if bundle.sensor else ''}; {_FIX}"
        )
    return Run(path=path, config=config, bundle=bundle)


def _stage(config_file: Path) -> Any:
    """The ``stage`` entry of a YAML file; None if it is not a readable mapping."""
    try:
        raw = yaml.safe_load(config_file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return raw.get("stage") if isinstance(raw, dict) else None
