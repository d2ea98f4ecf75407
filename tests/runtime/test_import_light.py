import subprocess
import sys

HEAVY = ("torch", "transformers", "onnx", "onnxscript", "tensorrt", "safetensors", "vlmedge.export", "vlmedge.models.shapes_vlm",
         "matplotlib")


def _heavy_after(code: str) -> list[str]:
    code += f"; import sys; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return eval(out.strip().splitlines()[-1])


def test_runtime_and_package_import_no_heavy_module():
    assert _heavy_after("import vlmedge, vlmedge.runtime, vlmedge.runtime.pipeline, vlmedge.cli") == []


def test_a_full_caption_and_vqa_run_imports_no_heavy_module(bundles):
    path = bundles["shapes-vlm"][2]
    code = (
        "import vlmedge; from vlmedge.data.scenes import scenes; s = next(scenes('test', 0, 1));"
        f"p = vlmedge.load({str(path)!r});"
        "print(p.caption(s.image, num_beams=2)); print(p.vqa(s.image, 'how many small objects are there ?'))"
    )
    assert _heavy_after(code) == []


def test_a_decoder_only_caption_vqa_and_chat_import_no_heavy_module(prefix_bundles):
    path = prefix_bundles("smolvlm")[2]
    code = (
        "import vlmedge; from vlmedge.data.scenes import scenes; s = next(scenes('test', 0, 1));"
        f"p = vlmedge.load({str(path)!r});"
        "print(p.caption(s.image, num_beams=2, max_new_tokens=4)); print(p.vqa(s.image, 'how many circles are there ?'));"
        "print(p.chat([{'role': 'user', 'content': [{'type': 'image', 'image': s.image}, {'type': 'text', 'text': 'hi'}]}]))"
    )
    assert _heavy_after(code) == []
