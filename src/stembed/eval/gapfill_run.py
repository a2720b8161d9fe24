"""The gap-fill experiment on a real scene: hide clear S2 dates, fill them every way, score by gap length.

Truth is the embedding of each observed pixel-date (the fusion model, S2 frame visible). Whole S2
dates are then hidden, as a cloud would hide them, in runs of 1, 2, 4, ... consecutive dates
(:func:`stembed.eval.gapfill.hide_schedule`: other runs stay outside each date's 11-frame window),
and each hidden pixel-date is filled by

- ``model_based``: the gap-fill bundle's filler layers, S2 centre frame hidden, on the cube with the
  hidden dates removed (so a run's other hidden dates are missing from its window too); for a context
  fusion bundle the context model itself, the date's own S2 hidden (it was trained for that: its window
  then holds only the dates still observed);
- ``zero_shot`` (gap-fill bundles only): the fusion model itself run the same way, untrained for it (what the
  training buys);
- ``linear`` and ``savgol``: :func:`stembed.inference.daily.fill_daily` over the pixel's remaining
  observed dates.

Only pixels of the region given (by default the fusion stage's *test* blocks) are scored; their
windows read real neighbours around the region, as ``stembed embed`` does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from stembed.data.build import match_gap_days
from stembed.data.datasets import SensorArrays
from stembed.eval.gapfill import (
    GapFillEvalError,
    error_markdown,
    error_table,
    gap_lengths,
    hide_schedule,
    interpolate_at,
)
from stembed.inference.blocks import read_block
from stembed.inference.engine import embed_any, resolve_device
from stembed.inference.reference import check_bundle_for_scene
from stembed.io.cube import open_scene
from stembed.models.bundle import load_bundle
from stembed.models.context import ContextFusionModel
from stembed.models.gapfill import GapFillModel
from stembed.sensors import ANCHOR

METHODS = ("model_based", "zero_shot", "linear", "savgol")


@dataclass(frozen=True)
class GapFillResult:
    """The error table (one row per method and gap bin), its Markdown, and what was run."""

    table: pd.DataFrame
    markdown: str
    info: dict[str, Any]

    def save(self, out: str | Path) -> Path:
        """``gapfill.csv``, ``gapfill.md`` and ``gapfill.json`` (what was run) in ``out``; shared by ``stembed eval
        gapfill`` and ``stembed report``. Returns the CSV's path."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.table.to_csv(out / "gapfill.csv", index=False)
        (out / "gapfill.md").write_text(self.markdown + "\n")
        (out / "gapfill.json").write_text(json.dumps(self.info, indent=2))
        return out / "gapfill.csv"


def split_regions(bundle_metrics: dict[str, Any]) -> list[tuple[slice, slice]]:
    """The (rows, cols) of the test blocks a bundle's training run recorded."""
    groups = bundle_metrics.get("data", {}).get("splits", {}).get("test", {}).get("groups", [])
    return [(slice(*g["y"]), slice(*g["x"])) for g in groups]


def evaluate_gap_fill(
    cube: str | Path,
    bundle_path: str | Path,
    *,
    run_lengths: Sequence[int] = (1, 2, 4, 8),
    offsets: int = 2,
    regions: list[tuple[slice, slice]] | None = None,
    batch_size: int = 256,
    device: str = "auto",
    savgol_window_days: int = 31,
    savgol_order: int = 2,
) -> GapFillResult:
    """Run the experiment (module docstring) on the scene store ``cube`` with a gap-fill or context fusion bundle.

    ``offsets`` schedules per run length (offset 0, 1, ...): more offsets hide more of the dates.

    Raises:
        GapFillEvalError: the bundle cannot embed a hidden date, or no test region is known or given.
    """
    bundle = load_bundle(bundle_path)
    model = _filling_model(bundle.build_model(), bundle.kind, bundle_path)
    fusion = model.fusion if isinstance(model, GapFillModel) else model
    scene = open_scene(cube, check_values=False)
    check_bundle_for_scene(scene, bundle)
    dev = resolve_device(device)
    model.to(dev)
    regions = _test_regions(regions, bundle.metrics, bundle_path)
    r = fusion.anchor.cfg.context_px
    max_gap_days = match_gap_days(fusion.sensors, bundle.cfg.fusion_part.s1_gap_days)
    kw: dict[str, Any] = {"batch_size": batch_size, "device": dev, "precision": "float32"}
    methods = METHODS if isinstance(model, GapFillModel) else tuple(m for m in METHODS if m != "zero_shot")
    preds: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    truths: list[np.ndarray] = []
    targets_all: list[np.ndarray] = []
    gaps_all: list[np.ndarray] = []
    for rows, cols in regions:
        block = read_block(scene, rows, cols, r, max_gap_days)
        truth = embed_any(fusion, block, **kw)  # (time, F, h, w)
        for fills, targets, gaps in _experiments(model, block, truth, run_lengths, offsets, kw, savgol_window_days,
                                                 savgol_order):
            for method, fill in fills.items():
                preds[method].append(fill)
            truths.append(truth)
            targets_all.append(targets)
            gaps_all.append(gaps)
    n_runs = len(truths)

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts, axis=0)  # experiments stacked along time: the table pools them

    table = error_table(cat(truths), {m: cat(p) for m, p in preds.items()}, cat(targets_all), cat(gaps_all))
    info = {
        "cube": str(cube), "bundle": str(bundle_path), "run_lengths": list(run_lengths), "offsets": offsets,
        "regions": [[[s.start, s.stop] for s in reg] for reg in regions], "n_experiments": n_runs,
        "savgol": [savgol_window_days, savgol_order], "torch_threads": torch.get_num_threads(),
    }
    return GapFillResult(table, error_markdown(table), info)


def _experiments(
    model: GapFillModel | ContextFusionModel, block: dict[str, SensorArrays], truth: np.ndarray,
    run_lengths: Sequence[int], offsets: int, kw: dict[str, Any], savgol_window_days: int, savgol_order: int,
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]]:
    """Each experiment on one block (run length, then offset): its fills by method, targets and gaps."""
    d2 = block[ANCHOR].days
    observed = np.isfinite(truth).all(axis=1)  # (time, h, w)
    for k in run_lengths:
        for o in range(offsets):
            hidden = np.zeros(len(d2), bool)
            hidden[hide_schedule(len(d2), k, offset=o)] = True
            yield _hide_and_fill(model, block, truth, observed, hidden, kw, savgol_window_days, savgol_order)


def _filling_model(model: Any, kind: str, bundle_path: str | Path) -> GapFillModel | ContextFusionModel:
    """The bundle's model if it can embed a hidden date (gap-fill layers, or a context fusion); else an error."""
    if not isinstance(model, (GapFillModel, ContextFusionModel)):
        raise GapFillEvalError(
            f"{bundle_path} is a {kind} bundle of the paper's fusion; the experiment needs a gap-fill bundle "
            "(`stembed train gapfill`) or a context fusion bundle (model.window)"
        )
    return model


def _test_regions(
    regions: list[tuple[slice, slice]] | None, bundle_metrics: dict[str, Any], bundle_path: str | Path
) -> list[tuple[slice, slice]]:
    """The regions given, else the bundle's test blocks; none at all is an error (nothing to score)."""
    if regions is None:
        regions = split_regions(bundle_metrics)
    if not regions:
        raise GapFillEvalError(
            f"{bundle_path} records no test blocks and none were given; fix: pass regions=[(rows, cols)]"
        )
    return regions


def _hide_and_fill(
    model: GapFillModel | ContextFusionModel,
    block: dict[str, SensorArrays],
    truth: np.ndarray,
    observed: np.ndarray,
    hidden: np.ndarray,
    kw: dict[str, Any],
    savgol_window_days: int,
    savgol_order: int,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One experiment: hide the S2 dates ``hidden``, fill their observed pixel-dates with each method.

    Returns each method's fill, the targets (observed and hidden) and each pixel-date's gap length.
    """
    s2, d2 = block[ANCHOR].values, block[ANCHOR].days
    targets = observed & hidden[:, None, None]
    known = observed & ~hidden[:, None, None]
    s2_cut = s2.copy()
    s2_cut[hidden] = np.nan  # the whole date, halo included, as a cloud would hide it
    cut = {**block, ANCHOR: SensorArrays(s2_cut, d2)}
    fill = {"targets": targets, "hide_s2_centre": True, **kw}
    if isinstance(model, GapFillModel):
        fills = {"model_based": embed_any(model.filler, cut, **fill), "zero_shot": embed_any(model.fusion, cut, **fill)}
    else:  # a context fusion embeds a hidden date from its S1 and its window itself
        fills = {"model_based": embed_any(model, cut, **fill)}
    for method in ("linear", "savgol"):
        fills[method] = interpolate_at(
            truth, known, d2, targets, method=method, savgol_window_days=savgol_window_days,
            savgol_order=savgol_order,
        )
    return fills, targets, gap_lengths(d2, known)
