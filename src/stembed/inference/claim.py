"""The output store of a ``stembed embed`` run: claimed (its lock, then create, resume or finished:
:func:`claim_output`) and created empty with the run's record (:func:`create_store`)."""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from stembed.config import dump_config
from stembed.contract import cube_transform
from stembed.inference.daily import (
    FLAG_MEANINGS,
    daily_dates,
)
from stembed.inference.plan import EmbedPlan, n_features
from stembed.io import embeddings as store
from stembed.io.outputs import (
    check_store_output,
    discard_store,
    lock_output,
    remove_leftovers,
)
from stembed.io.sinks import EmbeddingSink
from stembed.models.context import ContextFusionModel
from stembed.models.fusion import FusionBase
from stembed.repro import provenance
from stembed.types import TIME, X, Y


def claim_output(plan: EmbedPlan, out: Path, *, resume: bool, overwrite: bool,
                  owned: contextlib.ExitStack) -> tuple[bool | None, dict[str, Any]]:
    """Own ``out`` (its lock, held by ``owned``) and decide what happens there: True to create a new store
    (replacing ours with ``overwrite``), False to resume an unfinished one, None if it is already complete;
    with the attributes of the store found there (empty if none).

    Raises:
        FileExistsError: ``out`` exists and neither ``resume`` nor ``overwrite`` is set.
        EmbeddingStoreError: ``out`` is foreign, damaged, or was made with other settings.
        OutputError: another live run holds ``out``.
    """
    if out.is_file() or not out.exists():
        # a file at --out is refused (never deleted); a new store needs a writable parent folder
        check_store_output(out, "embeddings", overwrite=False)
    elif overwrite:  # only a stembed embedding store is ever deleted
        check_store_output(out, "embeddings", overwrite=True)
    # from here on this run owns --out (OUT.lock): a second run into it refuses, and every decision about
    # what is at --out (resume, replace, create) is taken while no other run can change it
    owned.enter_context(lock_output(out, command="embed"))
    remove_leftovers(out)  # what a run killed while it created or replaced the store left
    if not out.exists():
        return True, {}
    if not (resume or overwrite):
        raise FileExistsError(
            f"{out} already exists; fix: pass --resume to finish or check it, --extend to add the dates a grown "
            "cube gained, --overwrite to replace it, or choose another --out"
        )
    attrs = store.read_attrs(out)  # refuses foreign or corrupt stores, so --overwrite never deletes them
    if not resume:
        return True, attrs
    if attrs.get(store.EXTENDING_ATTR) is not None:
        raise store.EmbeddingStoreError(
            f"{out} is mid-extension, which --resume does not continue; fix: rerun the same `stembed embed "
            "--extend` command (with the grown cube) to finish it"
        )
    check_fingerprint(out, attrs.get("fingerprint", {}), plan.fingerprint)
    try:
        done = store.tiles_done(out)
    except (KeyError, OSError, ValueError) as e:
        raise store.EmbeddingStoreError(
            f"{out} is a damaged embedding store ({type(e).__name__}: {e}); fix: rerun with --overwrite"
        ) from e
    return (None if attrs.get("complete") and done.all() else False), attrs


_RESUME_HINTS = {
    "bundle_sha256": "the same bundle file",
    "cube_fingerprint": "the same --cube store (one grown by `stembed cube --extend`: pass --extend instead of --resume)",
    "format": "the stembed version that wrote it",
    "threads_per_worker": "the same --workers on the same machine, or --set threads_per_worker=N",
    "calibration": "--set calibration_samples=, calibration_margin= and seed= as stored",
    "daily": "the same daily settings (--daily and its --set options)",
    "features": "the same --features",
}


def check_fingerprint(
    out: Path, stored: dict[str, Any], wanted: dict[str, Any], *, option: str = "--resume",
    action: str = "continue", skip: tuple[str, ...] = (),
) -> None:
    """Refuse a ``--resume`` (or ``--extend``: ``option``, ``action``) whose settings differ from the store's, naming
    each setting that differs and how to get back to it; the keys ``skip`` are not compared."""
    differ = [k for k in wanted if k not in skip and stored.get(k) != wanted[k]]
    if differ:
        diffs = [f"{k}: stored {stored.get(k)!r}, now {wanted[k]!r}" for k in differ]
        hints = [f"{k}: {_RESUME_HINTS.get(k, f'--set {k}=<stored value>')}" for k in differ]
        raise store.EmbeddingStoreError(
            f"{out} was written by a different run, so {option} cannot {action} it ("
            + "; ".join(diffs)
            + "); fix: rerun with the settings it was made with (" + "; ".join(hints) + "), or pass --overwrite "
            "to replace it"
        )


def claim_existing(out: Path, owned: contextlib.ExitStack) -> dict[str, Any]:
    """Own the existing store ``out`` (its lock, held by ``owned``) and return its attributes (``--extend``).

    Raises:
        EmbeddingStoreError: nothing is at ``out``, or it is not a stembed embedding store.
        OutputError: another live run holds ``out``.
    """
    if not out.is_dir():
        raise store.EmbeddingStoreError(
            f"no embedding store at {out}; --extend grows one: fix: write it first with `stembed embed` (no --extend)"
        )
    owned.enter_context(lock_output(out, command="embed"))
    remove_leftovers(out)
    return store.read_attrs(out)


def create_store(plan: EmbedPlan, out: Path, sink: EmbeddingSink, quant: store.Quantisation) -> None:
    """Create the empty store through ``sink`` (aside, then renamed: a kill leaves no half store at ``out``);
    an existing store at ``out`` (ours, ``--overwrite``) is discarded only now that every check passed."""
    if out.exists():
        discard_store(out)
    s2, daily = plan.scene.s2, plan.daily
    times = s2[TIME].values if daily is None else daily_dates(np.arange(daily.first_day, daily.last_day + 1))
    sink.create(
        time=times, y=s2[Y].values, x=s2[X].values,
        features=[f"E{i + 1}" for i in range(n_features(plan.model, plan.cfg))], crs=str(s2.attrs["crs"]),
        transform=list(cube_transform(s2)), quant=quant, tile_px=plan.cfg.tile_px,
        time_chunk=plan.cfg.time_chunk, attrs=_store_attrs(plan),
        flag_meanings=None if daily is None else FLAG_MEANINGS,
    )


def _store_attrs(plan: EmbedPlan) -> dict[str, Any]:
    """What an embedding store records about its run: fingerprint, config, bundle, input, software, edges."""
    s2, model, daily = plan.scene.s2, plan.model, plan.daily
    attrs: dict[str, Any] = {
        "fingerprint": plan.fingerprint,
        "config": dump_config(plan.cfg),
        "bundle": {"path": str(plan.bundle_path.resolve()), "sha256": plan.bundle_sha256,
                   "provenance": plan.bundle.provenance},
        "input": {
            "cube": str(plan.cube.resolve()),
            "site": plan.scene.site,
            "s2_provenance": str(s2.attrs.get("provenance")),
            "s1_provenance": str(plan.scene.s1.attrs.get("provenance")),
        },
        "software": provenance([plan.scene.site]),
        "edges": (
            ("time: trailing, each date read as the series stood on it (its stage-1 windows reflected at the date, "
             "other sensors matched on or before it); the first "
             f"{model.anchor.cfg.n_frames // 2} dates have no embedding (too little history); "
             if model.cfg.trailing else "time: each date's window reflects the series at its ends (frame -k = date k); ")
            + f"space: windows of border pixels read the cube reflected by {model.anchor.cfg.context_px} pixels "
            "(context_px)"
        ),
        "method": _method(model),
        "companion_sensors": list(model.companions),
        # which dates each embedding read around its date (None: the paper's 11 consecutive dates), and the
        # sizes that are complete embeddings of their own (the probe's baselines and `stembed info` read both)
        "window": None if model.cfg.window is None else dump_config(model.cfg.window),
        "nested": [n for n in model.prefixes if n <= n_features(model, plan.cfg)],
        # each matched sensor's dates in the cube (how many, the last): `stembed embed --extend` finds in a grown
        # cube which of them are new, so which S2 dates' matched inputs changed
        "sensor_dates": sensor_dates(plan),
    }
    if daily is not None:
        attrs["daily"] = {
            **asdict(daily),
            "flags": "see the flag variable: " + ", ".join(f"{i} {m}" for i, m in enumerate(FLAG_MEANINGS)),
            "model_based": (
                ("cloudy S2 dates embedded by the context fusion from the date's S1 and its window, the date's own "
                 "S2 hidden (stembed.models.context)" if isinstance(model, ContextFusionModel) else
                 "cloudy S2 dates embedded by the bundle's gap-fill layers with the S2 centre frame hidden "
                 "(stembed.models.gapfill)") if daily.model_fill else "off"
            ),
            "notes": list(plan.notes),
        }
    return attrs


def sensor_dates(plan: EmbedPlan) -> dict[str, dict[str, Any]]:
    """Each sensor matched to the S2 dates (S1, companions): how many dates its cube holds, and the last."""
    out = {}
    for key in plan.max_gap_days:
        times = plan.scene.sensors[key][TIME].values
        out[key] = {"count": int(times.size), "last": str(times[-1]) if times.size else None}
    return out


def _method(model: FusionBase) -> str:
    if isinstance(model, ContextFusionModel):
        return "context (every pixel-date's stage-1 latents once per tile, each date fused with its window's)"
    return "dense (each frame encoded once per tile)" if model.anchor.cfg.variant == "dense" else "per patch"
