"""Other tools' model formats, both ways: WSInfer folders in; WSInfer, ONNX and TorchScript out.

May import: core, model, inference.
"""
