"""Adapter of Hugging Face `Gemma3ForConditionalGeneration` (Gemma 3 4B / 12B / 27B and their fine-tunes):
a SigLIP tower without its head, its patches average-pooled to `mm_tokens_per_image`, RMS-normed and
projected to the language model's width (`Gemma3MultiModalProjector`), and a Gemma 3 LM whose layers
alternate sliding-window and global attention.

Each image's soft tokens attend to each other both ways, everything else causally: the decoder graph
takes `block_ids` (vlmedge.models.prefix), which the runtime writes from the ids ("images": each run of
image tokens a block). In a sliding layer the window applies on top of that (window AND (causal OR
block)), as HF composes it. The graph keeps every layer's whole cache and the mask applies the window,
so a sliding layer stays exact past the window in the prompt and in every step.

The chat template writes `<start_of_image>` for an image; the processor expands it to
"\\n\\n<start_of_image>" + `<image_soft_token>` x mm_tokens_per_image + "<end_of_image>\\n\\n".

Pan and scan: Hugging Face's Gemma3Processor crops an image whose aspect ratio is far from square into
2 to `pan_and_scan_max_num_crops` crops along its long side when a call asks (`do_pan_and_scan=True`),
and writes "Here is the original image " + the image + " and here are some crops to help you see better "
+ each crop, every one its own block of soft tokens. A bundle does the same for every image when the
image processor's config says `do_pan_and_scan: true`; the crop settings come from that config, else
Hugging Face's defaults (256 px, 4 crops, ratio 1.2). The manifest records them
(`preprocessing.processor.pan_and_scan`), and the graphs declare the frames and tokens of an image with
the most crops.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from vlmedge.errors import ModelLoadError
from vlmedge.models.base import Preprocessing
from vlmedge.models.paligemma import _Vision, fixed_preprocessing
from vlmedge.models.prefix import BlockPrefixDecoder, HfPrefixAdapter


def _named_tokens(source: str) -> dict[str, str]:
    """The tokenizer's boi / eoi / image tokens (Gemma 3's processor reads them by name)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    named = {k: getattr(tok, k, None) for k in ("boi_token", "eoi_token", "image_token")}
    return {k: v for k, v in named.items() if isinstance(v, str)}


# Hugging Face's Gemma3Processor: its crop settings where the image processor's config leaves them unset, and
# the text around an image and its crops
PAN_AND_SCAN_DEFAULTS = {"pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
                         "pan_and_scan_min_ratio_to_activate": 1.2}
PAN_AND_SCAN_TEXT = ("Here is the original image ", " and here are some crops to help you see better ")


def pan_and_scan_spec(image_cfg: dict, where: str) -> dict:
    """The manifest's `pan_and_scan`: the image processor's crop settings (Hugging Face's defaults where unset)."""
    got = {k: image_cfg.get(k) if image_cfg.get(k) is not None else v for k, v in PAN_AND_SCAN_DEFAULTS.items()}
    crop, crops, ratio = (got[k] for k in PAN_AND_SCAN_DEFAULTS)
    if not (type(crop) is int and crop >= 1 and type(crops) is int and 2 <= crops <= 64
            and isinstance(ratio, (int, float)) and ratio >= 1):
        raise ModelLoadError(f"{where}: pan and scan needs a minimum crop size >= 1 px, 2 to 64 crops and a ratio >= 1; "
                             f"got {crop!r:.20}, {crops!r:.20}, {ratio!r:.20}")
    return {"min_crop_size": crop, "max_crops": crops, "min_ratio": float(ratio), "intro": PAN_AND_SCAN_TEXT[0],
            "crops_intro": PAN_AND_SCAN_TEXT[1]}


class Gemma3Adapter(HfPrefixAdapter):
    architecture = "Gemma3ForConditionalGeneration"
    family = "gemma3"

    def prompt_rules(self) -> dict:
        return {"blocks": "images"}

    def preprocessing(self, image_cfg: dict, proc_cfg: dict) -> Preprocessing:
        where = f"{self.source}/processor_config.json"
        size = image_cfg.get("size") or {}
        if not (isinstance(size, dict) and isinstance(size.get("height"), int) and isinstance(size.get("width"), int)):
            raise ModelLoadError(f"{where}: Gemma 3's image processor resizes to {{height, width}}; got size {size!r:.60}")
        cfg = self.model.config
        if (size["height"], size["width"]) != (cfg.vision_config.image_size, cfg.vision_config.image_size):
            raise ModelLoadError(f"{where}: images of {size['height']}x{size['width']} px, but the vision tower takes "
                                 f"{cfg.vision_config.image_size} px")
        tokens = int(proc_cfg.get("image_seq_length") or cfg.mm_tokens_per_image)
        named = _named_tokens(self.source)
        boi, eoi, soft = named.get("boi_token", "<start_of_image>"), named.get("eoi_token", "<end_of_image>"), \
            named.get("image_token", "<image_soft_token>")
        spec = {"image_tokens": tokens, "image_token": soft, "prompt_token": boi,
                "image_start": f"\n\n{boi}", "image_end": f"{eoi}\n\n"}
        if image_cfg.get("do_pan_and_scan"):
            spec["pan_and_scan"] = pan_and_scan_spec(image_cfg, where)
        return fixed_preprocessing(image_cfg, size["height"], size["width"], spec, resample="bilinear")

    def vision_encoder(self) -> nn.Module:
        return _Vision(self.model).eval()

    def language_model(self):
        return self.model.model.language_model, self.model.lm_head

    def decoder(self) -> nn.Module:
        text = self.model.config.get_text_config()
        return BlockPrefixDecoder(*self.language_model(), window_over_blocks=True,
                                  softcap=getattr(text, "final_logit_softcapping", None)).eval()

    def pixel_inputs(self, inputs: list) -> dict:
        return {"pixel_values": torch.from_numpy(np.concatenate([img.frames for item in inputs for img in item]))}

    def reference_inputs(self, ids, mask) -> dict:
        """The processor's token_type_ids: 1 at the image's soft tokens."""
        return {"token_type_ids": (ids == int(self.model.config.image_token_id)).long()}
