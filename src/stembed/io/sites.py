"""The sites table of ``stembed cube --sites`` (one scene store per row) and the report of a run over it.

The table is a CSV file with a header row. Columns (names case-insensitive, order free):

* ``site`` (required): the site id, stored in the cube and naming its store ``OUT_DIR/<site>.zarr``;
  unique (also ignoring case), 1-100 characters of ``A-Z a-z 0-9 . _ -``, starting with a letter or digit;
* the area, per row either ``lon,lat,size_m`` (a square of ``size_m`` metres centred on the point) or
  ``west,south,east,north`` (a lon/lat box), as ``--point``/``--size-m`` and ``--bbox`` take it; a file
  may hold both groups of columns, each row fills exactly one;
* ``start``, ``end`` (optional): the row's period (YYYY-MM-DD), overriding ``--start``/``--end``.

:func:`read_sites` checks the whole table before anything is built, so a typo in row 900 is found
before row 1 starts downloading. No torch, no dask here.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from stembed.errors import UserError
from stembed.geometry import GridSpec
from stembed.io.stac import StacError, period_pieces, utm_grid

POINT_COLUMNS = ("lon", "lat", "size_m")
BBOX_COLUMNS = ("west", "south", "east", "north")
DATE_COLUMNS = ("start", "end")
COLUMNS = ("site", *POINT_COLUMNS, *BBOX_COLUMNS, *DATE_COLUMNS)
REPORT_NAME = "sites_report.csv"
REPORT_COLUMNS = (
    "site", "status", "path", "s2_dates", "s1_dates", "pieces_reused", "seconds", "error", "notes",
    "traceback",
)
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_FORMAT = (
    "columns site plus lon,lat,size_m (point) or west,south,east,north (box), optional start,end; "
    "see `stembed cube --help`"
)


class SitesError(UserError):
    """A sites table that cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Site:
    """One checked row: its id, the grid of its area and its period."""

    site: str
    line: int
    grid: GridSpec
    start: str
    end: str


def store_path(out_dir: str | Path, site: str) -> Path:
    """Where the scene store of ``site`` goes: ``OUT_DIR/<site>.zarr``."""
    return Path(out_dir) / f"{site}.zarr"


def read_sites(
    path: str | Path, *, start: str | None = None, end: str | None = None, piece_months: int = 12
) -> list[Site]:
    """Read and check the sites table ``path``; ``start``/``end`` are the periods of rows that give none.

    Raises:
        SitesError: the file is missing or unreadable; a column is missing, unknown or repeated; a row
            has a bad or repeated site id, both or neither area, a partial area, a bad number or
            area, or no (or a bad) period. The message names the line and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise SitesError(f"--sites {path} is not a file; fix: give the path of a CSV table ({_FORMAT})")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            reader = csv.reader(f)
            header = next(reader, None)
            rows = [(reader.line_num, row) for row in reader if any(v.strip() for v in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SitesError(
            f"--sites {path} cannot be read as a CSV table ({e}); fix: save it as UTF-8 CSV"
        ) from e
    columns = _check_header(path, header)
    if not rows:
        raise SitesError(f"--sites {path} holds no site (only a header); fix: add one row per site")
    sites: list[Site] = []
    seen: dict[str, Site] = {}
    for line, values in rows:
        if len(values) > len(columns):
            raise SitesError(
                f"{path} line {line} has {len(values)} fields but the header has {len(columns)}; fix: remove "
                "the extra fields (a comma inside a value needs quotes)"
            )
        row = {c: v.strip() for c, v in zip(columns, values, strict=False)}
        site = _read_row(path, line, row, start, end, piece_months)
        first = seen.setdefault(site.site.lower(), site)
        if first is not site:
            raise SitesError(
                f"{path} line {line}: site {site.site!r} repeats {first.site!r} of line {first.line} (ids "
                "must be unique, also ignoring case: each names a store); fix: give each row its own site id"
            )
        sites.append(site)
    return sites


def _check_header(path: Path, header: list[str] | None) -> list[str]:
    if header is None or not any(h.strip() for h in header):
        raise SitesError(f"--sites {path} is empty; fix: write a header row and one row per site ({_FORMAT})")
    columns = [h.strip().lower() for h in header]
    unknown = [h for h in columns if h not in COLUMNS]
    if unknown:
        raise SitesError(
            f"{path}: unknown column(s) {', '.join(repr(u) for u in unknown)}; fix: use only "
            f"{', '.join(COLUMNS)}"
        )
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise SitesError(f"{path}: column(s) {', '.join(repeated)} appear twice; fix: keep one of each")
    if "site" not in columns:
        raise SitesError(f"{path} has no 'site' column; fix: add one holding each row's site id ({_FORMAT})")
    if not (set(POINT_COLUMNS) <= set(columns) or set(BBOX_COLUMNS) <= set(columns)):
        raise SitesError(
            f"{path} has neither the point columns ({', '.join(POINT_COLUMNS)}) nor the box columns "
            f"({', '.join(BBOX_COLUMNS)}); fix: add one group (or both, each row filling one)"
        )
    return columns


def _read_row(
    path: Path, line: int, row: dict[str, str], start: str | None, end: str | None, piece_months: int
) -> Site:
    site = row.get("site", "")
    where = f"{path} line {line}" + (f" (site {site!r})" if site else "")
    if not site:
        raise SitesError(f"{where}: the site id is empty; fix: fill its 'site' column")
    if not _SAFE_ID.fullmatch(site):
        raise SitesError(
            f"{where}: the site id is not a safe file name; fix: use 1-100 characters of A-Z a-z 0-9 . _ - "
            "starting with a letter or digit"
        )
    point = [row.get(c, "") for c in POINT_COLUMNS]
    box = [row.get(c, "") for c in BBOX_COLUMNS]
    if any(point) and any(box):
        raise SitesError(
            f"{where} gives both a point ({', '.join(POINT_COLUMNS)}) and a box ({', '.join(BBOX_COLUMNS)}); "
            "fix: empty one of them"
        )
    if not any(point) and not any(box):
        raise SitesError(
            f"{where} gives no area; fix: fill {', '.join(POINT_COLUMNS)} (a point) or "
            f"{', '.join(BBOX_COLUMNS)} (a box)"
        )
    names, values = (POINT_COLUMNS, point) if any(point) else (BBOX_COLUMNS, box)
    missing = [n for n, v in zip(names, values, strict=True) if not v]
    if missing:
        raise SitesError(f"{where} has no {', '.join(missing)}; fix: fill all of {', '.join(names)}")
    numbers = [_number(where, n, v) for n, v in zip(names, values, strict=True)]
    try:
        if names == POINT_COLUMNS:
            lon, lat, size_m = numbers
            if not (-180 <= lon <= 180 and -90 <= lat <= 90):
                raise SitesError(f"{where}: lon {lon}, lat {lat} is not a place; fix: give degrees")
            if size_m < 10:
                raise SitesError(f"{where}: size_m is {size_m:g}; fix: give the square's side, >= 10 metres")
            grid = utm_grid(point=(lon, lat), size_m=size_m)
        else:
            w, s, e, n = numbers
            if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
                raise SitesError(
                    f"{where}: west {w:g}, south {s:g}, east {e:g}, north {n:g} is not a lon/lat box; fix: "
                    "give degrees with west < east and south < north"
                )
            grid = utm_grid(bbox=(w, s, e, n))
    except StacError as e:
        raise SitesError(f"{where}: {e}") from e
    period: dict[str, str] = {}
    for name, default in (("start", start), ("end", end)):
        value = row.get(name) or default
        if not value:
            raise SitesError(f"{where} has no {name} date; fix: fill its '{name}' column, or pass --{name}")
        period[name] = value
    try:
        period_pieces(period["start"], period["end"], months=piece_months)
    except StacError as e:
        raise SitesError(f"{where}: {e}") from e
    return Site(site, line, grid, period["start"], period["end"])


def _number(where: str, name: str, value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise SitesError(f"{where}: {name} is {value!r}, not a number; fix: write it like 4.35 (no unit)")
    return x


# ----------------------------------------------------------------------------- the report
@dataclass(frozen=True)
class SiteOutcome:
    """What became of one site: ``built``, ``already built`` or ``failed`` (with the error)."""

    site: str
    status: str
    path: Path
    s2_dates: int | None = None
    s1_dates: int | None = None
    pieces_reused: int | None = None
    seconds: float | None = None
    error: str = ""  # the error's message (with its type when it is not a stembed error)
    notes: tuple[str, ...] = ()
    traceback: str = ""  # only for an unexpected error (a bug): where it happened

    @property
    def failed(self) -> bool:
        """Whether the site could not be built."""
        return self.status == "failed"


def write_report(outcomes: Iterable[SiteOutcome], path: str | Path) -> Path:
    """Write ``outcomes`` as a CSV table (:data:`REPORT_COLUMNS`) at ``path``, atomically (no half file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(REPORT_COLUMNS)
        for o in outcomes:
            writer.writerow([
                o.site, o.status, str(o.path), _cell(o.s2_dates), _cell(o.s1_dates), _cell(o.pieces_reused),
                "" if o.seconds is None else f"{o.seconds:.1f}", o.error, "; ".join(o.notes), o.traceback,
            ])
    tmp.replace(path)
    return path


def _cell(value: int | None) -> str:
    return "" if value is None else str(value)


def summary_lines(outcomes: Sequence[SiteOutcome]) -> list[str]:
    """A plain-text table of ``outcomes`` (site, status, store or error), one line per site."""
    width = max([4, *(len(o.site) for o in outcomes)])
    status_width = max([6, *(len(o.status) for o in outcomes)])
    lines = [f"{'site':<{width}}  {'status':<{status_width}}  store or error"]
    for o in outcomes:
        what = o.error.splitlines()[0] if o.failed and o.error else str(o.path)
        if o.failed and o.error.count("\n"):
            what += " (...: the whole message is in the report)"
        lines.append(f"{o.site:<{width}}  {o.status:<{status_width}}  {what}")
    return lines
