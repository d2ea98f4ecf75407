"""`vlmedge inspect` prints what the manifest holds, shapes included (rich must not eat them as markup)."""

from vlmedge.cli import main


def test_inspect_shows_every_shape_as_written(bundles, capsys):
    assert main(["inspect", str(bundles["shapes-vlm"][2])]) == 0
    out = capsys.readouterr().out
    assert "[batch, 3, 64, 64]" in out  # pixel_values
    assert "[batch, 4, past_len, 32]" in out  # past.0.self.key
