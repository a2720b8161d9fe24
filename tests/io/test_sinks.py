"""The embedding sink (``stembed.io.sinks``): the zarr store is one, it pickles (it travels to dask workers in
every tile job), and writing through it gives the very store the plain functions write."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from stembed.io.embeddings import (
    Quantisation,
    ZarrEmbeddingStore,
    create_store,
    finalise,
    open_embeddings,
    read_attrs,
    write_tile,
)
from stembed.io.sinks import EmbeddingSink

FEATURES = [f"E{i}" for i in range(1, 8)]
TRANSFORM = [400_000.0, 10.0, 0.0, 5_000_160.0, 0.0, -10.0]


def _layout(values: np.ndarray, q: Quantisation) -> dict:
    n_t, _, h, w = values.shape
    return dict(
        time=pd.date_range("2021-05-01", periods=n_t, freq="10D").values,
        y=TRANSFORM[3] - 10.0 * (np.arange(h) + 0.5), x=TRANSFORM[0] + 10.0 * (np.arange(w) + 0.5),
        features=FEATURES, crs="EPSG:32631", transform=TRANSFORM, quant=q, tile_px=8, time_chunk=2,
        attrs={"fingerprint": "test"},
    )


def test_the_zarr_store_is_a_picklable_sink_that_writes_what_the_functions_write(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(3, 7, 16, 12)).astype(np.float32)
    values[1, :, :4, :5] = np.nan
    valid = np.asarray(np.isfinite(values).all(axis=1))
    q = Quantisation.calibrate("int8", values.transpose(0, 2, 3, 1).reshape(-1, 7), margin=0.05)

    sink = ZarrEmbeddingStore(str(tmp_path / "sink.zarr"))
    assert isinstance(sink, EmbeddingSink)
    assert pickle.loads(pickle.dumps(sink)) == sink
    grid = sink.create(**_layout(values, q))
    assert not sink.tiles_done().any() and sink.quantisation().dtype == "int8"
    first = grid.tiles()[0]
    ys, xs = grid.bounds(*first)
    codes = q.encode(values[:, :, ys, xs])
    sink.write_tile(grid, first, codes, valid[:, ys, xs], q.error_stats(values[:, :, ys, xs], codes))
    assert not sink.tiles_done().any()  # written, not yet marked: a resume would write it again
    sink.mark_done(first)
    for tile in grid.tiles()[1:]:
        ys, xs = grid.bounds(*tile)
        codes = q.encode(values[:, :, ys, xs])
        sink.write_tile(grid, tile, codes, valid[:, ys, xs], q.error_stats(values[:, :, ys, xs], codes))
        sink.mark_done(tile)
    summary = sink.finalise()

    plain = tmp_path / "plain.zarr"
    grid = create_store(plain, **_layout(values, q))
    for tile in grid.tiles():
        ys, xs = grid.bounds(*tile)
        codes = q.encode(values[:, :, ys, xs])
        write_tile(plain, grid, tile, codes, valid[:, ys, xs], q.error_stats(values[:, :, ys, xs], codes))
    assert finalise(plain) == summary
    a, b = open_embeddings(sink.path), open_embeddings(plain)
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    stamps = ("created", "finished")  # the clock's
    assert {k: v for k, v in a.attrs.items() if k not in stamps} == {k: v for k, v in b.attrs.items() if k not in stamps}
    assert read_attrs(sink.path)["complete"] is True
    assert not list(tmp_path.glob(".*"))  # the store was created aside and renamed: nothing left beside it
