"""Reading and writing: stores, catalogs, readers and exports (no torch here; rank 5 in ``tests/test_layers.py``).

* :mod:`~stembed.io.cube`: cube and scene stores (zarr), validated against :mod:`stembed.contract`;
* :mod:`~stembed.io.embeddings`: the embedding store's layout; :mod:`~stembed.io.sinks`: the protocol
  ``stembed embed`` writes through (the zarr store implements it);
* :mod:`~stembed.io.outputs`: who may write an output path (locks, ``--overwrite``);
* :mod:`~stembed.io.stac`: STAC search, the pieces of a period; :mod:`~stembed.io.stac_load`: odc-stac
  loading onto a :class:`~stembed.geometry.GridSpec` and an item's side files;
* :mod:`~stembed.io.worldcereal`, :mod:`~stembed.io.agera5`: readers of the WorldCereal extraction files;
* :mod:`~stembed.io.sites`: the ``--sites`` table and report; :mod:`~stembed.io.sample`: embeddings at
  points; :mod:`~stembed.io.export`: GeoTIFF / netCDF.
"""
