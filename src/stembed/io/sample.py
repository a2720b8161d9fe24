"""Sample an embedding store at points: one row per point and date, for tables, probes and plots (no torch).

A point falls in the pixel that contains it; its value at a date is the mean over the valid pixels
of the K x K window centred on that pixel (K odd; K = 1 is the pixel itself). ``n_valid`` says
how many pixels the mean is over, so a caller can demand a minimum.

Windows are **not** clipped at the grid border: a window reaching past it is an error naming the
points and by how many pixels, because a clipped window would silently average a different area
than its neighbours. Choose a smaller K, or drop those points.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pyproj
import xarray as xr

from stembed.errors import UserError
from stembed.types import FEATURE, TIME, X, Y

_BATCH_POINTS = 2048  # points read per batch, bounding memory to batch * K^2 * time * feature values
_SHOW = 5  # offending points named in an error


class SampleError(UserError):
    """Points or tables that cannot be sampled or written; the message names the problem and the fix."""


def _name_points(ids: pd.Series, bad: np.ndarray, detail: list[str] | None = None) -> str:
    pos = np.flatnonzero(bad)
    shown = [f"{ids.iloc[p]!r}" + (f" ({detail[p]})" if detail else "") for p in pos[:_SHOW]]
    more = f" and {pos.size - _SHOW} more" if pos.size > _SHOW else ""
    return ", ".join(shown) + more


def _point_xy(points: pd.DataFrame, crs: str, ids: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Point coordinates in the store CRS, from ``x, y`` or WGS84 ``lon, lat`` columns."""
    cols = set(points.columns)
    has_xy, has_ll = {"x", "y"} <= cols, {"lon", "lat"} <= cols
    if has_xy == has_ll:
        what = "both x/y and lon/lat" if has_xy else f"neither (columns: {sorted(map(str, cols))})"
        raise SampleError(
            f"points need columns lon, lat (WGS84 degrees) or x, y (metres in the store CRS {crs}), "
            f"got {what}; fix: keep exactly one pair"
        )
    a_name, b_name = ("x", "y") if has_xy else ("lon", "lat")
    try:
        a = points[a_name].to_numpy(dtype=np.float64)
        b = points[b_name].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise SampleError(f"point columns {a_name}, {b_name} must be numbers ({e})") from e
    bad = ~(np.isfinite(a) & np.isfinite(b))
    if bad.any():
        raise SampleError(
            f"points {_name_points(ids, bad)} have no {a_name}/{b_name}; fix: fill or drop them"
        )
    if has_xy:
        return a, b
    bad = (np.abs(b) > 90) | (np.abs(a) > 180)
    if bad.any():
        raise SampleError(
            f"points {_name_points(ids, bad)} have lat outside [-90, 90] or lon outside [-180, 180]; "
            "fix: check the values (are lon and lat swapped?)"
        )
    to_store = pyproj.Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    x, y = to_store.transform(a, b)
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


def sample_points(embeddings: xr.Dataset, points: pd.DataFrame, *, window_px: int = 1) -> pd.DataFrame:
    """Window means of the embedding at each point and date.

    Args:
        embeddings: a store from :func:`stembed.io.embeddings.open_embeddings`.
        points: columns ``lon, lat`` (WGS84) or ``x, y`` (store CRS metres), optional unique ``id``
            (else the row index).
        window_px: K, the odd window side in pixels (1 = the point's pixel).

    Returns:
        A long table ``id, time, x, y, <features>, n_valid``, points in input order and dates in
        time order; ``x, y`` is the centre of the point's pixel (store CRS); ``n_valid`` counts the
        valid pixels in the window at that date, and the features are NaN where it is 0. A daily
        store adds ``flag``: how the point's own pixel got its value that day (see its ``flag_meanings``).

    Raises:
        SampleError: bad columns, duplicate ids, an even or non-positive K, a point outside the
            grid, or a window reaching past the grid border.
    """
    k = window_px
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1 or k % 2 == 0:
        raise SampleError(f"window_px must be an odd whole number >= 1 (1, 3, 5, ...), got {window_px!r}")
    k, half = int(k), int(k) // 2
    ids = points["id"] if "id" in points.columns else pd.Series(points.index, index=points.index, name="id")
    ids = ids.reset_index(drop=True)
    dup = ids.duplicated(keep=False).to_numpy()
    if dup.any():
        raise SampleError(
            f"point ids {_name_points(ids, dup)} appear more than once; fix: make the ids unique"
        )
    x_left, dx, rot_x, y_top, rot_y, dy = (float(v) for v in embeddings.attrs["transform"])
    if rot_x or rot_y:
        raise SampleError("the store's transform is rotated; sampling supports north-up grids only")
    row, col = _pixels(embeddings, points, ids, k)
    means, n_valid, features = _window_means(embeddings, row, col, half)

    n_t, n_p = embeddings.sizes[TIME], len(ids)
    cx, cy = x_left + dx * (col + 0.5), y_top + dy * (row + 0.5)
    table = pd.DataFrame({
        "id": np.repeat(ids.to_numpy(), n_t),
        "time": np.tile(embeddings[TIME].values, n_p),
        "x": np.repeat(np.asarray(cx, np.float64), n_t),
        "y": np.repeat(np.asarray(cy, np.float64), n_t),
    })
    for j, f in enumerate(features):
        table[f] = means[:, :, j].reshape(-1)
    table["n_valid"] = n_valid.reshape(-1)
    if "flag" in embeddings:  # a daily store: how the point's own pixel got its value that day
        flag = embeddings["flag"].transpose(TIME, Y, X)
        at = flag.isel({Y: xr.DataArray(row, dims="p"), X: xr.DataArray(col, dims="p")}).transpose("p", TIME)
        table["flag"] = np.asarray(at.values, np.uint8).reshape(-1)
    return table


def _pixels(embeddings: xr.Dataset, points: pd.DataFrame, ids: pd.Series, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each point's pixel (north-up transform).

    Raises:
        SampleError: a point outside the grid, or its K x K window reaching past the border.
    """
    half = k // 2
    crs = str(embeddings.attrs["crs"])
    x_left, dx, _, y_top, _, dy = (float(v) for v in embeddings.attrs["transform"])
    height, width = embeddings.sizes[Y], embeddings.sizes[X]
    px, py = _point_xy(points, crs, ids)
    col = np.floor((px - x_left) / dx).astype(np.int64)
    row = np.floor((py - y_top) / dy).astype(np.int64)
    outside = (row < 0) | (row >= height) | (col < 0) | (col >= width)
    if outside.any():
        right, bottom = x_left + dx * width, y_top + dy * height
        raise SampleError(
            f"points {_name_points(ids, outside)} lie outside the embedding grid "
            f"(x {x_left:.0f}..{right:.0f}, y {bottom:.0f}..{y_top:.0f} in {crs}); "
            "fix: drop them, or check the coordinates and their CRS (x/y columns are metres in the store "
            "CRS, lon/lat are WGS84 degrees)"
        )
    over = np.maximum.reduce([half - row, row + half - (height - 1), half - col, col + half - (width - 1),
                              np.zeros_like(row)])
    if (over > 0).any():
        detail = [f"{o} px past the border" for o in over]
        raise SampleError(
            f"the {k}x{k} window of points {_name_points(ids, over > 0, detail)} reaches past the grid "
            f"border; fix: use a smaller --window-px (at most {max(1, 2 * int(half - over.max()) + 1)} "
            "fits them all), or drop those points"
        )
    return row, col


def _window_means(
    embeddings: xr.Dataset, row: np.ndarray, col: np.ndarray, half: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Mean of the valid, finite embeddings in each point's window per date ``(point, time, feature)`` (NaN where
    none), the count of those pixels ``(point, time)``, and the feature names; read in batches of points."""
    emb = embeddings["embedding"].transpose(TIME, FEATURE, Y, X)
    valid = embeddings["valid"].transpose(TIME, Y, X)
    off = np.arange(-half, half + 1)
    n_t, n_p = embeddings.sizes[TIME], len(row)
    features = [str(f) for f in emb[FEATURE].values]
    means = np.full((n_p, n_t, len(features)), np.nan, np.float32)
    n_valid = np.zeros((n_p, n_t), np.int64)
    for start in range(0, n_p, _BATCH_POINTS):
        sl = slice(start, start + _BATCH_POINTS)
        r, c = np.broadcast_arrays(
            row[sl, None, None] + off[None, :, None], col[sl, None, None] + off[None, None, :]
        )
        rr, cc = xr.DataArray(r, dims=("p", "wy", "wx")), xr.DataArray(c, dims=("p", "wy", "wx"))
        e = np.asarray(emb.isel({Y: rr, X: cc}).transpose("p", TIME, FEATURE, "wy", "wx").values, np.float64)
        ok = np.asarray(valid.isel({Y: rr, X: cc}).transpose("p", TIME, "wy", "wx").values, bool)
        ok &= np.isfinite(e).all(axis=2)
        n = ok.sum(axis=(2, 3))
        total = np.where(ok[:, :, None], e, 0.0).sum(axis=(3, 4))
        with np.errstate(invalid="ignore", divide="ignore"):
            means[sl] = np.where(n[:, :, None] > 0, total / n[:, :, None], np.nan)
        n_valid[sl] = n
    return means, n_valid, features


def read_points(path: str | Path) -> pd.DataFrame:
    """Read a CSV of points (columns ``lon, lat`` or ``x, y``, optional ``id``); names are stripped of spaces.

    Raises:
        FileNotFoundError: no file at ``path``.
        SampleError: not a ``.csv`` file, or an empty one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no points file at {path}; fix: check the path")
    if path.suffix.lower() != ".csv":
        raise SampleError(f"{path}: points must be a .csv file with columns lon, lat or x, y (optional id)")
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError as e:
        raise SampleError(
            f"{path} is empty; fix: write a header (lon,lat or x,y) and one row per point"
        ) from e
    df.columns = [str(c).strip() for c in df.columns]
    if df.empty:
        raise SampleError(f"{path} has a header but no points; fix: add one row per point")
    return df


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` as ``.csv`` or ``.parquet`` (chosen by the suffix); parquet needs pyarrow.

    Raises:
        SampleError: another suffix, or ``.parquet`` without pyarrow installed.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise SampleError(f"{path}: cannot tell the table format; fix: end the name in .csv or .parquet")
    if suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise SampleError(
            f"writing {path} needs pyarrow, which is not installed; fix: `pip install pyarrow`, "
            "or write a .csv instead"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        df.to_csv(path, index=False, date_format="%Y-%m-%dT%H:%M:%S")
    else:
        df.to_parquet(path, index=False)
    return path
