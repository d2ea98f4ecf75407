"""`vlmedge inspect` prints what the manifest holds, shapes included (rich must not eat them as markup)."""

from pathlib import Path

from vlmedge.cli import main


def test_inspect_shows_every_shape_as_written(bundles, capsys):
    assert main(["inspect", str(bundles["shapes-vlm"][2])]) == 0
    out = capsys.readouterr().out
    assert "[batch, 3, 64, 64]" in out  # pixel_values
    assert "[batch, 4, past_len, 32]" in out  # past.0.self.key


def test_inspect_shows_the_weights_stored_more_than_once(bundles, capsys):
    from vlmedge.export.inspect import weight_report
    from vlmedge.runtime.bundle import load_bundle

    # a bundle of vlmedge 0.1: decoder_init and decoder_step each hold the decoder's weights
    old = Path(__file__).parents[1] / "data" / "legacy-vit-gpt2"
    report = weight_report(load_bundle(old))
    init, step = report["graphs"]["decoder_init"], report["graphs"]["decoder_step"]
    assert init["shared_bytes"] > 0.5 * step["weight_bytes"]
    assert report["stored_bytes"] - report["unique_bytes"] == sum(b for _, _, b in report["shared"]) > 0
    assert any(set(gs) >= {"decoder_init", "decoder_step"} for gs, _, _ in report["shared"])
    assert main(["inspect", str(old)]) == 0
    out = capsys.readouterr().out
    assert "weights by graph" in out and "stored more than once (" in out
    # today's bundles store each weight once
    report = weight_report(load_bundle(bundles["shapes-vlm"][2]))
    assert report["stored_bytes"] == report["unique_bytes"] and not report["shared"]
