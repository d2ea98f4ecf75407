from dataclasses import replace

import pytest
import torch

from vlmedge.data.tokenizer import build_tokenizer
from vlmedge.models.checkpoint import load_pretrained
from vlmedge.models.shapes_vlm import ShapesVLMConfig
from vlmedge.training.train import TrainOptions, mix_at, train

TINY = TrainOptions(steps=4, batch_size=4, questions_per_scene=2, warmup=2, checkpoint_every=2, threads=1)


def _cfg():
    return ShapesVLMConfig(vocab_size=build_tokenizer().get_vocab_size(), d_model=32, n_heads=2, vision_layers=1, text_layers=1, decoder_layers=1)


class _InterruptAt:
    """Stands in for the progress bar and presses Ctrl-C during step `at`."""

    def __init__(self, at: int):
        self.at, self.done = at, 0

    def add_task(self, *a, completed=0, **k):
        self.done = completed
        return 0

    def update(self, *a, **k):
        if self.done == self.at:
            raise KeyboardInterrupt
        self.done += 1


def test_resumed_training_equals_uninterrupted(tmp_path):
    straight = train(tmp_path / "a", TINY, _cfg())
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", TINY, _cfg(), progress=_InterruptAt(2))  # checkpoint of 2 steps on disk
    resumed = train(tmp_path / "b", TINY, _cfg())
    for (k, v), (_, w) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(v, w), k
    model, tok = load_pretrained(tmp_path / "b" / "model")
    assert model.config == _cfg() and tok.get_vocab_size() == _cfg().vocab_size
    assert len((tmp_path / "a" / "train_log.tsv").read_text().splitlines()) >= 1


def test_training_reduces_the_loss(tmp_path):
    import numpy as np

    from vlmedge.data.scenes import scenes
    from vlmedge.training.batches import make_batch
    from vlmedge.training.train import step_loss

    cfg = _cfg()
    opts = replace(TINY, steps=30, checkpoint_every=100, lr=3e-3)
    b = make_batch(list(scenes("val", 0, 16)), build_tokenizer(), cfg, np.random.default_rng(0), mix_at(opts.steps - 1, opts), 2)
    torch.manual_seed(opts.seed)
    from vlmedge.models.shapes_vlm import ShapesVLM

    untrained = ShapesVLM(cfg).eval()
    trained = train(tmp_path / "c", opts, cfg)
    with torch.no_grad():
        before = sum(step_loss(untrained, b)).item()
        after = sum(step_loss(trained, b)).item()
    assert after < before - 0.5
