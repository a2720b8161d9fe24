"""FLUXNET daily (DD) files: daily GPP with the paper's quality filter, in either file layout.

Two layouts are accepted and detected from the file itself:

- FLUXNET2015 / ICOS Warm Winter ``FULLSET_DD``: ``TIMESTAMP`` as integer ``YYYYMMDD``, missing = -9999;
- FluxDataKit: ``TIMESTAMP`` as ``YYYY-MM-DD``, missing = ``NA``.

The quality filter is chosen by column *name* (the authors took the first column containing "QC",
probably the wrong one): keep days with ``NEE_VUT_REF_QC >= qc_min`` (the fraction of good
half-hours, 0-1) and drop negative GPP (spec §6 and section A).

Units: ``GPP_NT_VUT_REF`` is g C m-2 d-1 in official DD files; FluxDataKit keeps the daily mean of
the half-hourly value (umol CO2 m-2 s-1; x1.0378 gives g C m-2 d-1). The loader does not convert;
``attrs["units"]`` says which the file holds. Range-normalised metrics (NRMSE) do not depend on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stembed.errors import UserError

GPP = "GPP_NT_VUT_REF"
QC = "NEE_VUT_REF_QC"
MISSING = -9999.0
UNITS = {"fluxnet2015": "g C m-2 d-1", "fluxdatakit": "umol CO2 m-2 s-1 (daily mean)"}


class FluxError(UserError):
    """A flux file that cannot be read as FLUXNET daily data."""


def _layout(timestamps: pd.Series) -> str:
    first = str(timestamps.dropna().iloc[0]).strip()
    if len(first) == 8 and first.isdigit():
        return "fluxnet2015"
    if len(first) == 10 and first[4] == "-" and first[7] == "-":
        return "fluxdatakit"
    raise FluxError(
        f"TIMESTAMP {first!r} is neither YYYYMMDD (FLUXNET2015 DD) nor YYYY-MM-DD (FluxDataKit); "
        "pass a daily (DD) FLUXNET file"
    )


def load_fluxnet_daily(path: str | Path, *, qc_min: float = 0.7, drop_negative: bool = True) -> pd.DataFrame:
    """Daily GPP that passes the quality filter.

    Returns a DataFrame indexed by ``date`` (datetime64, daily) with columns ``gpp`` and ``qc``;
    ``attrs`` hold the layout, units, site (from the file name) and how many days each rule removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FluxError(f"flux file {path} does not exist")
    try:
        raw = pd.read_csv(path, dtype={"TIMESTAMP": str}, na_values=["NA", "-9999", "-9999.0"])
    except pd.errors.EmptyDataError:
        raise FluxError(f"flux file {path} is empty; fix: pass a FLUXNET daily (DD) CSV") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise FluxError(f"flux file {path} is not a readable CSV ({type(e).__name__}: {e})") from e
    missing = [c for c in ("TIMESTAMP", GPP, QC) if c not in raw.columns]
    if missing:
        raise FluxError(
            f"{path.name} lacks column(s) {missing}; a FLUXNET daily file with {GPP} and {QC} is needed "
            "(half-hourly HH files are not daily: use the DD file)"
        )
    if raw["TIMESTAMP"].dropna().empty:
        raise FluxError(f"{path.name} has a header but no dated rows; fix: pass a FLUXNET daily file")
    layout = _layout(raw["TIMESTAMP"])
    fmt = "%Y%m%d" if layout == "fluxnet2015" else "%Y-%m-%d"
    stamps = raw["TIMESTAMP"].str.strip()
    dates = pd.to_datetime(stamps, format=fmt, errors="coerce")
    bad = stamps[dates.isna() & stamps.notna()]
    if len(bad):
        raise FluxError(
            f"{path.name}: TIMESTAMP {bad.iloc[0]!r} (row {bad.index[0] + 1}) is not a date in the file's "
            f"{fmt} layout; fix: correct that row"
        )
    try:
        gpp = raw[GPP].astype(float).replace(MISSING, np.nan)
        qc = raw[QC].astype(float).replace(MISSING, np.nan)
    except ValueError as e:
        raise FluxError(f"{path.name}: {GPP} and {QC} must be numbers ({e}); fix: correct them") from e
    if qc.max() > 1.0 + 1e-9:
        raise FluxError(f"{QC} in {path.name} exceeds 1; expected the fraction of good half-hours (0-1)")
    df = pd.DataFrame({"gpp": gpp.to_numpy(), "qc": qc.to_numpy()}, index=pd.DatetimeIndex(dates, name="date"))
    if df.index.has_duplicates:
        raise FluxError(f"{path.name} has duplicate dates, e.g. {df.index[df.index.duplicated()][0].date()}")
    n = len(df)
    df = df.dropna(subset=["gpp"])
    n_missing = n - len(df)
    low_qc = ~(df["qc"] >= qc_min)  # NaN QC fails too
    df = df[~low_qc]
    n_neg = int((df["gpp"] < 0).sum()) if drop_negative else 0
    if drop_negative:
        df = df[df["gpp"] >= 0]
    df = df.sort_index()
    df.attrs.update({
        "layout": layout, "units": UNITS[layout], "site": path.name.split("_")[1] if "_" in path.name else "",
        "qc_min": qc_min, "dropped_missing": n_missing, "dropped_low_qc": int(low_qc.sum()),
        "dropped_negative": n_neg, "source": path.name,
    })
    return df
