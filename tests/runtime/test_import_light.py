import subprocess
import sys

HEAVY = ("torch", "transformers", "onnx", "onnxscript", "tensorrt", "safetensors")


def test_runtime_and_package_import_no_heavy_module():
    code = (
        "import sys, vlmedge, vlmedge.runtime, vlmedge.runtime.preprocess, vlmedge.cli;"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
