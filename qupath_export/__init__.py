"""QuPath GeoJSON export and import: plain arrays and polygons in, files QuPath reads out.

This package imports nothing from ``wsi_dala``, so it stays a small library of its own.
"""
