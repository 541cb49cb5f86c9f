"""One vision-tower pass per distinct image view: the samples of a batch that share an image (several
questions on it, the blank-image controls) share its tower pass, and each gets what its own pass
gives; towers fed one flattened patch sequence (Qwen2-VL) get every patch."""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tests.tiny_models import QUESTION, TINY_FAMILIES, TINY_SPECS, noise_image, tiny_adapter
from workbench.models.distinct_views import ViewSharing, spread, view_groups


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
    first, inverse = view_groups([views])
    assert first.tolist() == [0, 1, 2] and inverse.tolist() == [0, 1, 2, 1, 0, 1]
    assert torch.equal(views[first][inverse], views)
    assert view_groups([views[:3]]) is None


def test_views_differing_in_one_value_or_in_another_per_view_tensor_stay_apart():
    views = torch.randn(4, 3, 4, 4)
    views[2], views[3] = views[0], views[0]
    nudged = views.clone()
    nudged[3, 2, 3, 3] = torch.nextafter(views[3, 2, 3, 3], torch.tensor(1.0))
    assert view_groups([nudged])[1].tolist() == [0, 1, 0, 2]
    masks = torch.ones(4, 2, 2, dtype=torch.bool)
    masks[2, 0, 0] = False  # equal pixels, another patch mask (Idefics3's padded tiles)
    first, inverse = view_groups([views, masks])
    assert first.tolist() == [0, 1, 2] and inverse.tolist() == [0, 1, 2, 0]


def test_spread_gives_every_view_its_rows_in_a_model_output_and_its_tuples():
    inverse = torch.tensor([0, 1, 0])
    last, pooled = torch.randn(2, 5, 4), torch.randn(2, 4)
    layers = (torch.randn(2, 5, 4), torch.randn(2, 5, 4))
    out = spread(BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=layers), inverse)
    assert torch.equal(out.last_hidden_state, last[[0, 1, 0]]) and torch.equal(out["pooler_output"], pooled[[0, 1, 0]])
    assert all(torch.equal(a, b[[0, 1, 0]]) for a, b in zip(out.hidden_states, layers))
    assert spread(None, inverse) is None and spread(torch.tensor(2.0), inverse).item() == 2.0
    pair = collections.namedtuple("Pair", "states pooled")(last, pooled)
    spread_pair = spread(pair, inverse)
    assert type(spread_pair) is type(pair) and torch.equal(spread_pair.pooled, pooled[[0, 1, 0]])


class _Tower(torch.nn.Module):
    """A stand-in tower: each view's output depends on its pixels and its patch mask; it counts the
    views it computes and can be told to fail."""

    def __init__(self):
        super().__init__()
        self.computed, self.fail = [], False

    def forward(self, pixel_values, patch_attention_mask=None):
        self.computed.append(pixel_values.shape[0])
        if self.fail:
            raise RuntimeError("tower failed")
        out = pixel_values.flatten(1).sum(1) + patch_attention_mask.flatten(1).sum(1)
        return out, (out * 2,)


def _views():
    pixels = torch.randn(4, 3, 2, 2)
    pixels[2], pixels[3] = pixels[0], pixels[0]
    masks = torch.ones(4, 2, 2, dtype=torch.bool)
    masks[3, 0, 0] = False  # view 3: view 0's pixels under another mask
    return pixels, masks


def test_a_tower_pass_in_the_context_computes_each_distinct_view_once_and_gives_every_view_its_own():
    tower, (pixels, masks) = _Tower(), _views()
    own = tower(pixels, patch_attention_mask=masks)
    sharing = ViewSharing(tower)
    with sharing.active(), sharing.active():  # entered again inside: one deduplication, not two
        shared = tower(pixels, patch_attention_mask=masks)
    assert tower.computed == [4, 3]  # views 0 and 2 alike; 3 differs from 0 by its mask alone
    assert torch.equal(shared[0], own[0]) and torch.equal(shared[1][0], own[1][0])
    assert not tower._forward_pre_hooks and not tower._forward_hooks and sharing.inverse is None


def test_a_failing_tower_pass_leaves_no_hook_nor_sharing_behind():
    tower, (pixels, masks) = _Tower(), _views()
    sharing = ViewSharing(tower)
    tower.fail = True
    with pytest.raises(RuntimeError, match="tower failed"), sharing.active():
        tower(pixels, patch_attention_mask=masks)
    assert not tower._forward_pre_hooks and not tower._forward_hooks and sharing.inverse is None and not sharing.depth
    tower.fail = False
    assert sharing.spread(torch.arange(2)).tolist() == [0, 1]  # outside a pass nothing is spread


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
