"""The STAC search layer of ``stembed cube``: catalogs, item search, the output grid and the pieces of a period.

* :func:`search_items`: one pystac-client item search (any STAC API; Planetary Computer by default),
  every HTTP request retried with exponential backoff on 429/5xx and connection errors; items come
  back sorted by (datetime, id) so a search is a reproducible input.
* :func:`sign_items`: Planetary Computer asset URLs are signed (``planetary-computer`` package) only
  when the catalog *is* Planetary Computer; other catalogs get the items untouched.
* :func:`utm_grid`: a bounding box (lon/lat) or a point and a size in metres -> one UTM 10 m grid
  (:class:`GridSpec`). A box that spans two UTM zones is put in the zone of its centre, and the
  grid says so in :attr:`GridSpec.note`.
* :func:`period_pieces`: a long period cut at calendar-year boundaries (or every N months), the
  unit in which ``stembed cube`` fetches, stages and resumes.
* :func:`http_session` / :func:`fetch_bytes`: the retrying HTTP session used for side files such
  as the Sentinel-2 granule metadata (``MTD_TL.xml``).

pystac-client and requests are imported inside the functions that use them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from stembed.errors import UserError
from stembed.geometry import RESOLUTION_M, GridSpec, grid_around_bbox, grid_around_point

PLANETARY_COMPUTER = "https://planetarycomputer.microsoft.com/api/stac/v1"
"""The default catalog."""
S2_COLLECTION = "sentinel-2-l2a"
S1_COLLECTION = "sentinel-1-rtc"
RETRY_STATUS = (429, 500, 502, 503, 504)
"""HTTP statuses retried (with backoff) by every request of the search layer."""



class StacError(UserError):
    """A STAC search, catalog or grid request that cannot be served; the message names the problem and the fix."""


# ----------------------------------------------------------------------------- HTTP
@dataclass(frozen=True)
class RetryPolicy:
    """How HTTP requests are retried: ``retries`` attempts after the first, waits ``backoff_s * 2**k``."""

    retries: int = 5
    backoff_s: float = 1.0

    def urllib3_retry(self) -> Any:
        """This policy as urllib3's ``Retry`` (also on the :data:`RETRY_STATUS` answers), for a requests session."""
        from urllib3.util.retry import Retry

        return Retry(
            total=self.retries,
            connect=self.retries,
            read=self.retries,
            status=self.retries,
            backoff_factor=self.backoff_s,
            status_forcelist=RETRY_STATUS,
            allowed_methods=frozenset({"GET", "POST", "HEAD"}),
            raise_on_status=False,
        )


def http_session(policy: RetryPolicy = RetryPolicy()) -> Any:
    """A ``requests.Session`` that retries 429/5xx and connection errors with exponential backoff."""
    import requests
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    adapter = HTTPAdapter(max_retries=policy.urllib3_retry())
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def fetch_bytes(url: str, session: Any, *, what: str) -> bytes:
    """GET ``url`` (retried by ``session``); a failure is a :class:`StacError` naming ``what`` and the URL."""
    import requests

    try:
        resp = session.get(url, timeout=60)
    except requests.RequestException as e:
        raise StacError(
            f"could not fetch {what} from {_short(url)} ({type(e).__name__}: {e}); fix: check the network "
            "and rerun (finished pieces are kept)"
        ) from e
    if resp.status_code != 200:
        raise StacError(
            f"could not fetch {what} from {_short(url)}: HTTP {resp.status_code} after retries; fix: check that "
            "the catalog still serves it, then rerun (finished pieces are kept)"
        )
    return bytes(resp.content)


def _short(url: str) -> str:
    return url.split("?", 1)[0]  # never print signing tokens


# ----------------------------------------------------------------------------- catalogs and search
def is_planetary_computer(catalog: str) -> bool:
    """True for the Planetary Computer STAC API (whose asset URLs must be signed)."""
    return "planetarycomputer.microsoft.com" in catalog.lower()


def open_catalog(catalog: str, policy: RetryPolicy = RetryPolicy()) -> Any:
    """Open a STAC API with pystac-client; every request is retried as ``policy`` says."""
    import requests
    from pystac_client import Client
    from pystac_client.exceptions import APIError
    from pystac_client.stac_api_io import StacApiIO

    io = StacApiIO(max_retries=policy.urllib3_retry(), timeout=60)
    try:
        return Client.open(catalog, stac_io=io)
    except (APIError, requests.RequestException, OSError) as e:
        raise StacError(
            f"cannot open the STAC API at {catalog} ({type(e).__name__}: {e}); fix: check --catalog (it must be a "
            "STAC API root with item search) and the network"
        ) from e


def search_items(
    catalog: str,
    collection: str,
    bbox_lonlat: Sequence[float],
    start: str,
    end: str,
    *,
    policy: RetryPolicy = RetryPolicy(),
    client: Any = None,
    page_size: int = 100,
) -> list[Any]:
    """All items of ``collection`` intersecting ``bbox_lonlat`` with a datetime in [start, end] (whole days).

    Returns ``pystac.Item`` objects sorted by (datetime, id), unsigned. An empty list is not an error
    here: the caller knows which emptiness is fatal.

    Raises:
        StacError: the API cannot be reached, refuses the search or does not know the collection.
    """
    import requests
    from pystac_client.exceptions import APIError

    client = client if client is not None else open_catalog(catalog, policy)
    window = f"{_day(start)}T00:00:00Z/{_day(end)}T23:59:59Z"
    try:
        search = client.search(
            collections=[collection], bbox=[float(v) for v in bbox_lonlat], datetime=window, limit=page_size
        )
        items = list(search.items())
    except (APIError, requests.RequestException) as e:
        raise StacError(
            f"the item search of {collection!r} at {catalog} failed ({type(e).__name__}: {e}); fix: check the "
            "collection name (--s2-collection / --s1-collection) and the network, then rerun"
        ) from e
    items.sort(
        key=lambda it: (
            pd.Timestamp(it.datetime).tz_localize(None)
            if it.datetime.tzinfo is None
            else pd.Timestamp(it.datetime).tz_convert(None),
            it.id,
        )
    )
    return items


def _day(date: str) -> str:
    try:
        return pd.Timestamp(date).strftime("%Y-%m-%d")
    except ValueError as e:
        raise StacError(f"{date!r} is not a date; fix: use YYYY-MM-DD") from e


def sign_items(items: list[Any], catalog: str) -> list[Any]:
    """Signed copies of ``items`` for Planetary Computer; the items themselves for any other catalog."""
    if not is_planetary_computer(catalog):
        return items
    signer = planetary_computer_signer()
    return [signer(it.clone()) for it in items]


def planetary_computer_signer() -> Callable[[Any], Any]:
    """``planetary_computer.sign`` (imported lazily)."""
    import planetary_computer

    return planetary_computer.sign


def item_epsg(item: Any, asset: str | None = None) -> int:
    """EPSG code of an item (or one of its assets) from ``proj:code`` (new items) or ``proj:epsg`` (older ones)."""
    for props in ([item.assets[asset].extra_fields] if asset and asset in item.assets else []) + [
        item.properties
    ]:
        code = props.get("proj:code")
        if isinstance(code, str):
            m = re.fullmatch(r"EPSG:(\d+)", code.strip(), flags=re.IGNORECASE)
            if m:
                return int(m.group(1))
        epsg = props.get("proj:epsg")
        if epsg is not None:
            return int(epsg)
    raise StacError(
        f"item {item.id} has no proj:code or proj:epsg, so its CRS is unknown; fix: use a collection whose items "
        "carry the STAC projection extension"
    )


# ----------------------------------------------------------------------------- grid
def utm_grid(
    *,
    bbox: Sequence[float] | None = None,
    point: Sequence[float] | None = None,
    size_m: float | None = None,
    resolution_m: float = RESOLUTION_M,
) -> GridSpec:
    """The 10 m UTM grid for a lon/lat box ``(W, S, E, N)``, or for a square of ``size_m`` centred on ``point``.

    Pixel edges sit on multiples of ``resolution_m`` in the zone's coordinates (the Sentinel-2 tile
    grid), so 10 m bands are read without resampling. A box is covered completely (its UTM envelope,
    snapped outwards); a point's square is snapped to the nearest pixel edges. A box spanning two
    UTM zones goes in the zone of its centre; :attr:`GridSpec.note` says so.

    Raises:
        StacError: neither or both of bbox and point, or an empty or invalid box or size.
    """
    if (bbox is None) == (point is None):
        raise StacError(
            "give the area either as a bounding box (--bbox W S E N) or as --point LON LAT --size-m M"
        )
    if bbox is not None:
        if len(bbox) != 4:
            raise StacError(f"--bbox needs 4 numbers W S E N (lon/lat degrees), got {list(bbox)}")
        w, s, e, n = (float(v) for v in bbox)
        if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
            raise StacError(
                f"--bbox {w} {s} {e} {n} is not a lon/lat box with W < E and S < N; fix: give W S E N in degrees"
            )
        if size_m is not None:
            raise StacError("--size-m goes with --point, not with --bbox")
        return grid_around_bbox(w, s, e, n, resolution_m)
    if point is None or len(point) != 2:
        raise StacError(f"--point needs 2 numbers LON LAT, got {point}")
    lon, lat = (float(v) for v in point)
    if not (-180 <= lon <= 180 and -90 <= lat <= 90):
        raise StacError(f"--point {lon} {lat} is not a lon/lat position; fix: give LON LAT in degrees")
    if size_m is None or not size_m >= resolution_m:
        raise StacError(
            f"--point needs --size-m of at least {resolution_m:g} m (the side of the square), got {size_m}"
        )
    return grid_around_point(lon, lat, float(size_m), resolution_m)


# ----------------------------------------------------------------------------- pieces of a period
@dataclass(frozen=True)
class Piece:
    """One part of the period, inclusive dates ``YYYY-MM-DD``; ``name`` labels its staged files."""

    start: str
    end: str

    @property
    def name(self) -> str:
        """``START_END``, the stem of the piece's staged files."""
        return f"{self.start}_{self.end}"


def period_pieces(start: str, end: str, *, months: int = 12) -> list[Piece]:
    """Cut [start, end] into pieces: at calendar-year boundaries (``months=12``) or every ``months`` months.

    Raises:
        StacError: an invalid or reversed period, or ``months`` not a divisor of 12.
    """
    t0, t1 = pd.Timestamp(_day(start)), pd.Timestamp(_day(end))
    if t1 < t0:
        raise StacError(
            f"the period ends ({t1.date()}) before it starts ({t0.date()}); fix: swap --start and --end"
        )
    if months < 1 or 12 % months:
        raise StacError(f"--piece-months is {months}; use a divisor of 12 (1, 2, 3, 4, 6 or 12)")
    pieces = []
    cur = t0
    while cur <= t1:
        first_month = ((cur.month - 1) // months) * months + 1
        boundary = pd.Timestamp(year=cur.year, month=first_month, day=1) + pd.DateOffset(months=months)
        stop = min(t1, boundary - pd.Timedelta(days=1))
        pieces.append(Piece(cur.strftime("%Y-%m-%d"), stop.strftime("%Y-%m-%d")))
        cur = stop + pd.Timedelta(days=1)
    return pieces
