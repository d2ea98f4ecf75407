"""The code blocks of the docs run as written.

docs/decoder-only.md: every `vlmedge` command of its bash blocks and every python block, in order, in a
directory where `path/to/smolvlm` is a tiny SmolVLM-architecture model (tests/families.py) and
`scene.png` a test scene; the first command exports the bundle the others use. docs/explain.md: the same,
where `bundles/shapes-vlm` is the session's export of the built-in model.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def blocks(page: Path) -> list[tuple[str, str]]:
    """(language, code) of every fenced block, in order."""
    return re.findall(r"```(\w+)\n(.*?)```", page.read_text(), flags=re.S)


def commands(code: str) -> list[list[str]]:
    out = []
    for line in code.splitlines():
        line = line.split("  #")[0].strip()
        if line.startswith("vlmedge "):
            out.append(shlex.split(line))
    return out


def run_page(name: str) -> int:
    """Run every `vlmedge` command of a docs page's bash blocks (the installed CLI, in the current
    directory) and every python block, in order; returns how many ran."""
    exe = str(Path(sys.executable).parent / "vlmedge")
    ran = 0
    for lang, code in blocks(DOCS / name):
        if lang == "bash":
            for cmd in commands(code):
                r = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=600)
                assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr[-2000:]}"
                ran += 1
        elif lang == "python":
            exec(compile(code, f"docs/{name}", "exec"), {})
            ran += 1
    return ran


@pytest.mark.slow
def test_decoder_only_page_runs_as_written(tmp_path, monkeypatch):
    from PIL import Image

    from families import smolvlm
    from vlmedge.data.scenes import scenes

    smolvlm(tmp_path / "path" / "to" / "smolvlm")
    Image.fromarray(next(scenes("test", 0, 1)).image).save(tmp_path / "scene.png")
    monkeypatch.chdir(tmp_path)
    assert run_page("decoder-only.md") >= 8


def test_explain_page_runs_as_written(tmp_path, monkeypatch, bundles):
    """docs/explain.md: its commands and its python block, against the session's shapes-vlm bundle."""
    import shutil

    from PIL import Image

    from vlmedge.data.scenes import scenes

    shutil.copytree(bundles["shapes-vlm"][2], tmp_path / "bundles" / "shapes-vlm")
    Image.fromarray(next(scenes("test", 0, 1)).image).save(tmp_path / "scene.png")
    monkeypatch.chdir(tmp_path)
    assert run_page("explain.md") == 4 and (tmp_path / "explain-vqa" / "tokens.png").is_file()
