"""Orchestration: one slide end to end, an archive in batches, the demo, measures against a planted truth.

May import: core, slides, tissue, tiling, model, explain, inference, outputs, interop, training.
"""
