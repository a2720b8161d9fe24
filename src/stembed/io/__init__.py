"""Reading, validating and storing sensor cubes (no torch here).

:mod:`stembed.io.cube` defines the cube contract every other module relies on;
:mod:`stembed.io.worldcereal` reads the WorldCereal NetCDF patches into that contract.
"""
