"""Tiles matched in µm/px to the model, in a Zarr store with level-0 coordinates; the store's schema.

May import: core, slides, tissue.
"""
