"""The browser viewer (``wsi-dala view``): a read-only local web app over finished runs: the slide as Deep Zoom
tiles, the heatmap layers as overlays, the tumour regions, and a tile's measurements on a click.

May import: core, slides, tiling, outputs.
"""
