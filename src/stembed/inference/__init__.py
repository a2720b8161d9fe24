"""Embedding cubes from a fusion bundle: one vector per pixel per valid S2 date.

``engine`` embeds a block, ``reference`` a whole cube per patch (the oracle), ``daily`` fills the days between
dates; ``stembed embed`` is :func:`stembed.inference.run.embed_cube`, its parts split by role: ``plan``, ``claim``,
``blocks``, ``workers``, ``progress``.
"""
