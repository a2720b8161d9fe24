"""Helpers for tests and benchmarks; production code never imports this package (``tests/test_layers.py``).

* :mod:`~stembed.testing.bundles`: random (untrained, seeded) fusion and gap-fill bundles (torch, imported
  inside the function);
* :mod:`~stembed.testing.sensors`: a toy companion sensor plugin;
* :mod:`~stembed.testing.stac`: an offline STAC API built from the real WorldCereal patch (catalog writer +
  HTTP server);
* :mod:`~stembed.testing.stores`: a stand-in embedding store writer.

The synthetic scene re-exported here lives in :mod:`stembed.data.synthetic` (the ``synthetic`` data source).
Every submodule imports its heavy dependencies (torch, pystac, rasterio, http.server) inside the functions that
use them, so ``import stembed.testing`` stays light and torch-free.
"""

from stembed.data.synthetic import LAND_COVER, synthetic_scene
from stembed.testing.bundles import random_fusion_bundle
from stembed.testing.sensors import TOY_SENSOR, toy_sensor_plugin
from stembed.testing.stac import S2_ASSETS_10M, S2_ASSETS_20M, StacTestServer, worldcereal_stac_catalog
from stembed.testing.stores import write_embedding_store, write_embedding_store_at

__all__ = [
    "LAND_COVER",
    "S2_ASSETS_10M",
    "S2_ASSETS_20M",
    "TOY_SENSOR",
    "StacTestServer",
    "random_fusion_bundle",
    "synthetic_scene",
    "toy_sensor_plugin",
    "worldcereal_stac_catalog",
    "write_embedding_store",
    "write_embedding_store_at",
]
