"""Which adapter serves a model: by built-in name, or by the architecture in a directory's config.json."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from vlmedge.errors import ModelLoadError, first_line, read_json
from vlmedge.models.base import Adapter
from vlmedge.models.checkpoint import BUILTIN_MODELS, HF_BUILTINS


def _shapes(src: str, prompt: str | None = None) -> Adapter:
    from vlmedge.models.shapes import ShapesAdapter

    if prompt:
        raise ModelLoadError(f"{src}: the reference model takes no caption prompt")
    return ShapesAdapter(src)


def _blip_caption(src: str, prompt: str | None = None) -> Adapter:
    from vlmedge.models.blip import BlipCaptionAdapter

    return BlipCaptionAdapter(src, prompt)


def _blip_vqa(src: str, prompt: str | None = None) -> Adapter:
    from vlmedge.models.blip import BlipVqaAdapter

    return BlipVqaAdapter(src, prompt)


def _ved(src: str, prompt: str | None = None) -> Adapter:
    from vlmedge.models.vision_encoder_decoder import VisionEncoderDecoderAdapter

    return VisionEncoderDecoderAdapter(src, prompt)


def _florence2(src: str, prompt: str | None = None) -> Adapter:
    from vlmedge.models.florence2 import Florence2Adapter

    return Florence2Adapter(src, prompt)


def _llava(src: str, prompt: str | None = None) -> Adapter:
    from vlmedge.models.llava import LlavaAdapter

    return LlavaAdapter(src, prompt)


def _llava_onevision(src: str, prompt: str | None = None) -> Adapter:
    from vlmedge.models.llava_onevision import LlavaOnevisionAdapter

    return LlavaOnevisionAdapter(src, prompt)


def _idefics3(src: str, prompt: str | None = None) -> Adapter:
    from vlmedge.models.idefics3 import Idefics3Adapter

    return Idefics3Adapter(src, prompt)


def _smolvlm(src: str, prompt: str | None = None) -> Adapter:
    from vlmedge.models.idefics3 import SmolVLMAdapter

    return SmolVLMAdapter(src, prompt)


def _dual_encoder(src: str, prompt: str | None = None) -> Adapter:
    from vlmedge.models.dual_encoder import DualEncoderAdapter

    return DualEncoderAdapter(src, prompt)


def _fusion(src: str, prompt: str | None = None) -> Adapter:
    from vlmedge.models.fusion import FusionAdapter

    return FusionAdapter(src, prompt)


def _paligemma(src: str, prompt: str | None = None) -> Adapter:
    from vlmedge.models.paligemma import PaliGemmaAdapter

    return PaliGemmaAdapter(src, prompt)


def _gemma3(src: str, prompt: str | None = None) -> Adapter:
    from vlmedge.models.gemma3 import Gemma3Adapter

    return Gemma3Adapter(src, prompt)


def _qwen2_vl(src: str, prompt: str | None = None) -> Adapter:
    from vlmedge.models.qwen2_vl import Qwen2VLAdapter

    return Qwen2VLAdapter(src, prompt)


def _qwen2_5_vl(src: str, prompt: str | None = None) -> Adapter:
    from vlmedge.models.qwen2_vl import Qwen2_5_VLAdapter

    return Qwen2_5_VLAdapter(src, prompt)


def _blip2(src: str, prompt: str | None = None) -> Adapter:
    from vlmedge.models.blip2_t5 import Blip2T5Adapter, is_t5

    if is_t5(src):  # Flan-T5: the cross-attention contract (models.blip2_t5)
        return Blip2T5Adapter(src, prompt)
    from vlmedge.models.blip2 import Blip2Adapter

    return Blip2Adapter(src, prompt)


def _instructblip(src: str, prompt: str | None = None) -> Adapter:
    from vlmedge.models.blip2_t5 import InstructBlipT5Adapter, is_t5

    if is_t5(src):
        return InstructBlipT5Adapter(src, prompt)
    from vlmedge.models.blip2 import InstructBlipAdapter

    return InstructBlipAdapter(src, prompt)


def _idefics(src: str, prompt: str | None = None) -> Adapter:
    from vlmedge.models.idefics import IdeficsAdapter

    return IdeficsAdapter(src, prompt)


# architecture (config.json "architectures"[0], or model_type for the reference model) -> adapter
ARCHITECTURES: dict[str, Callable[..., Adapter]] = {
    "ShapesVLM": _shapes,
    "BlipForConditionalGeneration": _blip_caption,
    "BlipForQuestionAnswering": _blip_vqa,
    "VisionEncoderDecoderModel": _ved,
    "Florence2ForConditionalGeneration": _florence2,
    "LlavaForConditionalGeneration": _llava,
    "LlavaOnevisionForConditionalGeneration": _llava_onevision,
    "Idefics3ForConditionalGeneration": _idefics3,
    "SmolVLMForConditionalGeneration": _smolvlm,
    "PaliGemmaForConditionalGeneration": _paligemma,
    "Gemma3ForConditionalGeneration": _gemma3,
    "Qwen2VLForConditionalGeneration": _qwen2_vl,
    "Qwen2_5_VLForConditionalGeneration": _qwen2_5_vl,
    "Blip2ForConditionalGeneration": _blip2,  # OPT: the prefix contract (models.blip2); Flan-T5: models.blip2_t5
    "InstructBlipForConditionalGeneration": _instructblip,
    "IdeficsForVisionText2Text": _idefics,  # gated cross-attention on the prefix contract (models.idefics)
    "CLIPModel": _dual_encoder,  # the dual-encoder contract (models.dual_encoder)
    "SiglipModel": _dual_encoder,
    "Siglip2Model": _dual_encoder,
    "ViltForQuestionAnswering": _fusion,  # the fusion contract (models.fusion)
    "ViltForImageAndTextRetrieval": _fusion,
    "BridgeTowerForImageAndTextRetrieval": _fusion,
    "BridgeTowerForContrastiveLearning": _fusion,
}


def supported() -> str:
    return ", ".join(list(BUILTIN_MODELS) + list(ARCHITECTURES))


def architecture_of(path: Path) -> str:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{path}: no config.json, so not a model directory (supported: {supported()})")
    cfg = read_json(cfg_path, ModelLoadError)
    if cfg.get("model_type") == "shapes-vlm":
        return "ShapesVLM"
    archs = cfg.get("architectures") or []
    if cfg.get("auto_map") and not (archs and archs[0] in ARCHITECTURES):
        raise ModelLoadError(f"{cfg_path}: {archs[0] if archs else cfg.get('model_type', 'this model')} runs remote code "
                             f"(auto_map), which vlmedge does not execute or export (supported: {supported()})")
    if not archs and cfg.get("model_type") == "vision-encoder-decoder":
        return "VisionEncoderDecoderModel"
    if not archs:
        raise ModelLoadError(f"{cfg_path}: names no architecture (supported: {supported()})")
    return archs[0]


def load_adapter(source: str, prompt: str | None = None) -> Adapter:
    """The adapter for a built-in name, a model directory or (network permitting) a hub id."""
    if source in HF_BUILTINS:  # a built-in saved as a Hugging Face directory
        return ARCHITECTURES[HF_BUILTINS[source]](str(BUILTIN_MODELS[source]), prompt)
    if source in BUILTIN_MODELS:
        return _shapes(source, prompt)
    path = Path(source)
    if path.is_dir():
        arch = architecture_of(path)
        if arch not in ARCHITECTURES:
            raise ModelLoadError(f"{path}: architecture {arch} is not supported (supported: {supported()})")
        return ARCHITECTURES[arch](str(path), prompt)
    if path.exists():
        raise ModelLoadError(f"{source}: expected a model directory, not a file")
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return _from_hub(source, prompt)
    raise ModelLoadError(f"{source}: no such model (supported: {supported()}, a model directory, or a hub id)")


def _from_hub(repo_id: str, prompt: str | None) -> Adapter:
    """Download a hub model's files into the local cache, then load it like a directory."""
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except Exception as e:
        raise ModelLoadError(f"{repo_id}: not a built-in name or local directory, and the hub could not provide it ({first_line(e)})") from None
    return load_adapter(local, prompt)
