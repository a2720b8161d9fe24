"""Appending dates to a scene store in place, crash-safe: the journal protocol of ``stembed cube --extend``.

A store grows along ``time`` in place (a monitoring store may be large: it is never copied). Zarr writes each file
atomically (a temporary file, then a rename), but an append touches several files per cube (the array's
metadata, new chunks, the time coordinate, the provenance), so a kill between two of them would leave a time
axis that reads as valid and is not. The protocol, with the store's lock held (``STORE.lock``):

1. **Stage** (:func:`save_new_part`): the new dates' cubes (``s2.zarr``, ``s1.zarr``) and ``journal.json``, the
   store's whole target state (per cube: its old and new length, the full time axis, the new provenance; the
   root attributes after the extension), are written into ``STAGE/new/`` and renamed into place as a whole:
   the folder exists only complete. The store is not touched yet: a kill here leaves the old store, readable.
2. **Mark** (:func:`mark_extending`): the root attribute ``stembed_extending`` (:data:`EXTENDING_ATTR`, with the
   target end) is set. From here on :func:`stembed.io.cube.open_scene` refuses the store and names the command
   that finishes it.
3. **Append** (:func:`append_group`, per cube): the data array grown to the target length and the new dates
   written (new chunks only: the store's chunks hold one date each, so no old date's chunk is rewritten), the
   time coordinate rewritten whole from the journal (:func:`write_time`), the provenance attribute set.
4. **Commit** (:func:`commit_extension`): the root attributes replaced by the journal's in one atomic write: the
   extension recorded in ``extensions``, the marker gone. The store is complete and readable again.

Steps 3 and 4 set the store to the journal's target state whatever state a killed run left it in (an array
already grown is not grown twice; every new date and the whole time axis are written again), so rerunning the
same command after a kill at any point finishes the extension with the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from stembed.errors import CubeBuildError
from stembed.io.cube import EXTENDING_ATTR, write_atomically
from stembed.types import BAND, TIME

NEW_PART = "new"
"""The staged new part under the extension's staging folder (complete, or absent)."""
JOURNAL = "journal.json"
"""The target state of the store, in :data:`NEW_PART`."""
JOURNAL_FORMAT = 1


def save_new_part(stage: Path, cubes: dict[str, xr.DataArray], journal: dict[str, Any]) -> Path:
    """Stage the new dates' cubes (one per sensor, ``(time, band, y, x)``; a sensor without a new date is left out)
    and the journal as ``stage/new/``, atomically (step 1)."""

    def write(tmp: Path) -> None:
        tmp.mkdir()
        for sensor, da in cubes.items():
            if da.sizes[TIME]:
                values = da.assign_coords({BAND: da[BAND].values.astype(object)})  # zarr v3 strings
                xr.Dataset({"values": values}).to_zarr(
                    tmp / f"{sensor}.zarr", mode="w-", zarr_format=3, consolidated=False
                )
        (tmp / JOURNAL).write_text(json.dumps(journal, indent=1))

    return write_atomically(stage / NEW_PART, write, overwrite=False)


def load_journal(stage: Path) -> dict[str, Any] | None:
    """The journal of the staged new part, None if there is none (not staged, or not completely)."""
    path = stage / NEW_PART / JOURNAL
    if not path.is_file():
        return None
    try:
        journal = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return journal if isinstance(journal, dict) and journal.get("format") == JOURNAL_FORMAT else None


def root_attrs(store: Path) -> dict[str, Any]:
    """The root attributes of the scene store ``store``."""
    import zarr

    return dict(zarr.open_group(store, mode="r").attrs.asdict())


def mark_extending(store: Path, marker: dict[str, Any]) -> None:
    """Set the root attribute :data:`EXTENDING_ATTR` (step 2): from here on readers refuse the store."""
    import zarr

    group = zarr.open_group(store, mode="r+")
    group.attrs.put({**group.attrs.asdict(), EXTENDING_ATTR: marker})


def apply_journal(store: Path, stage: Path, journal: dict[str, Any]) -> None:
    """Append every cube's new dates as the journal says (step 3; each cube's time axis written whole)."""
    for sensor, entry in journal["groups"].items():
        append_group(store, sensor, entry, stage / NEW_PART / f"{sensor}.zarr")


def append_group(store: Path, sensor: str, entry: dict[str, Any], new: Path) -> None:
    """Grow the ``sensor`` cube of ``store`` to its target length, write its new dates from the staged cube ``new``,
    its whole time axis and its provenance (whatever part of this a killed run did before)."""
    import zarr

    group = zarr.open_group(store / sensor, mode="r+")
    data = group[sensor]
    if not isinstance(data, zarr.Array):
        raise CubeBuildError(f"{store}: {sensor}/{sensor} is not an array; fix: rebuild the store with stembed cube")
    n_old, n_new = int(entry["n_old"]), int(entry["n_new"])
    if data.shape[0] not in (n_old, n_old + n_new):
        raise CubeBuildError(
            f"{store}: the {sensor} cube has {data.shape[0]} dates, but the extension staged for it expects "
            f"{n_old} (before) or {n_old + n_new} (after); the store was changed by something else meanwhile; fix: "
            f"remove {new.parent.parent} and rerun the same command"
        )
    if n_new:
        with xr.open_zarr(new, consolidated=False, chunks=None) as ds:
            values = np.asarray(ds["values"].values, dtype=data.dtype)
        if values.shape != (n_new, *data.shape[1:]):
            raise CubeBuildError(
                f"{new}: staged {sensor} dates have shape {values.shape}, the store expects "
                f"({n_new}, {', '.join(map(str, data.shape[1:]))}); fix: remove {new.parent.parent} and rerun"
            )
        if data.shape[0] != n_old + n_new:
            data.resize((n_old + n_new, *data.shape[1:]))
        data[n_old:] = values
    write_time(group, entry["time_ns"])
    data.attrs["provenance"] = entry["provenance"]


def write_time(group: Any, time_ns: list[int]) -> None:
    """Write the whole ``time`` coordinate of a cube's group: the dates (ns since 1970), CF-encoded as xarray does
    (its units from the dates, so a new date finer than the old units is stored exactly)."""
    from xarray.coding.times import encode_cf_datetime

    arr = group[TIME]
    times = np.asarray(time_ns, dtype=np.int64).astype("datetime64[ns]")
    calendar = str(arr.attrs.get("calendar", "proleptic_gregorian"))
    nums, units, calendar = encode_cf_datetime(times, None, calendar, np.dtype(arr.dtype))
    if arr.shape != (len(times),):
        arr.resize((len(times),))
    arr[:] = np.asarray(nums, dtype=arr.dtype)
    arr.attrs.update({"units": units, "calendar": calendar})


def commit_extension(store: Path, journal: dict[str, Any]) -> None:
    """Replace the root attributes with the journal's in one atomic write (step 4): the extension recorded, the
    marker gone."""
    import zarr

    zarr.open_group(store, mode="r+").attrs.put(journal["root_attrs"])
