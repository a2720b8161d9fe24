"""The command line: `info` reports parameter counts, and user errors exit 2 with a message naming the fix."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from stembed.cli import app

runner = CliRunner()

# Parameter counts of the authors' models (PAPER_SPEC §3, verified there by running their definitions).
SPEC_COUNTS = {"s1_autoencoder": 3_712_000, "s2_autoencoder": 3_726_000, "fusion": 314_000}


def test_info_paper_preset_matches_spec_counts_within_one_percent() -> None:
    res = runner.invoke(app, ["info", "--preset", "paper", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["preset"] == "paper"
    got = {
        "s1_autoencoder": report["s1_autoencoder"]["parameters"]["total"],
        "s2_autoencoder": report["s2_autoencoder"]["parameters"]["total"],
        "fusion": report["fusion"]["parameters"]["fusion_only"],
    }
    for part, expected in SPEC_COUNTS.items():
        assert abs(got[part] - expected) / expected < 0.01, (part, got[part], expected)
    assert report["s2_autoencoder"]["config"]["latent_dim"] == 9
    assert report["s1_autoencoder"]["config"]["latent_dim"] == 2
    assert report["fusion"]["config"]["embed_dim"] == 7


def test_info_table_output_and_argument_errors() -> None:
    res = runner.invoke(app, ["info", "--preset", "small"])
    assert res.exit_code == 0 and "parameters" in res.output
    res = runner.invoke(app, ["info"])
    assert res.exit_code == 2 and "either a BUNDLE path or --preset" in res.output
    res = runner.invoke(app, ["info", "--preset", "giant"])
    assert res.exit_code != 0


def test_train_with_a_missing_config_exits_2_and_says_so(tmp_path: Path) -> None:
    res = runner.invoke(app, ["train", "s2", "--config", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2
    assert "does not exist" in res.output


def test_train_with_a_bad_override_names_the_field(tmp_path: Path) -> None:
    res = runner.invoke(app, ["train", "s2", "--set", "train.batch_size=many", "--set", f"out_dir={tmp_path}"])
    assert res.exit_code == 2
    assert "train.batch_size" in res.output


def test_train_config_for_the_other_sensor_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "s1.yaml"
    cfg.write_text("sensor: s1\n")
    res = runner.invoke(app, ["train", "s2", "--config", str(cfg)])
    assert res.exit_code == 2 and "run `stembed train s1`" in res.output


def test_fusion_with_missing_bundles_says_how_to_make_them(tmp_path: Path) -> None:
    res = runner.invoke(app, ["train", "fusion", "--set", f"s1_bundle={tmp_path}/a.pt", "--set",
                              f"s2_bundle={tmp_path}/b.pt"])
    assert res.exit_code == 2 and "train one with `stembed train" in res.output


def test_demo_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "s2").mkdir()
    res = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "pass --overwrite" in res.output
