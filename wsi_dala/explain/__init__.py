"""DT Grad-CAM: the maps, the dynamic threshold, the border profile, per-tile figures.

May import: core, model.
"""
