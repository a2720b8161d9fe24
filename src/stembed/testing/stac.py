"""An offline STAC API built from the real WorldCereal patch, for tests of ``stembed cube``:
:func:`worldcereal_stac_catalog` writes a static catalog of COGs, :class:`StacTestServer` serves it over HTTP
(search, files with Range, recorded pages, fault injection). pystac, rasterio and http.server are imported
inside the functions that use them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from stembed.types import X, Y

S2_ASSETS_10M = ("B02", "B03", "B04", "B08")
S2_ASSETS_20M = ("B05", "B06", "B07", "B8A", "B11", "B12")
_VIEW_BAND_IDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
_TILE_31UDS_ULX, _TILE_31UDS_ULY = 499_980.0, 5_700_000.0  # the real T31UDS tile corner


def worldcereal_stac_catalog(
    location_dir: Any,
    out_dir: Any,
    *,
    s2_times: Any = None,
    s1_times: Any = None,
    baseline_04_every: int = 3,
    proj_code_every: int = 2,
) -> Any:
    """Write a static STAC catalog (pystac) whose assets are COGs made from a WorldCereal location's NetCDFs.

    For offline tests of ``stembed cube``: serve ``out_dir`` with :class:`StacTestServer`.

    * ``sentinel-2-l2a``: one item per S2 timestamp (``s2_times``, default all) with one uint16 DN COG
      per band (10 m bands on the 10 m grid, 20 m bands and ``SCL`` on the 20 m grid, exactly as in
      the NetCDFs), ``s2:processing_baseline``, and a ``granule-metadata`` asset: an ``MTD_TL.xml``
      *synthesised* here in the Sen2Cor layout, whose 23 x 23 sun and view angle grids are constant
      and hold that date's scene-mean angles from the NetCDF (``sunZenithAngles``, ``sunAzimuthAngles``,
      ``viewZenithMean``, ``viewAzimuthMean``; the same view angles for every band). Every
      ``baseline_04_every``-th item (0 = none) claims processing baseline 04.00 and stores DN + 1000
      (BOA_ADD_OFFSET = -1000), so a reader that ignores the offset gets different reflectance.
      The real data predate baseline 04.00: this is a test of the arithmetic, not of the archive.
    * ``sentinel-1-rtc``: one item per S1 timestamp (``s1_times``, default all), float32 COG assets
      ``vv``/``vh`` in *linear power*, converted from the NetCDF's GRD sigma0 dB (not RTC gamma0: the
      values are GRD-derived, only the format is that of an RTC collection), ``sat:orbit_state``.

    Every ``proj_code_every``-th item carries ``proj:code`` (new STAC items), the others ``proj:epsg``.
    Returns the path of ``catalog.json``.
    """
    from pathlib import Path as _Path

    import pystac

    folder, out = _Path(location_dir), _Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def load(pattern: str) -> xr.Dataset:
        (path,) = sorted(folder.glob(pattern))
        with xr.open_dataset(path, mask_and_scale=False) as ds:
            return ds.load()

    ds10, ds20, ds1 = load("S2_L2A_10m_*.nc"), load("S2_L2A_20m_*.nc"), load("S1_GRD-ASCENDING_20m_*.nc")
    epsg = int(ds10.attrs["epsg"])
    catalog = pystac.Catalog("stembed-test", "WorldCereal patch as a STAC catalog (stembed tests)")
    lonlat = _footprint(ds10, epsg)

    s2_col = _collection("sentinel-2-l2a", lonlat, ds10["timestamp"].values)
    s1_col = _collection("sentinel-1-rtc", lonlat, ds1["timestamp"].values)
    catalog.add_children([s2_col, s1_col])

    _add_s2_items(s2_col, ds10, ds20, out, lonlat, epsg, s2_times, baseline_04_every, proj_code_every)
    _add_s1_items(s1_col, ds1, out, lonlat, epsg, s1_times, proj_code_every)

    catalog.normalize_hrefs(str(out))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    return out / "catalog.json"


def _add_s2_items(
    s2_col: Any, ds10: xr.Dataset, ds20: xr.Dataset, out: Any, lonlat: tuple[float, float, float, float], epsg: int,
    s2_times: Any, baseline_04_every: int, proj_code_every: int,
) -> None:
    """One S2 item per picked timestamp: a DN COG per band (some at baseline 04.00: DN + 1000) and MTD_TL.xml."""
    import pystac

    s2_all = pd.DatetimeIndex(ds10["timestamp"].values)
    picks = range(len(s2_all)) if s2_times is None else [s2_all.get_loc(pd.Timestamp(t)) for t in s2_times]
    for k, i in enumerate(picks):
        t = s2_all[i]
        b04 = baseline_04_every > 0 and k % baseline_04_every == baseline_04_every - 1
        item_id = f"S2A_MSIL2A_{t:%Y%m%dT%H%M%S}_T31UDS"
        item_dir = out / "sentinel-2-l2a" / item_id
        item_dir.mkdir(parents=True, exist_ok=True)
        item = _item(item_id, t, lonlat, epsg, use_code=k % proj_code_every == 0, props={
            "platform": "Sentinel-2A", "constellation": "Sentinel 2", "s2:mgrs_tile": "31UDS",
            "s2:processing_baseline": "04.00" if b04 else "02.06",
            "eo:cloud_cover": float(np.isin(ds20["SCL"].values[i], (3, 8, 9, 10)).mean() * 100),
        })
        for band in (*S2_ASSETS_10M, *S2_ASSETS_20M, "SCL"):
            src = ds10 if band in S2_ASSETS_10M else ds20
            values = src[band].values[i]
            if band != "SCL" and b04:
                values = np.where(values == 0, 0, values.astype(np.int64) + 1000).astype(np.uint16)
            _write_asset(item, item_dir / f"{band}.tif", band, values, src, epsg, nodata=0)
        xml = item_dir / "MTD_TL.xml"
        xml.write_text(_mtd_tl_xml(epsg, *(float(ds20[v].values[i]) for v in (
            "sunZenithAngles", "sunAzimuthAngles", "viewZenithMean", "viewAzimuthMean"))))
        item.add_asset("granule-metadata", pystac.Asset(str(xml), media_type="application/xml", roles=["metadata"]))
        s2_col.add_item(item)


def _add_s1_items(
    s1_col: Any, ds1: xr.Dataset, out: Any, lonlat: tuple[float, float, float, float], epsg: int, s1_times: Any,
    proj_code_every: int,
) -> None:
    """One S1 item per picked timestamp: ``vv``/``vh`` COGs in linear power."""
    s1_all = pd.DatetimeIndex(ds1["timestamp"].values)
    picks = range(len(s1_all)) if s1_times is None else [s1_all.get_loc(pd.Timestamp(t)) for t in s1_times]
    for k, i in enumerate(picks):
        t = s1_all[i]
        item_id = f"S1A_IW_GRDH_1SDV_{t:%Y%m%dT%H%M%S}_rtc"
        item_dir = out / "sentinel-1-rtc" / item_id
        item_dir.mkdir(parents=True, exist_ok=True)
        item = _item(item_id, t, lonlat, epsg, use_code=k % proj_code_every == 0, props={
            "platform": "SENTINEL-1A", "constellation": "Sentinel-1", "sat:orbit_state": "ascending",
            "sar:instrument_mode": "IW", "sar:polarizations": ["VV", "VH"], "sar:product_type": "GRD",
        })
        for band in ("VV", "VH"):
            raw = ds1[band].values[i]
            linear = np.where(raw == 0, np.nan, 10.0 ** (raw.astype(np.float64) * 1e-4 / 10.0)).astype(np.float32)
            _write_asset(item, item_dir / f"{band.lower()}.tif", band.lower(), linear, ds1, epsg, nodata=float("nan"))
        s1_col.add_item(item)


def _footprint(ds: xr.Dataset, epsg: int) -> tuple[float, float, float, float]:
    import pyproj

    x, y = ds[X].values, ds[Y].values
    r = float(x[1] - x[0])
    x0, x1 = float(x[0] - r / 2), float(x[-1] + r / 2)
    y0, y1 = float(y[-1] - r / 2), float(y[0] + r / 2)
    tr = pyproj.Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True)
    west, south, east, north = tr.transform_bounds(x0, y0, x1, y1, densify_pts=21)
    return float(west), float(south), float(east), float(north)


def _collection(name: str, lonlat: tuple[float, float, float, float], times: Any) -> Any:
    import pystac

    t = pd.DatetimeIndex(times)
    extent = pystac.Extent(pystac.SpatialExtent([list(lonlat)]),
                           pystac.TemporalExtent([[t.min().to_pydatetime(), t.max().to_pydatetime()]]))
    return pystac.Collection(name, f"{name} (test data from WorldCereal NetCDFs)", extent, license="other")


def _item(item_id: str, t: pd.Timestamp, lonlat: tuple[float, float, float, float], epsg: int, *,
          use_code: bool, props: dict[str, Any]) -> Any:
    import datetime as _dt

    import pystac

    w, s, e, n = lonlat
    geom = {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}
    when = t.to_pydatetime().replace(tzinfo=_dt.UTC)
    item = pystac.Item(item_id, geom, list(lonlat), when, dict(props))
    item.properties["proj:code" if use_code else "proj:epsg"] = f"EPSG:{epsg}" if use_code else epsg
    item.stac_extensions.append("https://stac-extensions.github.io/projection/v2.0.0/schema.json")
    return item


def _write_asset(item: Any, path: Any, key: str, values: np.ndarray, src: xr.Dataset, epsg: int, *,
                 nodata: float) -> None:
    import pystac
    import rasterio
    from affine import Affine

    x, y = src[X].values, src[Y].values
    r = float(x[1] - x[0])
    transform = Affine(r, 0.0, float(x[0] - r / 2), 0.0, -r, float(y[0] + r / 2))
    h, w = values.shape
    with rasterio.open(path, "w", driver="COG", width=w, height=h, count=1, dtype=values.dtype,
                       crs=f"EPSG:{epsg}", transform=transform, nodata=nodata) as dst:
        dst.write(values, 1)
    asset = pystac.Asset(str(path), media_type=pystac.MediaType.COG, roles=["data"], extra_fields={
        "proj:shape": [h, w], "proj:transform": list(transform)[:6],
        "raster:bands": [{"data_type": str(values.dtype), "nodata": "nan" if np.isnan(nodata) else nodata,
                          "spatial_resolution": r}],
    })
    item.add_asset(key, asset)


def _mtd_tl_xml(epsg: int, sun_zenith: float, sun_azimuth: float, view_zenith: float, view_azimuth: float) -> str:
    """A Sen2Cor-layout granule metadata file with constant 23 x 23 angle grids (5 km spacing)."""

    def grid(value: float) -> str:
        row = " ".join([repr(float(value))] * 23)
        return "".join(f"<VALUES>{row}</VALUES>" for _ in range(23))

    def angles(zenith: float, azimuth: float) -> str:
        return (
            f"<Zenith><COL_STEP unit=\"m\">5000</COL_STEP><ROW_STEP unit=\"m\">5000</ROW_STEP>"
            f"<Values_List>{grid(zenith)}</Values_List></Zenith>"
            f"<Azimuth><COL_STEP unit=\"m\">5000</COL_STEP><ROW_STEP unit=\"m\">5000</ROW_STEP>"
            f"<Values_List>{grid(azimuth)}</Values_List></Azimuth>"
        )

    geopos = "".join(
        f"<Geoposition resolution=\"{r}\"><ULX>{_TILE_31UDS_ULX:.0f}</ULX><ULY>{_TILE_31UDS_ULY:.0f}</ULY>"
        f"<XDIM>{r}</XDIM><YDIM>-{r}</YDIM></Geoposition>" for r in (10, 20, 60)
    )
    views = "".join(
        f"<Viewing_Incidence_Angles_Grids bandId=\"{i}\" detectorId=\"1\">{angles(view_zenith, view_azimuth)}"
        "</Viewing_Incidence_Angles_Grids>" for i in range(len(_VIEW_BAND_IDS))
    )
    return (
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
        "<!-- synthesised by stembed.testing: constant angle grids from WorldCereal scene-mean angles -->\n"
        "<n1:Level-2A_Tile_ID xmlns:n1=\"https://psd-14.sentinel2.eo.esa.int/PSD/S2_PDI_Level-2A_Tile_Metadata.xsd\">"
        "<n1:Geometric_Info><Tile_Geocoding><HORIZONTAL_CS_NAME>WGS84 / UTM</HORIZONTAL_CS_NAME>"
        f"<HORIZONTAL_CS_CODE>EPSG:{epsg}</HORIZONTAL_CS_CODE>{geopos}</Tile_Geocoding>"
        f"<Tile_Angles><Sun_Angles_Grid>{angles(sun_zenith, sun_azimuth)}</Sun_Angles_Grid>{views}</Tile_Angles>"
        "</n1:Geometric_Info></n1:Level-2A_Tile_ID>\n"
    )


class StacTestServer:
    """A tiny STAC API plus file server on 127.0.0.1 (a free port), in a thread; for offline tests.

    * ``{url}/api``: landing page, ``/api/conformance``, ``/api/search`` (GET and POST): filters the
      catalog's items by ``collections``, ``bbox`` (intersection with the item bbox), ``datetime``
      (closed interval) and ``ids``, pages by ``limit`` with ``next`` links (a ``token`` offset);
    * ``{url}/files/<path>``: the catalog folder's files, with HEAD and HTTP Range (GDAL reads COGs so);
    * ``recorded``: a list of FeatureCollection dicts served instead, one per page (the string
      ``{API}`` in them is replaced by ``{url}/api``) to replay recorded search responses;
    * fault injection: :meth:`fail_next` answers the next ``n`` requests under a path prefix with an
      HTTP error, :attr:`missing` paths always answer 404; :attr:`log` lists every (method, path).

    Asset hrefs in search results point at ``/files``. Use as a context manager.
    """

    def __init__(self, root: Any = None, *, recorded: list[dict[str, Any]] | None = None, page_size: int = 50):
        from pathlib import Path as _Path

        self.root = _Path(root) if root is not None else None
        self.recorded = recorded
        self.page_size = page_size
        self.log: list[tuple[str, str]] = []
        self.missing: set[str] = set()
        self._faults: list[list[Any]] = []
        self._items: list[dict[str, Any]] = []
        self._server: Any = None
        self._thread: Any = None
        self.url = ""

    # -- lifecycle
    def __enter__(self) -> StacTestServer:
        import threading
        from http.server import ThreadingHTTPServer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        if self.root is not None:
            self._items = self._load_items()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    @property
    def api(self) -> str:
        """The STAC API's root URL (the catalog's search endpoint is below it)."""
        return f"{self.url}/api"

    def fail_next(self, prefix: str, n: int, status: int = 503) -> None:
        """Answer the next ``n`` requests whose path starts with ``prefix`` with ``status``."""
        self._faults.append([prefix, n, status])

    def hits(self, prefix: str) -> int:
        """How many requests so far had a path starting with ``prefix``."""
        return sum(1 for _, p in self.log if p.startswith(prefix))

    # -- content
    def _load_items(self) -> list[dict[str, Any]]:
        import json as _json
        import os

        assert self.root is not None
        items = []
        for path in sorted(self.root.rglob("*.json")):
            d = _json.loads(path.read_text())
            if d.get("type") != "Feature":
                continue
            for asset in d["assets"].values():
                href = asset["href"]
                if "://" not in href:
                    full = (path.parent / href).resolve()
                    asset["href"] = f"{self.url}/files/{os.path.relpath(full, self.root.resolve())}"
            d["links"] = []
            items.append(d)
        return items

    def _fault(self, path: str) -> int | None:
        if path in self.missing:
            return 404
        for f in self._faults:
            if path.startswith(f[0]) and f[1] > 0:
                f[1] -= 1
                return int(f[2])
        return None

    def _search(self, params: dict[str, Any]) -> dict[str, Any]:
        token = int(params.get("token") or 0)
        if self.recorded is not None:
            import json as _json

            page = _json.dumps(self.recorded[min(token, len(self.recorded) - 1)]).replace("{API}", self.api)
            return _json.loads(page)
        hits = [it for it in self._items if _matches(it, params)]
        hits.sort(key=lambda it: (it["properties"]["datetime"], it["id"]))
        limit = int(params.get("limit") or self.page_size)
        features = hits[token: token + limit]
        links: list[dict[str, Any]] = []
        if token + limit < len(hits):
            body = {k: v for k, v in params.items() if k != "token"} | {"token": token + limit}
            links.append({"rel": "next", "href": f"{self.api}/search", "method": "POST", "body": body,
                          "type": "application/geo+json"})
        return {"type": "FeatureCollection", "features": features, "links": links, "numberReturned": len(features)}

    def _landing(self) -> dict[str, Any]:
        return {
            "type": "Catalog", "id": "stembed-test-api", "stac_version": "1.0.0",
            "description": "stembed test STAC API",
            "conformsTo": ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search"],
            "links": [
                {"rel": "self", "href": self.api, "type": "application/json"},
                {"rel": "root", "href": self.api, "type": "application/json"},
                {"rel": "search", "href": f"{self.api}/search", "type": "application/geo+json", "method": "GET"},
                {"rel": "search", "href": f"{self.api}/search", "type": "application/geo+json", "method": "POST"},
            ],
        }


def _matches(item: dict[str, Any], params: dict[str, Any]) -> bool:
    cols = params.get("collections")
    if isinstance(cols, str):
        cols = cols.split(",")
    if cols and item.get("collection") not in cols:
        return False
    ids = params.get("ids")
    if isinstance(ids, str):
        ids = ids.split(",")
    if ids and item["id"] not in ids:
        return False
    bbox = params.get("bbox")
    if bbox:
        if isinstance(bbox, str):
            bbox = [float(v) for v in bbox.split(",")]
        w, s, e, n = item["bbox"]
        if not (w <= bbox[2] and bbox[0] <= e and s <= bbox[3] and bbox[1] <= n):
            return False
    window = params.get("datetime")
    if window:
        t = pd.Timestamp(item["properties"]["datetime"])
        lo, _, hi = str(window).partition("/")
        if lo not in ("", "..") and t < pd.Timestamp(lo):
            return False
        if hi not in ("", "..") and t > pd.Timestamp(hi):
            return False
    return True


def _make_handler(server: StacTestServer) -> Any:
    """The request handler class of ``server`` (http.server builds one handler per request from it)."""
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            return

        def do_GET(self) -> None:  # noqa: N802
            _route(self, server, "GET")

        def do_POST(self) -> None:  # noqa: N802
            _route(self, server, "POST")

        def do_HEAD(self) -> None:  # noqa: N802
            _route(self, server, "HEAD")

    return Handler


def _send(handler: Any, status: int, body: bytes, ctype: str = "application/json",
          extra: dict[str, str] | None = None, head: bool = False) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(body)))
    for k, v in (extra or {}).items():
        handler.send_header(k, v)
    handler.end_headers()
    if not head:
        handler.wfile.write(body)


def _route(handler: Any, server: StacTestServer, method: str) -> None:
    """Answer one request: an injected fault, the API's landing page, conformance and search, or a file."""
    import json
    from urllib.parse import parse_qs, unquote, urlparse

    url = urlparse(handler.path)
    path = unquote(url.path)
    server.log.append((method, path))
    body: dict[str, Any] = {}
    if method == "POST":
        n = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(n) or b"{}")
    status = server._fault(path)
    head = method == "HEAD"
    if status is not None:
        _send(handler, status, b'{"detail": "injected failure"}', head=head)
    elif path.rstrip("/") == "/api":
        _send(handler, 200, json.dumps(server._landing()).encode(), "application/geo+json")
    elif path == "/api/conformance":
        _send(handler, 200, json.dumps({"conformsTo": server._landing()["conformsTo"]}).encode(),
              "application/geo+json")
    elif path == "/api/search":
        params: dict[str, Any] = {k: v[0] for k, v in parse_qs(url.query).items()}
        _send(handler, 200, json.dumps(server._search(params | body)).encode(), "application/geo+json")
    elif path.startswith("/files/") and server.root is not None:
        _file(handler, server, path[len("/files/"):], head=head)
    else:
        _send(handler, 404, b'{"detail": "not found"}', head=head)


def _file(handler: Any, server: StacTestServer, rel: str, *, head: bool) -> None:
    """A file under the server's root, whole or the byte range asked for (as a COG reader asks)."""
    assert server.root is not None
    target = (server.root / rel).resolve()
    if server.root.resolve() not in target.parents or not target.is_file():
        _send(handler, 404, b"not found", "text/plain", head=head)
        return
    data = target.read_bytes()
    ctype = "application/xml" if target.suffix == ".xml" else "image/tiff"
    rng = handler.headers.get("Range")
    if rng and rng.startswith("bytes="):
        lo_s, _, hi_s = rng[len("bytes="):].partition("-")
        lo = int(lo_s) if lo_s else max(0, len(data) - int(hi_s))
        hi = min(int(hi_s), len(data) - 1) if (hi_s and lo_s) else len(data) - 1
        if lo >= len(data):
            _send(handler, 416, b"", ctype, {"Content-Range": f"bytes */{len(data)}"}, head=head)
            return
        _send(handler, 206, data[lo: hi + 1], ctype,
              {"Content-Range": f"bytes {lo}-{hi}/{len(data)}", "Accept-Ranges": "bytes"}, head=head)
        return
    _send(handler, 200, data, ctype, {"Accept-Ranges": "bytes"}, head=head)
