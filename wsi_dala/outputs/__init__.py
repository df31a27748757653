"""What a run hands to people and tools: the stitched heatmap and tumour layer, OME-NGFF, QuPath GeoJSON.

May import: core, tissue, tiling, explain, model.slide_thresholds (torch-free: the slide call).
"""
