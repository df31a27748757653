"""What is on the glass: tissue, marker ink and folds, per-tile quality control, stain measurement. numpy only.

May import: core.
"""
