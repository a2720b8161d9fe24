"""``stembed info``: configuration and parameter counts per part, for a preset or a bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

from stembed.config import PRESETS, ConfigError, ae_preset, dump_config, fusion_preset
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.bundle import load_bundle
from stembed.models.fusion import FusionBase, FusionModel
from stembed.models.gapfill import GapFillModel
from stembed.models.layers import count_parameters
from stembed.sensors import CORE_SENSORS


def _fusion_counts(model: FusionBase) -> dict[str, int]:
    counts = count_parameters(model)  # one "<sensor>_autoencoder" part per sensor (FusionModel.parameter_groups)
    counts.setdefault("total", sum(p.numel() for p in model.parameters()))
    # S1's, S2's and every companion sensor's autoencoder are stage-1 parts, not fusion layers
    counts["fusion_only"] = counts["total"] - sum(counts[f"{k}_autoencoder"] for k in model.sensors)
    return counts


def describe_preset(name: str) -> dict[str, Any]:
    """Build the preset's three models (random weights) and count their parameters."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    f_cfg = fusion_preset(name)
    aes = {k: SensorAutoencoder(ae_preset(name, k)) for k in CORE_SENSORS}
    report: dict[str, Any] = {"preset": name}
    for k, ae in aes.items():
        report[f"{k}_autoencoder"] = {"config": dump_config(ae.cfg), "parameters": count_parameters(ae)}
    fusion = FusionModel(aes, f_cfg)  # freezes the autoencoders, so they are counted above
    report["fusion"] = {"config": dump_config(f_cfg), "parameters": _fusion_counts(fusion)}
    return report


def list_builtin() -> dict[str, Any]:
    """The built-in pretrained bundles: name, file, size and the first lines of each model card."""
    from stembed.pretrained import PREFIX, builtin_names, model_card, resolve_bundle

    out = {}
    for name in builtin_names():
        path = resolve_bundle(PREFIX + name)
        card = model_card(name).strip().splitlines()
        out[PREFIX + name] = {"file": str(path), "bytes": path.stat().st_size,
                              "summary": " ".join(line for line in card[1:4] if line.strip())}
    return {"builtin_bundles": out, "usage": f"stembed info {PREFIX}NAME; stembed embed --bundle {PREFIX}NAME ..."}


def describe_bundle(path: str | Path) -> dict[str, Any]:
    """Rebuild a bundle's model from its stored config and report it (``pretrained:NAME`` adds its model card)."""
    from stembed.pretrained import PREFIX, is_pretrained, model_card

    b = load_bundle(path)
    model = b.build_model()
    fusion = model.fusion if isinstance(model, GapFillModel) else model  # a gap-fill bundle: its observed dates
    counts = _fusion_counts(model) if isinstance(model, FusionBase) else count_parameters(model)
    return {
        "bundle": str(path),
        "kind": b.kind,
        "sensor": b.sensor,
        **(_embedding(fusion) if isinstance(fusion, FusionBase) else {}),
        "bands": {k: list(v.bands) for k, v in b.sensors.items()},
        "normalisation": {k: v.normalisation for k, v in b.sensors.items()},
        "parameters": counts,
        "config": b.config,
        "provenance": b.provenance,
        **({"model_card": model_card(str(path)[len(PREFIX):])} if is_pretrained(path) else {}),
    }


def _embedding(model: FusionBase) -> dict[str, Any]:
    """What a fusion bundle's embedding is: its features, the nested prefixes that are complete embeddings of
    their own, and which dates each one reads around its date."""
    window = model.cfg.window
    return {"embedding": {
        "features": model.cfg.embed_dim,
        "nested": list(model.prefixes),
        "window": "the date's own stage-1 latents (each from 11 consecutive dates; the paper's fusion)"
        if window is None else
        f"the date and {window.dates} of the pixel's other observed dates within +-{window.span_days:g} days "
        f"(density {window.density:g}; context fusion)",
    }}


def render(report: dict[str, Any], out: TextIO) -> None:
    """Human-readable tables (rich)."""
    from rich.console import Console
    from rich.markdown import Markdown
    from rich.table import Table

    console = Console(file=out, emoji=False, markup=False)  # bundle names like pretrained:belgium are not emoji codes
    if "builtin_bundles" in report:
        table = Table(title="built-in pretrained bundles")
        for col in ("bundle", "size", "summary"):
            table.add_column(col)
        for name, b in report["builtin_bundles"].items():
            table.add_row(name, f"{b['bytes'] / 1e6:.2f} MB", b["summary"])
        console.print(table)
        console.print(report["usage"])
        return
    parts = (
        [(k, v) for k, v in report.items() if isinstance(v, dict) and "parameters" in v]
        if "preset" in report
        else [(f"{report['kind']} {report.get('sensor') or ''}".strip(), report)]
    )
    for title, part in parts:
        table = Table(title=f"{report.get('preset', report.get('bundle'))}: {title}")
        table.add_column("part")
        table.add_column("parameters", justify="right")
        for k, v in part["parameters"].items():
            table.add_row(k, f"{v:,}")
        console.print(table)
        if "config" in part and "preset" in report:
            console.print(part["config"])
    if "embedding" in report:
        e = report["embedding"]
        console.print(f"embedding: {e['features']} features; complete embeddings of {e['nested']} features "
                      f"(stembed embed --features K); reads {e['window']}")
    if "provenance" in report:
        console.print({"bands": report["bands"], "provenance": report["provenance"]})
    if "model_card" in report:
        console.print(Markdown(report["model_card"]))
