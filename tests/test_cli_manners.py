"""CLI manners (issue 15): --version, choices in --help, quiet training output, a progress bar that moves
within a tile."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from stembed.cli import app

runner = CliRunner()


def test_version() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and re.fullmatch(r"stembed \d+\.\d+\.\d+\S*\n", res.output), res.output


@pytest.mark.parametrize(
    ("command", "choices"),
    [
        (["embed"], "<float32|float16|int8>"),
        (["export"], "<geotiff|netcdf>"),
        (["eval", "gpp"], "<linear|savgol>"),
        (["cube"], "<auto|ascending|descending|both>"),
    ],
)
def test_help_lists_choices_not_python_types(command: list[str], choices: str) -> None:
    res = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and choices in res.output
    # typer marks its own --help flag <bool>; no flag or list option of ours shows a Python type
    shown = [ln for ln in res.output.splitlines() if re.search(r"<(bool|list\[|tuple)", ln)]
    assert all("--help" in ln for ln in shown), shown


def test_every_training_command_has_quiet_and_verbose() -> None:
    for cmd in (["train", "s1"], ["train", "s2"], ["train", "sensor"], ["train", "fusion"], ["train", "gapfill"]):
        out = runner.invoke(app, [*cmd, "--help"], env={"COLUMNS": "200"}).output
        assert "--quiet" in out and "--verbose" in out, cmd
    for cmd in (["embed"], ["cube"]):
        assert "--quiet" in runner.invoke(app, [*cmd, "--help"]).output


def test_training_hides_lightning_banners_and_deprecations_unless_verbose(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What the training call sees: Lightning's INFO off, deprecations ignored, --quiet -> no progress bar."""
    import stembed.training.run as run_mod

    seen: dict[str, Any] = {}

    def fake_train(cfg: Any, run_dir: Any = None, resume: Any = None) -> Any:
        from lightning.pytorch.utilities.rank_zero import rank_zero_deprecation

        seen["progress_bar"] = cfg.train.progress_bar
        seen["banner_shown"] = logging.getLogger("lightning.pytorch").isEnabledFor(logging.INFO)
        rank_zero_deprecation("an old Lightning API")
        warnings.warn("a stembed note", UserWarning, stacklevel=1)
        raise SystemExit(0)

    monkeypatch.setattr(run_mod, "train_autoencoder", fake_train)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner.invoke(app, ["train", "s2", "--quiet", "--run-dir", str(tmp_path / "r1")])
    assert seen["progress_bar"] is False and seen["banner_shown"] is False
    messages = [str(w.message) for w in caught]
    assert "a stembed note" in messages and "an old Lightning API" not in messages
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner.invoke(app, ["train", "s2", "--verbose", "--run-dir", str(tmp_path / "r2")])
    assert seen["progress_bar"] is True and seen["banner_shown"] is True
    assert "an old Lightning API" in [str(w.message) for w in caught]
    assert logging.getLogger("lightning.pytorch").isEnabledFor(logging.INFO)  # levels restored afterwards


def test_embed_progress_counts_pixel_dates_within_a_tile(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, one_torch_thread: None
) -> None:
    """One tile: the bar counts S2 dates x pixels, moves while the tile runs, and ends at the total."""
    import io

    import tqdm.auto
    from distributed import LocalCluster

    import stembed.inference.progress as progress
    from stembed.config import EmbedConfig
    from stembed.inference.run import embed_cube
    from stembed.io.cube import save_scene
    from stembed.testing import random_fusion_bundle, synthetic_scene

    bars: list[Any] = []

    class Recorded(tqdm.std.tqdm):
        def __init__(self, *a: Any, **kw: Any) -> None:
            kw["file"] = io.StringIO()
            super().__init__(*a, **kw)
            self.steps: list[int] = []
            bars.append(self)

        def update(self, n: float | None = 1) -> bool | None:
            self.steps.append(int(n or 0))
            return super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorded)
    monkeypatch.setattr(progress, "_REPORT_EVERY_S", 0.0)  # the worker runs in this process: report every batch
    scene = synthetic_scene(seed=2, height_px=10, width_px=10, n_days=60)
    cube = save_scene(scene, tmp_path / "scene.zarr")
    bundle = random_fusion_bundle(tmp_path / "fusion.pt", seed=0, tiny=True)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        embed_cube(cube, bundle, tmp_path / "emb.zarr", EmbedConfig(tile_px=10, batch_size=16),
                         scheduler=cluster.scheduler_address, progress=True)
    (bar,) = bars
    total = scene.s2.sizes["time"] * 10 * 10
    assert bar.total == total and bar.n == total and bar.desc == "pixel-dates"
    assert len([s for s in bar.steps if s > 0]) > 2  # batches reported while the only tile ran
