"""The training losses equal those of the model's full forward, gradients included."""

import numpy as np
import torch

from workbench.scenes import QUESTION_TYPES, ask, make_scene
from workbench.shapes_model.build import build_model, build_processor
from workbench.shapes_model.losses import answer_positions, full_forward_losses, training_losses
from workbench.shapes_model.train import BatchMaker, TrainConfig


def scenes_with_questions(counts):
    rng = np.random.default_rng(0)
    for n in counts:
        scene = make_scene(rng, 3)
        questions = [q for t in QUESTION_TYPES if (q := ask(scene.objects, t, rng)) is not None][:n]
        assert len(questions) == n
        yield scene, questions


def gradients(model, losses):
    model.zero_grad(set_to_none=True)
    answer, visual = losses
    (answer + visual.square().mean()).backward()  # the visual tokens carry the auxiliary loss's gradient
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_training_losses_match_the_full_forward():
    processor = build_processor()
    model = build_model(processor, seed=3).train()
    maker = BatchMaker(processor, TrainConfig())
    # Different question counts per image: sequences of different lengths, right padding, ragged answers.
    scenes, questions = zip(*scenes_with_questions([1, 3, 2]))
    batch = maker.collate(scenes, [maker.sequence(qs) for qs in questions])
    assert batch.attention_mask.sum(1).unique().numel() == 3
    reference, trimmed = full_forward_losses(model, batch), training_losses(model, batch)
    torch.testing.assert_close(trimmed[0], reference[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trimmed[1], reference[1])
    expected, got = gradients(model, reference), gradients(model, trimmed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_answer_positions_are_the_positions_before_each_answer_token():
    labels = torch.tensor([[-100, -100, 7, 8, -100, 9], [-100, 5, -100, -100, -100, -100]])
    positions, real = answer_positions(labels)
    assert positions[real].tolist() == [1, 2, 4, 0]
    assert real.tolist() == [[True, True, True], [True, False, False]]
