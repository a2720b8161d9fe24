"""Built-in pretrained bundles, shipped as package data: ``--bundle pretrained:NAME`` anywhere a bundle is read.

Each built-in is a fusion bundle file ``NAME.pt`` beside this module with its model card ``NAME.md``
(training data, period, bands, normalisation, held-out figures, what it is not fit for).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from stembed.errors import UserError

PREFIX = "pretrained:"


class PretrainedError(UserError):
    """An unknown built-in bundle name."""


def builtin_names() -> list[str]:
    """Names of the built-in bundles (``NAME`` of every ``NAME.pt`` shipped with the package)."""
    here = resources.files(__name__)
    return sorted(p.name[: -len(".pt")] for p in here.iterdir() if p.name.endswith(".pt"))


def is_pretrained(spec: str | Path) -> bool:
    """True for ``pretrained:NAME``."""
    return str(spec).startswith(PREFIX)


def resolve_bundle(spec: str | Path) -> Path:
    """``pretrained:NAME`` -> the shipped bundle file; any other value is returned as a path, unchanged."""
    if not is_pretrained(spec):
        return Path(spec)
    name = str(spec)[len(PREFIX) :]
    if name not in builtin_names():
        known = ", ".join(f"{PREFIX}{n}" for n in builtin_names()) or "none"
        raise PretrainedError(f"no built-in bundle {spec!r}; built-in bundles: {known} (list them: stembed info)")
    return Path(str(resources.files(__name__) / f"{name}.pt"))


def model_card(name: str) -> str:
    """The model card (markdown) of a built-in bundle."""
    resolve_bundle(PREFIX + name)  # unknown names fail here, with the list
    return (resources.files(__name__) / f"{name}.md").read_text()
