"""A few training steps: the recipe runs, saves a loadable model, and is reproducible by seed."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from workbench.cli import main
from workbench.models.loading import load
from workbench.scenes import make_scene
from workbench.shapes_model.card import write_model_card
from workbench.shapes_model.train import TrainConfig, TrainConfigError, patch_targets, train

TINY = TrainConfig(steps=4, batch_size=2, questions_per_image=2, eval_every=2, eval_scenes=12, warmup_steps=2)


def test_patch_targets_follow_the_label_mask():
    scene = make_scene(np.random.default_rng(0), 3)
    targets = patch_targets(scene)
    assert targets.shape == (144, 5)
    for k, obj in enumerate(scene.objects, start=1):
        x0, y0, x1, y1 = obj.box
        centre = ((y0 + y1) // 2 // 8) * 12 + (x0 + x1) // 2 // 8
        if scene.labels[(y0 + y1) // 2, (x0 + x1) // 2] == k:
            assert targets[centre, 2] > 0  # the object's own patch carries its size label
    assert (targets[scene.labels.reshape(12, 8, 12, 8).max(axis=(1, 3)).ravel() == 0] == 0).all()


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "steps must be >= 1"), ({"eval_every": 0}, "eval_every must be >= 1"),
    ({"lr": -1.0}, "lr must be > 0"), ({"decay_start": 1.5}, "decay_start"),
    ({"max_objects": 1}, "max_objects must be in 2..9"), ({"max_objects": 10}, "max_objects must be in 2..9"),
    ({"aux_targets": ("colour", "bogus")}, "unknown auxiliary targets ['bogus']"),
])
def test_a_bad_training_config_is_one_clear_error(change, message):
    with pytest.raises(TrainConfigError, match=re.escape(message)):
        replace(TINY, **change)


def test_train_shapes_reports_a_bad_option_in_one_line(tmp_path, capsys):
    assert main(["train-shapes", "--steps", "0", "--out", str(tmp_path / "m")]) != 0
    assert "steps must be >= 1" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_training_runs_saves_and_reproduces(tmp_path):
    curve_a = train(TINY, tmp_path / "a", progress=False)
    train(TINY, tmp_path / "b", progress=False)
    assert [c["step"] for c in curve_a] == [2, 4]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("heads" in k for k in a)  # the auxiliary heads are not part of the shipped model
    adapter = load(str(tmp_path / "a"))
    image = make_scene(np.random.default_rng(1), 2).image
    answer = adapter.answer(image, "what colour is the circle ?")
    assert np.isfinite(answer.logprob)
    card = write_model_card(tmp_path / "a").read_text()
    assert "| 4 |" in card and (tmp_path / "a" / "training_curve.png").is_file()
    card = write_model_card(tmp_path / "a", "## Measured\n\nfigures\n").read_text()
    rewritten = write_model_card(tmp_path / "a", card[card.index("## Measured"):]).read_text()
    assert rewritten == card and card.endswith("figures\n")  # a card rewritten from its own text stays the same
    assert json.loads((tmp_path / "a" / "train_config.json").read_text())["steps"] == 4
