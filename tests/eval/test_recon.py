"""The reconstruction report gathers each run's metrics.json into one table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stembed.eval.recon import ReconError, recon_markdown, recon_table


def _run(tmp: Path, name: str, stage: str, mae: float) -> Path:
    d = tmp / name
    d.mkdir()
    m = {
        "n_patches": 10,
        "centre_mae": mae,
        "baseline_patch_mean_centre_mae": 0.05,
        "baseline_temporal_neighbours_centre_mae": 0.04,
        "centre_sam": 0.1,
        "ssim": 0.8,
    }
    sensors = ("s1", "s2") if stage == "fusion" else (stage,)
    (d / "metrics.json").write_text(
        json.dumps(
            {
                "stage": stage,
                "splits": {
                    s: {k: {**m, "centre_mae": mae + i} for k in sensors}
                    for i, s in enumerate(("train", "val", "test"))
                },
            }
        )
    )
    return d


def test_table_has_one_row_per_run_split_and_sensor(tmp_path: Path) -> None:
    t = recon_table([_run(tmp_path, "a", "s2", 0.01), _run(tmp_path, "b", "fusion", 0.02)])
    assert len(t) == 3 + 6
    row = t[(t["run"].str.endswith("b")) & (t["split"] == "test") & (t["sensor"] == "s1")]
    assert row["centre_mae"].item() == pytest.approx(2.02) and row["stage"].item() == "fusion"
    md = recon_markdown(t)
    assert md.count("\n") == 1 + 3 and "| b | fusion | s2 | 10 | 2.0200 |" in md


def test_unfinished_run_is_named(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    with pytest.raises(ReconError, match="half has no metrics.json"):
        recon_table([tmp_path / "half"])
