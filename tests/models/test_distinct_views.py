"""One vision-tower pass per distinct image view: the samples of a batch that share an image (several
questions on it, the blank-image controls) share its tower pass, and each gets what its own pass
gives; towers fed one flattened patch sequence (Qwen2-VL) get every patch."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tests.tiny_models import QUESTION, TINY_FAMILIES, TINY_SPECS, noise_image, tiny_adapter
from workbench.models.distinct_views import distinct_views, spread


@contextlib.contextmanager
def tower_batches(adapter):
    """The leading size of the first tensor of every tower pass (what the tower computed), and
    whether it was a batch of images (not a flattened patch sequence)."""
    seen: list[tuple[int, bool]] = []

    def hook(module, args, kwargs):
        images = args[0] if args else kwargs["pixel_values"]
        seen.append((images.shape[0], images.dim() >= 4))
    handle = adapter.vision_tower().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def test_each_view_is_placed_among_the_distinct_ones_in_order_of_first_appearance():
    views = torch.randn(6, 3, 4, 4)
    views[3], views[4], views[5] = views[1], views[0], views[1]
    first, inverse = distinct_views([views])
    assert first.tolist() == [0, 1, 2] and inverse.tolist() == [0, 1, 2, 1, 0, 1]
    assert torch.equal(views[first][inverse], views)
    assert distinct_views([views[:3]]) is None


def test_views_differing_in_one_value_or_in_another_per_view_tensor_stay_apart():
    views = torch.randn(4, 3, 4, 4)
    views[2], views[3] = views[0], views[0]
    nudged = views.clone()
    nudged[3, 2, 3, 3] = torch.nextafter(views[3, 2, 3, 3], torch.tensor(1.0))
    assert distinct_views([nudged])[1].tolist() == [0, 1, 0, 2]
    masks = torch.ones(4, 2, 2, dtype=torch.bool)
    masks[2, 0, 0] = False  # equal pixels, another patch mask (Idefics3's padded tiles)
    first, inverse = distinct_views([views, masks])
    assert first.tolist() == [0, 1, 2] and inverse.tolist() == [0, 1, 2, 0]


def test_spread_gives_every_view_its_rows_in_a_model_output_and_its_tuples():
    inverse = torch.tensor([0, 1, 0])
    last, pooled = torch.randn(2, 5, 4), torch.randn(2, 4)
    layers = (torch.randn(2, 5, 4), torch.randn(2, 5, 4))
    out = spread(BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=layers), inverse)
    assert torch.equal(out.last_hidden_state, last[[0, 1, 0]]) and torch.equal(out["pooler_output"], pooled[[0, 1, 0]])
    assert all(torch.equal(a, b[[0, 1, 0]]) for a, b in zip(out.hidden_states, layers))
    assert spread(None, inverse) is None and spread(torch.tensor(2.0), inverse).item() == 2.0


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_questions_on_one_image_share_its_tower_pass_and_each_gets_its_own_decoder_inputs(family):
    adapter = tiny_adapter(family)
    size = TINY_SPECS[family].image_size
    make = lambda: [adapter.prepare(noise_image(size, seed=i), q)  # noqa: E731
                    for i in range(2) for q in (QUESTION, "what shape is it ?")]
    alone = [adapter.llm_inputs(item.inputs) for item in make()]
    with tower_batches(adapter) as once:  # each image once
        adapter.decoder_inputs_batch(make()[::2])
    prepared = make()
    with tower_batches(adapter) as twice:  # each image twice
        together = adapter.decoder_inputs_batch(prepared)
    (computed, images), = twice
    assert computed == (once[0][0] if images else 2 * once[0][0]), family
    for i, (mine, own) in enumerate(zip(together, alone)):
        torch.testing.assert_close(mine.inputs_embeds, own.inputs_embeds, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{family} sample {i}: {m}")
        assert torch.equal(mine.position_ids, own.position_ids) and torch.equal(mine.attention_mask, own.attention_mask)
