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


def load(bundle, device: str = "cpu", **options):
    """Open a bundle (or a built-in model's name) for captioning and VQA (vlmedge.runtime.pipeline), or a
    dual-encoder bundle (CLIP, SigLIP) for embeddings and zero-shot classification (vlmedge.runtime.embedding), or a
    fusion bundle (ViLT, BridgeTower) for answers and image-text matching (vlmedge.runtime.fusion)."""
    from vlmedge.runtime.embedding import is_dual_encoder

    if is_dual_encoder(bundle):
        from vlmedge.runtime.bundle import load_bundle
        from vlmedge.runtime.embedding import EmbeddingPipeline

        return EmbeddingPipeline(load_bundle(bundle), device, **options)
    from vlmedge.runtime.fusion import is_fusion

    if is_fusion(bundle):  # ViLT / BridgeTower: vqa over an answer vocabulary, image-text matching
        from vlmedge.runtime.bundle import load_bundle
        from vlmedge.runtime.fusion import FusionPipeline

        return FusionPipeline(load_bundle(bundle), device, **options)
    from vlmedge.runtime.pipeline import load as _load

    return _load(bundle, device, **options)


__all__ = [
    "BuildError", "BundleError", "ExportError", "InputError", "ModelLoadError", "ValidationError", "VlmedgeError",
    "__version__", "load",
]
