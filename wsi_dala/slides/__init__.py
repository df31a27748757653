"""Reading slides (openslide-python or tiffslide; fast tiled-TIFF regions) and writing synthetic ones.

May import: core.
"""
