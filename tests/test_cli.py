"""The command line: `info` reports parameter counts, and user errors exit 2 with a message naming the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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
    res = runner.invoke(app, ["info"])  # no argument: the built-in bundles
    assert res.exit_code == 0 and "pretrained:belgium" in res.output
    res = runner.invoke(app, ["info", "some.pt", "--preset", "small"])
    assert res.exit_code == 2 and "either a BUNDLE or --preset" in res.output
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


def _tiny_store(path: Path) -> Path:
    import numpy as np
    import pandas as pd

    from stembed.io.embeddings import Quantisation, create_store, finalise, write_tile

    times = pd.to_datetime(["2021-05-01", "2021-06-03"]).values
    q = Quantisation.identity(7)
    grid = create_store(path, time=times, y=5_000_005.0 - 10.0 * np.arange(8),
                        x=400_005.0 + 10.0 * np.arange(8), features=[f"E{i}" for i in range(1, 8)],
                        crs="EPSG:32631",
                        transform=[400_000.0, 10.0, 0.0, 5_000_010.0, 0.0, -10.0], quant=q, tile_px=8,
                        time_chunk=2, attrs={"fingerprint": "test"})
    v = np.ones((2, 7, 8, 8), np.float32)
    codes = q.encode(v)
    write_tile(path, grid, (0, 0), codes, np.ones((2, 8, 8), bool), q.error_stats(v, codes))
    finalise(path)
    return path


def test_sample_refuses_to_replace_a_table_without_overwrite(tmp_path: Path) -> None:
    store = _tiny_store(tmp_path / "emb.zarr")
    (tmp_path / "points.csv").write_text("id,x,y\na,400035.0,4999975.0\n")
    table = tmp_path / "table.csv"
    table.write_text("someone's table\n")
    points = tmp_path / "points.csv"
    args = ["sample", "--embeddings", str(store), "--points", str(points), "--out", str(table)]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "already exists; fix: pass --overwrite" in res.output
    assert table.read_text() == "someone's table\n"
    res = runner.invoke(app, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert table.read_text().startswith("id,")


def test_train_refuses_a_foreign_run_dir_and_a_bundle_as_resume(tmp_path: Path) -> None:
    run = tmp_path / "mine"
    run.mkdir()
    (run / "config.yaml").write_text("my: own config\n")
    (run / "notes.txt").write_text("mine\n")
    res = runner.invoke(app, ["train", "s2", "--run-dir", str(run)])
    assert res.exit_code == 2 and "not a stembed run's (notes.txt)" in res.output
    assert (run / "config.yaml").read_text() == "my: own config\n"
    bundle = tmp_path / "run" / "bundle.pt"
    bundle.parent.mkdir()
    bundle.write_bytes(b"not a checkpoint")
    res = runner.invoke(app, ["train", "s2", "--resume", str(bundle)])
    assert res.exit_code == 2 and "is a bundle" in res.output and "checkpoints/last.ckpt" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "run"]
    assert [p.name for p in bundle.parent.iterdir()] == ["bundle.pt"]


def test_report_of_embeddings_without_their_cube_is_refused_and_leaves_no_folder(tmp_path: Path) -> None:
    store = _tiny_store(tmp_path / "emb.zarr")
    res = runner.invoke(app, ["report", "--out", str(tmp_path / "rep"), "--embeddings", str(store)])
    assert res.exit_code == 2 and "pass its --cube" in res.output
    assert not (tmp_path / "rep").exists()


def test_ctrl_c_is_one_line_saying_how_to_resume(capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    from stembed.cli import _RESUME_EMBED, _run

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as exit_:
        _run(interrupted, resume=_RESUME_EMBED)
    assert exit_.value.exit_code == 130
    err = capsys.readouterr().err
    assert err == "interrupted; tiles written so far are kept: rerun with --resume to finish the store\n"

    def bug() -> None:
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):  # unexpected exceptions still show their traceback
        _run(bug)


def test_a_permission_error_is_one_line_naming_the_path(capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    from stembed.cli import _run

    def denied() -> None:
        raise PermissionError(13, "Permission denied", "/data/readonly/emb.zarr")

    with pytest.raises(typer.Exit) as exit_:
        _run(denied)
    assert exit_.value.exit_code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "/data/readonly/emb.zarr (Permission denied)" in err[0]


def test_info_counts_a_companion_autoencoder_as_stage_1_not_as_fusion_layers() -> None:
    from stembed.config import AEConfig, ae_preset, fusion_preset
    from stembed.describe import _fusion_counts
    from stembed.models.autoencoder import SensorAutoencoder
    from stembed.models.fusion import FusionModel

    a1, a2 = ae_preset("tiny", "s1"), ae_preset("tiny", "s2")
    toy = AEConfig.model_validate({**a1.model_dump(), "sensor": "toy"})
    model = FusionModel({"s1": SensorAutoencoder(a1), "s2": SensorAutoencoder(a2), "toy": SensorAutoencoder(toy)},
                        fusion_preset("tiny"))
    counts = _fusion_counts(model)
    assert counts["fusion_only"] == sum(p.numel() for p in model.fusion_parameters())
    assert counts["toy_autoencoder"] == sum(p.numel() for p in model.autoencoders["toy"].parameters()) > 0
