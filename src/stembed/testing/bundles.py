"""Torch bundles for tests and benchmarks: :func:`random_fusion_bundle` (untrained, seeded). torch and the models
are imported inside the function, so importing :mod:`stembed.testing` stays torch-free."""

from __future__ import annotations

from typing import Any

from stembed.sensors import CORE_SENSORS, SENSORS


def random_fusion_bundle(
    path: Any,
    *,
    seed: int = 0,
    preset: str = "small",
    tiny: bool = False,
    sensors: dict[str, Any] | None = None,
    gapfill: bool = False,
) -> Any:
    """Write an untrained fusion bundle with seeded random weights and return its path.

    For tests and benchmarks where only the arithmetic matters (equality of two inference paths,
    speed). ``tiny`` takes the ``tiny`` preset instead of ``preset``; ``sensors`` replaces the band specs.
    ``gapfill`` writes a gap-fill bundle whose filler layers are random too (not a copy of the fusion's).
    """
    import torch

    from stembed.config import ae_preset, fusion_preset
    from stembed.models.autoencoder import SensorAutoencoder
    from stembed.models.bundle import save_bundle
    from stembed.models.fusion import FusionModel
    from stembed.models.gapfill import GapFillModel

    name = "tiny" if tiny else preset
    aes, f = {k: ae_preset(name, k) for k in CORE_SENSORS}, fusion_preset(name)
    torch.manual_seed(seed)
    model = FusionModel({k: SensorAutoencoder(a) for k, a in aes.items()}, f)
    config = {"model": f.model_dump(mode="json"), "models": {k: a.model_dump(mode="json") for k, a in aes.items()}}
    sensors = sensors or {k: SENSORS[k] for k in CORE_SENSORS}
    provenance = {"note": f"random weights, seed {seed}"}
    if not gapfill:
        return save_bundle(path, kind="fusion", sensor=None, model=model, config=config, sensors=sensors,
                           provenance=provenance)
    both = GapFillModel(model)
    with torch.no_grad():
        for p in both.fill_parameters():
            p.normal_(0.0, 0.1)
    return save_bundle(path, kind="gapfill", sensor=None, model=both, config={"fusion": config}, sensors=sensors,
                       provenance=provenance)
