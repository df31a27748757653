"""Scoring a tile store through Dask: engines (torch, ONNX Runtime, OpenVINO), streaming, TTA, the cluster connection.

May import: core, tissue, tiling, model, explain.
"""
