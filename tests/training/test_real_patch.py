"""Training on the real Belgian WorldCereal patch, end to end (short: the full run is configs/belgium_s2.yaml).

The acceptance figures come from the full config (docs/results/models-that-learn.md); here the same path
(dense training on tiles) runs for a few batches to prove it works on real data and that the block
split keeps val/test pixels out of training.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from stembed.config import AEStageConfig, load_config
from stembed.training.run import RunResult, train_autoencoder

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "belgium_s2.yaml"


def _short_config(shared_data: Path, tmp_path: Path, *extra: str) -> AEStageConfig:
    """The Belgian S2 config cut to 4 training batches of one epoch."""
    folder = shared_data / "00002806639B424A"
    return load_config(AEStageConfig, CONFIG, [
        f"data.source.paths=[{folder}]", f"out_dir={tmp_path}", "train.progress_bar=false", "train.max_epochs=1",
        "train.limit_train_batches=4", "train.val_every_n_epochs=1", "data.sampling.spatial_stride=4", *extra,
    ])


@pytest.fixture(scope="module")
def short_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """One short run of the shipped config (which starts at ``init: centre_pca``), read by both tests below."""
    tmp_path = tmp_path_factory.mktemp("real_patch")
    return train_autoencoder(_short_config(shared_data, tmp_path), run_dir=tmp_path / "run")


@pytest.mark.slow
def test_s2_training_runs_on_the_belgian_patch_with_a_disjoint_block_split(short_run: RunResult) -> None:
    run = short_run
    groups = {k: v["groups"] for k, v in run.metrics["data"]["splits"].items()}
    boxes = [(g["y"][0], g["x"][0]) for k in ("train", "val", "test") for g in groups[k]]
    assert len(boxes) == len(set(boxes)) == 4  # four disjoint 32 x 32 blocks, each in one split
    for split in ("train", "val", "test"):
        m = run.metrics["splits"][split]["s2"]
        assert m["n_patches"] > 100
        for key in ("centre_mae", "baseline_patch_mean_centre_mae", "baseline_temporal_neighbours_centre_mae",
                    "baseline_pca_centre_mae"):
            assert math.isfinite(m[key]) and 0 < m[key] < 1, (split, key, m[key])


@pytest.mark.slow
def test_centre_pca_start_reconstructs_real_centre_pixels_after_four_steps(short_run: RunResult) -> None:
    run = short_run
    assert "init: centre_pca" in (run.run_dir / "config.yaml").read_text()  # the shipped config's start
    start = run.metrics["centre_pca_start"]
    assert start["k"] == 9 and start["n_spectra"] > 10_000 and start["pca_centre_mae"] < 0.002
    for split in ("val", "test"):
        m = run.metrics["splits"][split]["s2"]
        # a random start after four steps is no better than the patch mean (docs/results/models-that-learn.md)
        assert m["centre_mae"] < 0.2 * m["baseline_patch_mean_centre_mae"], (split, m)
