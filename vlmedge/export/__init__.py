"""Export of models to ONNX bundles."""
