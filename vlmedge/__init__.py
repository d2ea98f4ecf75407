"""vlmedge: take a vision-language model from PyTorch to ONNX Runtime and TensorRT.

Importing the package is light: heavy libraries (torch, transformers, onnx, tensorrt) load only
in the modules that need them.
"""

from vlmedge.errors import (
    BuildError,
    BundleError,
    ExportError,
    InputError,
    ModelLoadError,
    ValidationError,
    VlmedgeError,
)

__version__ = "0.1.0"
__all__ = [
    "BuildError", "BundleError", "ExportError", "InputError", "ModelLoadError", "ValidationError", "VlmedgeError",
    "__version__",
]
