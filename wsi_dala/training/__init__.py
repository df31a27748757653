"""Training and evaluation: data sources, patient/slide-level splits, the training loop, losses, metrics.

May import: core, slides, tissue, tiling, model, explain, inference.features (slide tiles' encoder features).
"""
