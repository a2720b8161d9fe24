"""Helpers for tests and benchmarks: random bundles, a toy companion sensor, and an offline STAC API built from
the real WorldCereal patch (catalog writer + HTTP server). Production code never imports this module; the
synthetic scene it re-exports lives in :mod:`stembed.data.synthetic` (the ``synthetic`` data source).
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from stembed.contract import Scene, make_cube
from stembed.data.synthetic import LAND_COVER, synthetic_scene  # noqa: F401  (re-exported: it lived here first)
from stembed.sensors import S1, S2, SensorPlugin, SensorSpec
from stembed.types import BAND, TIME, X, Y


def random_fusion_bundle(
    path: Any,
    *,
    seed: int = 0,
    preset: str = "small",
    tiny: bool = False,
    sensors: dict[str, Any] | None = None,
    gapfill: bool = False,
) -> Any:
    """Write an untrained fusion bundle with seeded random weights and return its path.

    For tests and benchmarks where only the arithmetic matters (equality of two inference paths,
    speed). ``tiny`` takes the ``tiny`` preset instead of ``preset``; ``sensors`` replaces the band specs.
    ``gapfill`` writes a gap-fill bundle whose filler layers are random too (not a copy of the fusion's).
    """
    import torch

    from stembed.config import ae_preset, fusion_preset
    from stembed.models.autoencoder import SensorAutoencoder
    from stembed.models.bundle import save_bundle
    from stembed.models.fusion import FusionModel
    from stembed.models.gapfill import GapFillModel

    name = "tiny" if tiny else preset
    a1, a2, f = ae_preset(name, "s1"), ae_preset(name, "s2"), fusion_preset(name)
    torch.manual_seed(seed)
    model = FusionModel({"s1": SensorAutoencoder(a1), "s2": SensorAutoencoder(a2)}, f)
    config = {"model": f.model_dump(mode="json"),
              "models": {"s1": a1.model_dump(mode="json"), "s2": a2.model_dump(mode="json")}}
    sensors = sensors or {"s1": S1, "s2": S2}
    provenance = {"note": f"random weights, seed {seed}"}
    if not gapfill:
        return save_bundle(path, kind="fusion", sensor=None, model=model, config=config, sensors=sensors,
                           provenance=provenance)
    both = GapFillModel(model)
    with torch.no_grad():
        for p in both.fill_parameters():
            p.normal_(0.0, 0.1)
    return save_bundle(path, kind="gapfill", sensor=None, model=both, config={"fusion": config}, sensors=sensors,
                       provenance=provenance)


# ----------------------------------------------------------------------------- a toy companion sensor
TOY_SENSOR = SensorSpec(
    name="toy",
    bands=("SEASON", "TEXTURE"),
    valid_range=(0.0, 1.0),
    normalisation=(
        "synthetic test sensor (stembed.testing.toy_sensor_plugin), daily over the S2 period: "
        "SEASON = seasonal sine shifted by a smoothed S2 B08 median, TEXTURE = smoothed S2 B08-B04 median modulated by the "
        "season, plus seeded noise; clipped to [0, 1]; about 3 % of days NaN"
    ),
)


def toy_sensor_plugin() -> SensorPlugin:
    """A companion-sensor plugin named ``"toy"`` (2 bands, [0, 1]) whose cube derives from the scene itself.

    For tests of the plugin plumbing and a fast three-sensor fusion on :func:`synthetic_scene`: its
    daily cube varies in space (smoothed S2 medians, so it is learnable and tied to the landscape) and
    in time (a seasonal sine), and is seeded by the site id. Not registered at import; register it with
    ``stembed.sensors.register_sensor(toy_sensor_plugin())`` (registering it twice is a no-op).
    """
    return SensorPlugin(
        spec=TOY_SENSOR, latent_dim=2, reduced_tokens=4, match_max_gap_days=0.5, load=_toy_load
    )


def _toy_load(scene: Scene, site_folder: Any) -> xr.DataArray:
    """The toy sensor's cube: daily (00:00) from the first to the last S2 day, on the S2 grid."""
    from scipy.ndimage import uniform_filter

    s2 = scene.s2
    seed = int.from_bytes(hashlib.sha256(f"toy:{scene.site}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    t2 = pd.DatetimeIndex(s2[TIME].values).normalize()
    times = pd.date_range(t2.min(), t2.max(), freq="D")

    def field(values: np.ndarray) -> np.ndarray:
        """A band's temporal median, smoothed over 5x5 px and scaled to about [-1, 1]."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels
            med = np.nanmedian(values, axis=0)
        med = np.where(np.isfinite(med), med, np.nanmean(med) if np.isfinite(med).any() else 0.0)
        f = uniform_filter(med, size=5, mode="nearest")
        return (f - f.mean()) / (np.abs(f - f.mean()).max() + 1e-9)

    nir, red = s2.sel({BAND: "B08"}).values, s2.sel({BAND: "B04"}).values
    f_nir, f_contrast = field(nir), field(nir - red)
    phase = 2 * np.pi * (times.dayofyear.to_numpy() - 100) / 365.25
    season = np.sin(phase)[:, None, None]  # (time, 1, 1)
    band0 = 0.5 + 0.25 * season + 0.15 * f_nir[None]
    band1 = 0.5 + 0.3 * f_contrast[None] * (0.6 + 0.4 * season)
    values = np.stack([band0, band1], axis=1)  # (time, band, y, x)
    values = values + 0.02 * rng.standard_normal(values.shape)
    values[rng.random(times.size) < 0.03] = np.nan
    return make_cube(
        np.clip(values, 0.0, 1.0), times=times, bands=TOY_SENSOR.bands, y=s2[Y].values, x=s2[X].values,
        crs=str(s2.attrs["crs"]), sensor=TOY_SENSOR.name, site=scene.site,
        provenance={"source": "stembed.testing.toy_sensor_plugin", "synthetic": True, "seed": seed,
                    "site_folder": None if site_folder is None else str(site_folder)},
    )


# ----------------------------------------------------------------------------- a local STAC catalog of real data
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

    catalog.normalize_hrefs(str(out))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    return out / "catalog.json"


def _footprint(ds: xr.Dataset, epsg: int) -> tuple[float, float, float, float]:
    import pyproj

    x, y = ds[X].values, ds[Y].values
    r = float(x[1] - x[0])
    x0, x1 = float(x[0] - r / 2), float(x[-1] + r / 2)
    y0, y1 = float(y[-1] - r / 2), float(y[0] + r / 2)
    tr = pyproj.Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True)
    return tuple(float(v) for v in tr.transform_bounds(x0, y0, x1, y1, densify_pts=21))  # type: ignore[return-value]


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
        page = hits[token: token + limit]
        links: list[dict[str, Any]] = []
        if token + limit < len(hits):
            body = {k: v for k, v in params.items() if k != "token"} | {"token": token + limit}
            links.append({"rel": "next", "href": f"{self.api}/search", "method": "POST", "body": body,
                          "type": "application/geo+json"})
        return {"type": "FeatureCollection", "features": page, "links": links, "numberReturned": len(page)}

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
    import json as _json
    from http.server import BaseHTTPRequestHandler
    from urllib.parse import parse_qs, unquote, urlparse

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            return

        def _send(self, status: int, body: bytes, ctype: str = "application/json",
                  extra: dict[str, str] | None = None, head: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, obj: Any) -> None:
            self._send(200, _json.dumps(obj).encode(), "application/geo+json")

        def _route(self, method: str) -> None:
            url = urlparse(self.path)
            path = unquote(url.path)
            server.log.append((method, path))
            body: dict[str, Any] = {}
            if method == "POST":
                n = int(self.headers.get("Content-Length") or 0)
                body = _json.loads(self.rfile.read(n) or b"{}")
            status = server._fault(path)
            if status is not None:
                self._send(status, b'{"detail": "injected failure"}', head=method == "HEAD")
                return
            if path.rstrip("/") == "/api":
                self._json(server._landing())
            elif path == "/api/conformance":
                self._json({"conformsTo": server._landing()["conformsTo"]})
            elif path == "/api/search":
                params: dict[str, Any] = {k: v[0] for k, v in parse_qs(url.query).items()}
                self._json(server._search(params | body))
            elif path.startswith("/files/") and server.root is not None:
                self._file(path[len("/files/"):], head=method == "HEAD")
            else:
                self._send(404, b'{"detail": "not found"}', head=method == "HEAD")

        def _file(self, rel: str, *, head: bool) -> None:
            assert server.root is not None
            target = (server.root / rel).resolve()
            if server.root.resolve() not in target.parents or not target.is_file():
                self._send(404, b"not found", "text/plain", head=head)
                return
            data = target.read_bytes()
            ctype = "application/xml" if target.suffix == ".xml" else "image/tiff"
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                lo_s, _, hi_s = rng[len("bytes="):].partition("-")
                lo = int(lo_s) if lo_s else max(0, len(data) - int(hi_s))
                hi = min(int(hi_s), len(data) - 1) if (hi_s and lo_s) else len(data) - 1
                if lo >= len(data):
                    self._send(416, b"", ctype, {"Content-Range": f"bytes */{len(data)}"}, head=head)
                    return
                self._send(206, data[lo: hi + 1], ctype,
                           {"Content-Range": f"bytes {lo}-{hi}/{len(data)}", "Accept-Ranges": "bytes"}, head=head)
                return
            self._send(200, data, ctype, {"Accept-Ranges": "bytes"}, head=head)

        def do_GET(self) -> None:  # noqa: N802
            self._route("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._route("POST")

        def do_HEAD(self) -> None:  # noqa: N802
            self._route("HEAD")

    return Handler


# ----------------------------------------------------------------------------- a stand-in embedding store
def write_embedding_store(
    path: Any, s2: xr.DataArray, values: np.ndarray, *, valid: np.ndarray | None = None, tile_px: int = 16,
    time_chunk: int = 8, attrs: dict[str, Any] | None = None,
) -> Any:
    """Write ``values`` (time, 7, y, x) on the grid of the S2 cube ``s2`` as a finished float32 embedding store,
    for tests of what reads one (eval, sample, export) where no model is needed. ``valid`` defaults to
    "every feature finite"; returns ``path``."""
    from stembed.contract import cube_transform
    from stembed.io.embeddings import Quantisation, create_store, finalise, write_tile

    q = Quantisation.identity(values.shape[1])
    valid = np.isfinite(values).all(axis=1) if valid is None else valid
    grid = create_store(
        path, time=s2[TIME].values, y=s2[Y].values, x=s2[X].values,
        features=[f"E{i}" for i in range(1, values.shape[1] + 1)], crs=str(s2.attrs["crs"]),
        transform=list(cube_transform(s2)), quant=q, tile_px=tile_px, time_chunk=time_chunk, attrs=attrs or {},
    )
    for tile in grid.tiles():
        ys, xs = grid.bounds(*tile)
        v = values[:, :, ys, xs]
        codes = q.encode(v)
        write_tile(path, grid, tile, codes, valid[:, ys, xs], q.error_stats(v, codes))
    finalise(path)
    return path
