"""Acceptance on real data: a short S2 stage-1 run on the Belgian WorldCereal patch beats both trivial baselines.

The run is the one in ``configs/dev_belgium_s2.yaml`` (small preset here to keep the suite fast), split
by disjoint spatial blocks so the test block's pixels were never trained on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stembed.config import AEStageConfig, load_config
from stembed.training.run import train_autoencoder

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dev_belgium_s2.yaml"


@pytest.mark.slow
def test_short_s2_run_on_belgian_patch_beats_trivial_baselines(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "00002806639B424A"
    cfg = load_config(AEStageConfig, CONFIG, [
        f"data.source.paths=[{folder}]", "preset=small", f"out_dir={tmp_path}", "train.progress_bar=false",
    ])
    run = train_autoencoder(cfg, run_dir=tmp_path / "run")
    for split in ("val", "test"):
        m = run.metrics["splits"][split]["s2"]
        assert m["centre_mae"] < m["baseline_patch_mean_centre_mae"], (split, m)
        assert m["centre_mae"] < m["baseline_temporal_neighbours_centre_mae"], (split, m)
