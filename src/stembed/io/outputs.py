"""One place decides whether a command may write an output path, and what ``--overwrite`` may delete.

Every command checks its output here before it computes or writes anything, so a refused output
leaves nothing behind. The rules (docs/guide/cli.md, "Guarantees"):

- a path that does not exist is fine if its nearest existing parent is a writable folder;
- an existing path is refused unless ``overwrite`` is set, and even then only our own kind of output
  is replaced: a stembed scene store (``cube``), a stembed embedding store (``embed``), a table file
  (``sample``). A folder of someone's files, or a plain file where a store belongs, is never deleted;
- output folders that hold several named files (``report``, ``pca``, ``eval``, ``export``,
  ``train --run-dir``) are never deleted; only the files a command names are (re)written in them;
- ``embed`` and ``cube`` own their output while they run through ``OUT.lock`` (:func:`lock_output`):
  a second run refuses, a dead owner's lock is taken over; with the lock held, a store is created
  beside the output and renamed into place, and an old one renamed away before it is deleted, so a
  kill never leaves a half-made store at the output (:func:`remove_leftovers` cleans what it leaves).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable
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
# The first line of the config.yaml that `stembed train` writes into its run folder: a config.yaml without it
# (and without a run's other files) is a user's own, which a run must not replace.
RUN_CONFIG_HEADER = "# stembed run config: the resolved stage config of this run folder (written by `stembed train`)"


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


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is a config.yaml that `stembed train` wrote (its first line is the run header)."""
    try:
        with path.open(encoding="utf-8") as f:
            return f.readline().rstrip("\n") == RUN_CONFIG_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def check_run_dir(path: str | Path, *, option: str = "--run-dir") -> None:
    """Refuse a run folder that holds anything but a stembed run's files (its config.yaml would be replaced).

    Raises:
        OutputError: ``path`` is a file, or a folder holding other files, or cannot be created.
    """
    path = Path(path)
    check_output_folder(path, option=option)
    if not path.exists():
        return
    entries = {p.name for p in path.iterdir()}
    foreign = sorted(entries - RUN_DIR_ENTRIES)
    if entries == {"config.yaml"} and not _is_run_config(path / "config.yaml"):
        raise OutputError(
            f"{option} {path} holds a config.yaml that `stembed train` did not write, and a run would replace "
            f"it; fix: pass it with --config {path / 'config.yaml'} and choose a new or empty {option}"
        )
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(
            f"{option} {path} already holds files that are not a stembed run's ({shown}); fix: choose a new "
            f"or empty {option}"
        )



# ----------------------------------------------------------------------------- ownership of an output
_LOCK_MARK = "stembed_output_lock"


def lock_path(out: str | Path) -> Path:
    """The lock file of the output ``out``: ``OUT.lock`` next to it, so it outlives an ``--overwrite``."""
    out = Path(out)
    return out.with_name(out.name + ".lock")


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one we may not signal runs too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(path: Path) -> dict[str, object] | None:
    """The owner recorded in a stembed lock file; None if the file is not one (or vanished)."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(doc, dict) or doc.get(_LOCK_MARK) != 1:
        return {}
    return doc


class OutputLock:
    """This process owns ``out`` while it holds ``OUT.lock``; :meth:`release` (or ``with``) gives it up.

    Parent folders the lock had to create are removed again on release if ``out`` was never written.
    """

    def __init__(self, out: Path, path: Path, content: str, created: list[Path]) -> None:
        self.out, self.path, self._content, self._created = out, path, content, created

    def release(self) -> None:
        """Remove the lock file if it is still this run's, and the folders it created if ``out`` was never written."""
        try:
            if self.path.read_text() == self._content:  # still ours (never remove another run's)
                self.path.unlink()
        except FileNotFoundError:
            pass
        if not self.out.exists():
            for folder in reversed(self._created):
                try:
                    folder.rmdir()
                except OSError:  # not empty: something else lives there now
                    break

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_output(
    out: str | Path, *, command: str, option: str = "--out", echo: Callable[[str], None] | None = None
) -> OutputLock:
    """Take ownership of the output ``out`` for this process, atomically, before anything is written to it.

    The lock file ``OUT.lock`` records the owner's pid and host. It is created complete (written to a
    temporary file, then hard-linked into place, which fails if a lock exists), so two runs started
    together cannot both own ``out``. A lock whose pid is no longer running on this host is taken
    over, and ``echo`` says so; a live owner's lock, or one from another host (whose process cannot be
    checked), is refused.

    Raises:
        OutputError: another run holds ``out``, or ``OUT.lock`` is not a stembed lock file.
    """
    out = Path(out)
    check_writable_parent(out, option=option)  # a lock cannot be made where the output cannot
    path = lock_path(out)
    created: list[Path] = []  # missing parent folders, outermost first
    folder = path.parent
    while not folder.exists():
        created.insert(0, folder)
        folder = folder.parent
    for f in created:
        f.mkdir(exist_ok=True)
    try:
        return _take_lock(out, path, command, option, echo, created)
    except BaseException:
        for f in reversed(created):
            if f.exists() and not any(f.iterdir()):
                f.rmdir()
        raise


def _take_lock(
    out: Path, path: Path, command: str, option: str, echo: Callable[[str], None] | None, created: list[Path]
) -> OutputLock:
    host = socket.gethostname()
    say = echo or (lambda msg: print(msg, file=sys.stderr))
    content = json.dumps({
        _LOCK_MARK: 1, "pid": os.getpid(), "host": host, "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(content)
    try:
        for _ in range(3):  # a lock that vanishes or is taken over between our looks: look again
            try:
                os.link(tmp, path)  # atomic, and fails if a lock is there
                return OutputLock(out, path, content, created)
            except FileExistsError:
                pass
            owner = _read_lock(path)
            if owner is None:  # released meanwhile
                continue
            if not owner:
                raise OutputError(
                    f"{path} exists but is not a stembed lock file, so {out} may be someone else's; fix: "
                    f"choose another {option}, or remove {path} if it is yours"
                )
            pid = owner.get("pid")
            who = (
                f"pid {pid} on host {owner.get('host')}, `stembed {owner.get('command')}` since "
                f"{owner.get('started')}"
            )
            if owner.get("host") != host or not isinstance(pid, int) or _pid_alive(pid):
                raise OutputError(
                    f"{out} is being written by another stembed run ({who}); fix: wait for it to finish, or "
                    f"choose another {option}; if that run is gone, remove {path}"
                )
            stale = path.with_name(f".{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(path, stale)
            except FileNotFoundError:  # another run took it over first
                continue
            if _read_lock(stale) != owner:  # we moved the lock of a run that took over first: put it back
                try:
                    os.link(stale, path)
                except FileExistsError:
                    pass
                stale.unlink()
                continue
            stale.unlink()
            say(f"note: took over {path} from a run that is no longer running ({who})")
        raise OutputError(
            f"{out}: other runs keep taking and releasing {path}; fix: run one stembed command per {option}"
        )
    finally:
        tmp.unlink(missing_ok=True)


def creating_path(out: str | Path) -> Path:
    """Where a new store for ``out`` is created before it is renamed into place (``.OUT.creating``)."""
    out = Path(out)
    return out.with_name(f".{out.name}.creating")


def _deleting_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.deleting")


_ZARR_META = frozenset({"zarr.json", ".zattrs", ".zgroup", ".zarray", ".zmetadata"})


def _only_zarr(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but zarr metadata and chunk files (what a cut-short write leaves)."""
    for p in folder.rglob("*"):
        if p.is_symlink():
            return False
        if p.is_file() and p.name not in _ZARR_META and "c" not in p.relative_to(folder).parts[:-1]:
            return False
    return True


def remove_leftovers(out: str | Path, *, option: str = "--out") -> None:
    """With ``out``'s lock held: remove what a killed run left beside it (``.OUT.creating``/``.deleting``).

    Raises:
        OutputError: such a path holds anything but a zarr store (it is not ours, so it stays).
    """
    out = Path(out)
    for left in (creating_path(out), _deleting_path(out)):
        if not (left.exists() or left.is_symlink()):
            continue
        if left.is_symlink() or not left.is_dir() or not _only_zarr(left):
            raise OutputError(
                f"{left} is in the way of {out} and is not a store a stembed run left; fix: move it away, "
                f"or choose another {option}"
            )
        shutil.rmtree(left)


def discard_store(out: str | Path) -> None:
    """With ``out``'s lock held: delete our store at ``out`` (renamed first, so a kill midway leaves no
    half-deleted store at ``out``, only ``.OUT.deleting``, which the next run removes)."""
    out = Path(out)
    gone = _deleting_path(out)
    out.rename(gone)
    shutil.rmtree(gone)
