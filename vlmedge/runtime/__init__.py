"""The torch-free runtime: numpy, Pillow, tokenizers and onnxruntime only."""
