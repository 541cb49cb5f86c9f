"""A few training steps: the recipe runs, saves a loadable model, and is reproducible by seed."""

import json

import numpy as np
import torch
from safetensors.torch import load_file

from workbench.models.loading import load
from workbench.scenes import make_scene
from workbench.shapes_model.card import write_model_card
from workbench.shapes_model.train import TrainConfig, patch_targets, train

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
    assert json.loads((tmp_path / "a" / "train_config.json").read_text())["steps"] == 4
