"""Reconstruction report: centre-pixel MAE, centre SAM and SSIM per run, split and sensor (no torch).

Every training run already evaluates its best checkpoint on each split and writes the figures,
with two trivial baselines on the same centre values, to ``metrics.json``
(:mod:`stembed.training.evaluate`). This module gathers them from run folders into one table, so a
report compares stages and runs without re-running models.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from stembed.errors import UserError

COLUMNS = (
    "run",
    "stage",
    "split",
    "sensor",
    "n_patches",
    "centre_mae",
    "baseline_patch_mean_centre_mae",
    "baseline_temporal_neighbours_centre_mae",
    "centre_sam",
    "ssim",
)


class ReconError(UserError):
    """A run folder without usable metrics; the message names it and the fix."""


def recon_table(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One row per run, split and sensor, from each run folder's ``metrics.json``.

    Raises:
        ReconError: a folder has no ``metrics.json`` (the run did not finish) or it holds no splits.
    """
    rows = []
    for run in map(Path, run_dirs):
        path = run / "metrics.json"
        if not path.is_file():
            raise ReconError(
                f"{run} has no metrics.json; fix: pass the folder of a finished `stembed train` run "
                "(it holds bundle.pt and metrics.json)"
            )
        try:
            metrics = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ReconError(
                f"{path} is not readable JSON ({type(e).__name__}: {e}); fix: re-run the stage to completion"
            ) from e
        splits = metrics.get("splits") if isinstance(metrics, dict) else None
        if not splits:
            raise ReconError(f"{path} holds no split metrics; fix: re-run the stage to completion")
        if not isinstance(splits, dict) or not all(
            isinstance(sensors, dict) and all(isinstance(m, dict) for m in sensors.values())
            for sensors in splits.values()
        ):
            raise ReconError(
                f"{path}: 'splits' is not split -> sensor -> metrics; fix: re-run the stage to completion"
            )
        prefixes = (metrics.get("context") or {}).get("prefixes")  # a context fusion: a row per nested prefix
        for split, sensors in splits.items():
            for sensor, m in sensors.items():
                for n in prefixes or [None]:
                    rows.append(
                        {
                            "run": str(run),
                            "stage": metrics.get("stage") if n is None else f"{metrics.get('stage')} ({n} features)",
                            "split": split,
                            "sensor": sensor,
                            **{k: m.get(k) for k in COLUMNS[4:]},
                            **({} if n is None else {"n_patches": m.get("n_pixel_dates"),
                                                     "centre_mae": m.get(f"centre_mae_{n}")}),
                        }
                    )
    return pd.DataFrame(rows, columns=list(COLUMNS))


@dataclass(frozen=True)
class ReconResult:
    """A reconstruction table (:func:`recon_table`, or ``eval.recon_bundle.bundle_recon``: columns
    :data:`COLUMNS`) and how it is shown and saved."""

    table: pd.DataFrame

    def markdown(self, split: str = "test") -> str:
        """The table of one split (:func:`recon_markdown`)."""
        return recon_markdown(self.table, split)

    def save(self, out: str | Path) -> Path:
        """``recon.csv`` (every split) and ``recon.md`` (the test split) in ``out``; the one writer ``stembed eval
        recon`` and ``stembed report`` share, so their files cannot drift apart. Returns the CSV's path."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.table.to_csv(out / "recon.csv", index=False)
        (out / "recon.md").write_text(self.markdown() + "\n")
        return out / "recon.csv"


def recon_markdown(table: pd.DataFrame, split: str = "test") -> str:
    """Markdown table of one split: model vs baselines, per run and sensor."""
    t = table[table["split"] == split]
    lines = [
        "| run | stage | sensor | patches | centre MAE | patch-mean MAE | temporal-neighbour MAE | centre SAM (rad) | SSIM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in t.itertuples(index=False):
        lines.append(
            f"| {Path(r.run).name} | {r.stage} | {r.sensor} | {r.n_patches} | {_num(r.centre_mae, 4)} | "
            f"{_num(r.baseline_patch_mean_centre_mae, 4)} | {_num(r.baseline_temporal_neighbours_centre_mae, 4)} | "
            f"{_num(r.centre_sam, 4)} | {_num(r.ssim, 3)} |"
        )
    return "\n".join(lines)


def _num(x: Any, digits: int) -> str:
    """A figure, or "—" where it was not measured (a context fusion has no SAM or SSIM)."""
    return "—" if x is None or pd.isna(x) else f"{x:.{digits}f}"
