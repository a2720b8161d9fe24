"""One place decides whether a command may write an output path, and what ``--overwrite`` may delete.

Every command checks its output here before it computes or writes anything, so a refused output
leaves nothing behind. The rules (the README's "Guarantees"):

- a path that does not exist is fine if its nearest existing parent is a writable folder;
- an existing path is refused unless ``overwrite`` is set, and even then only our own kind of output
  is replaced: a stembed scene store (``cube``), a stembed embedding store (``embed``), a table file
  (``sample``). A folder of someone's files, or a plain file where a store belongs, is never deleted;
- output folders that hold several named files (``report``, ``pca``, ``eval``, ``export``,
  ``train --run-dir``) are never deleted; only the files a command names are (re)written in them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from stembed.errors import UserError

StoreKind = Literal["scene", "cube", "embeddings"]

# root attribute that marks each kind of zarr store stembed writes (see stembed.io.cube / .embeddings)
_MARKERS: dict[str, str] = {
    "scene": "stembed_scene_format", "cube": "stembed_cube_format", "embeddings": "stembed_embedding_format"
}
_NAMES: dict[str, str] = {
    "scene": "stembed scene store", "cube": "stembed cube store", "embeddings": "stembed embedding store"
}
# what a `stembed train` run folder may hold (training.run writes these)
RUN_DIR_ENTRIES = frozenset({"config.yaml", "checkpoints", "logs", "metrics.json", "bundle.pt"})


class OutputError(UserError):
    """An output path that cannot or may not be written; the message names the path and the fix."""


def _root_attrs(path: Path) -> dict[str, object] | None:
    """The root attributes of a zarr v3 (``zarr.json``) or v2 (``.zattrs``) store; None if it is not one."""
    for name, key in (("zarr.json", "attributes"), (".zattrs", None)):
        meta = path / name
        if not meta.is_file():
            continue
        try:
            doc = json.loads(meta.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        attrs = doc.get(key, {}) if key is not None and isinstance(doc, dict) else doc
        return attrs if isinstance(attrs, dict) else None
    return None


def is_stembed_store(path: str | Path, kind: StoreKind) -> bool:
    """Whether ``path`` is a folder holding a zarr store that stembed wrote as ``kind``."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    attrs = _root_attrs(path)
    return attrs is not None and attrs.get(_MARKERS[kind]) is not None


def check_writable_parent(path: str | Path, *, option: str = "--out") -> None:
    """Refuse ``path`` if it cannot be created: its nearest existing parent is a file or not writable."""
    path = Path(path)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(
            f"{option} {path}: {parent} is a file, not a folder; fix: choose an {option} inside a folder"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"{option} {path}: the folder {parent} is not writable for this user; fix: choose another "
            f"{option} or change the folder's permissions"
        )


def check_store_output(path: str | Path, kind: StoreKind, *, overwrite: bool, option: str = "--out") -> bool:
    """Check that the zarr store ``path`` may be written; return True if an existing store will be replaced.

    Raises:
        OutputError: ``path`` is a file; it exists and ``overwrite`` is False; it is not a ``kind``
            store stembed wrote (``overwrite`` never deletes it); or it cannot be created.
    """
    path = Path(path)
    what = _NAMES[kind]
    if not path.exists() and not path.is_symlink():
        check_writable_parent(path, option=option)
        return False
    if not path.is_dir() or path.is_symlink():
        raise OutputError(
            f"{option} {path} is a file, not a {what}; fix: choose another {option} (--overwrite never "
            "deletes a file)"
        )
    if not overwrite:
        raise OutputError(
            f"{path} already exists; fix: pass --overwrite to replace it, or choose another {option}"
        )
    if not is_stembed_store(path, kind):
        raise OutputError(
            f"{path} is not a {what}, so --overwrite will not delete it; fix: choose another {option}, or "
            "remove it yourself if it is yours to delete"
        )
    return True


def check_file_output(
    path: str | Path, *, overwrite: bool, what: str = "file", option: str = "--out"
) -> bool:
    """Check that the single file ``path`` may be written; return True if an existing file will be replaced.

    Raises:
        OutputError: ``path`` is a folder, or exists and ``overwrite`` is False, or cannot be created.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(
            f"{option} {path} is a folder, not a {what}; fix: give a file name inside it, or another {option}"
        )
    if path.exists():
        if not overwrite:
            raise OutputError(
                f"{path} already exists; fix: pass --overwrite to replace it, or choose another {option}"
            )
        if not os.access(path, os.W_OK):
            raise OutputError(f"{path} is not writable for this user; fix: choose another {option}")
        return True
    check_writable_parent(path, option=option)
    return False


def check_output_folder(path: str | Path, *, option: str = "--out") -> None:
    """Check that the folder ``path`` (for several named files) exists as a folder or can be created.

    Raises:
        OutputError: ``path`` is a file, or it (or its nearest existing parent) is not writable.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"{option} {path} is a file, not a folder; fix: choose another {option}")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"{option} {path} is not writable for this user; fix: choose another {option}")
        return
    check_writable_parent(path, option=option)


def check_run_dir(path: str | Path, *, option: str = "--run-dir") -> None:
    """Refuse a run folder that holds anything but a stembed run's files (its config.yaml would be replaced).

    Raises:
        OutputError: ``path`` is a file, or a folder holding other files, or cannot be created.
    """
    path = Path(path)
    check_output_folder(path, option=option)
    if not path.exists():
        return
    foreign = sorted(p.name for p in path.iterdir() if p.name not in RUN_DIR_ENTRIES)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(
            f"{option} {path} already holds files that are not a stembed run's ({shown}); fix: choose a new "
            f"or empty {option}"
        )

