"""docs/serving.md: its python blocks run as written against a real `vlmedge serve` (the page's
address, bundle path and image swapped for the test's own)."""

import re
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")
from serving_helpers import serve  # noqa: E402

PAGE = Path(__file__).resolve().parents[2] / "docs" / "serving.md"


def test_serving_page_python_blocks_run(shapes, scene_pngs, tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) == 2
    (tmp_path / "scene.png").write_bytes(scene_pngs[0][1])
    monkeypatch.chdir(tmp_path)
    with serve(shapes, "--threads", "1", tmp=tmp_path) as s:
        for code in blocks:
            code = code.replace("http://127.0.0.1:8000", s.url).replace("bundles/shapes-vlm", str(shapes))
            exec(compile(code, str(PAGE), "exec"), {})
    out = capsys.readouterr().out
    assert out.count(scene_pngs[0][0].caption) >= 2  # streamed over HTTP, then in process
