"""Embedding cubes from a fusion bundle: one 7-d vector per pixel per valid S2 date."""
