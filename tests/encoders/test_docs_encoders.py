"""docs/encoders.md runs as written: every `vlmedge` command of its bash blocks and every python block, in
order, in a directory where `path/to/clip` is a trained CLIP (the built-in shapes-clip's files: a random-weight
model's embeddings barely differ between images, so FP16's rounding flips its top labels and the page's FP16
check would fail by chance), `photos/` holds test scenes and `query.png` is one more; the first command exports
the bundle the others use. (Its `text` blocks, a server and curl, are not run; tests/encoders/test_serving.py
covers them.)"""

import shutil

import pytest
from PIL import Image

from test_docs import run_page

pytest.importorskip("milvus_lite")


@pytest.mark.slow
def test_encoders_page_runs_as_written(tmp_path, monkeypatch):
    from vlmedge.data.scenes import scenes
    from vlmedge.models.checkpoint import BUILTIN_MODELS

    shutil.copytree(BUILTIN_MODELS["shapes-clip"], tmp_path / "path" / "to" / "clip")
    (tmp_path / "photos").mkdir()
    for i, s in enumerate(scenes("test", 400, 5)):
        Image.fromarray(s.image).save(tmp_path / "photos" / f"scene-{i}.png")
    Image.fromarray(next(scenes("test", 500, 1)).image).save(tmp_path / "query.png")
    monkeypatch.chdir(tmp_path)
    assert run_page("encoders.md") == 11
