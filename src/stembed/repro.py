"""Provenance of a run: git commit, package versions, config hash. No torch needed."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any


def git_sha() -> str | None:
    """Commit of the stembed checkout this code runs from (None when not a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    sha = out.stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True,
        timeout=5, check=False,
    )
    return sha + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def versions() -> dict[str, str]:
    """Versions of the packages that decide numerical results."""
    out = {"python": platform.python_version()}
    for name in ("stembed", "torch", "lightning", "numpy", "xarray", "zarr"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def config_hash(cfg: dict[str, Any]) -> str:
    """Stable short hash of a resolved config dict."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def provenance(data_ids: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The provenance block stored in bundles and run folders."""
    return {
        "git_sha": git_sha(),
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "data_ids": list(data_ids),
        **(extra or {}),
    }
