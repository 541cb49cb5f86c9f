"""Every supported family, on a tiny random model of its real class: registry, layout, generation."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from PIL import ImageDraw

from tests.tiny_models import QUESTION, TINY_FAMILIES, TINY_SPECS, noise_image, tiny_adapter, view_kind
from workbench.layout import VisualLayout
from workbench.models.base import Answer
from workbench.models.registry import UnsupportedModel, adapter_class, available_architectures

ADAPTER_FAMILY = {"llava": "llava", "llava_next": "llava_next", "llava_onevision": "llava_onevision",
                  "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl", "idefics3": "idefics3", "smolvlm": "idefics3"}
# Besides each family's own test image: square, tall, wide, and sizes that hit rounding edges
# (Idefics3's short side rounded up to a whole tile, AnyRes fits that need padding on the long side).
EXTRA_SIZES = [(64, 64), (37, 91), (150, 40), (65, 64), (33, 100)]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_registry_resolves_the_architecture(family):
    adapter = tiny_adapter(family)
    architecture = type(adapter.model).__name__
    assert architecture in type(adapter).architectures
    assert adapter_class(architecture) is type(adapter)
    assert adapter.family == ADAPTER_FAMILY[family]


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedModel) as error:
        adapter_class("BlipForConditionalGeneration")
    for architecture in available_architectures():
        assert architecture in str(error.value)


def _check_layout(layout: VisualLayout, placeholders: np.ndarray, size: tuple[int, int]) -> None:
    width, height = size
    separators_in_run = np.intersect1d(layout.separators, placeholders)
    assert layout.n_tokens == len(placeholders) - len(separators_in_run)
    # Tokens are exactly the placeholders that are not separators, in sequence order.
    np.testing.assert_array_equal(layout.positions, np.setdiff1d(placeholders, separators_in_run))
    assert layout.sequence_length > layout.positions.max()
    for g, group in enumerate(layout.groups):
        cells = layout.cell[layout.group == g]
        assert len(cells) == group.rows * group.cols  # VisualLayout checks it too; here with the cells:
        assert (cells >= 0).all() and (cells < [group.rows, group.cols]).all()
        assert len(np.unique(cells, axis=0)) == len(cells), f"{group.name}: a cell holds two tokens"
    boxes = layout.boxes
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    # Each group's boxes tile its view without overlap or gap where the model does not pool
    # (overlapping pooled tokens excepted): at least, no box is empty in every group.
    for g, group in enumerate(layout.groups):
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[layout.group == g]
        assert (area > 0).any(), f"{group.name}: every box is empty"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_layout_matches_the_placeholders(family):
    adapter = tiny_adapter(family)
    for size in [TINY_SPECS[family].image_size, *EXTRA_SIZES]:
        prepared = adapter.prepare(noise_image(size), QUESTION)
        placeholders = adapter.image_token_positions(prepared.inputs).numpy()
        try:
            _check_layout(prepared.layout, placeholders, size)
        except AssertionError as error:
            raise AssertionError(f"{family} at {size}: {error}") from error


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a_prompt_on_another_image_of_its_size_is_what_the_processor_makes_of_them(family):
    """``with_image_of``: a prepared prompt given another processed image of the same size (made
    for another question) has the processor's tensors and layout for that prompt on that image, at
    every size tried: the text tensors and the layout depend on the image's size alone."""
    adapter = tiny_adapter(family)
    for size in [TINY_SPECS[family].image_size, *EXTRA_SIZES]:
        mine, other = adapter.prepare(noise_image(size, seed=1), QUESTION), adapter.prepare(noise_image(size, seed=2), "why ?")
        swapped, fresh = adapter.with_image_of(mine, other), adapter.prepare(noise_image(size, seed=2), QUESTION)
        assert sorted(swapped.inputs) == sorted(fresh.inputs), (family, size)
        for name, tensor in fresh.inputs.items():
            assert torch.equal(swapped.inputs[name], tensor), (family, size, name)
        assert swapped.layout.n_tokens == fresh.layout.n_tokens and swapped.prompt == fresh.prompt
        assert np.array_equal(swapped.layout.positions, fresh.layout.positions), (family, size)
    with pytest.raises(ValueError, match="same size"):
        adapter.with_image_of(mine, adapter.prepare(noise_image((40, 90)), QUESTION))


@contextlib.contextmanager
def position_independent_tower(adapter):
    """Zero every vision layer's attention output projection, so that no token sees another (the
    per-token MLPs, norms and position embeddings stay); restored on exit, the model being shared."""
    saved = []
    for i in range(len(adapter.vision_layers())):
        attention = adapter.vision_attention(i)
        projection = next(getattr(attention, name) for name in ("out_proj", "proj", "o_proj")
                          if hasattr(attention, name))
        saved.append((projection, [p.detach().clone() for p in projection.parameters()]))
    try:
        with torch.no_grad():
            for projection, _ in saved:
                for p in projection.parameters():
                    p.zero_()
        yield
    finally:
        with torch.no_grad():
            for projection, originals in saved:
                for p, original in zip(projection.parameters(), originals):
                    p.copy_(original)


def _safe_edges(edges: np.ndarray, margins: np.ndarray, limit: int) -> np.ndarray:
    """Integer coordinates in (0, limit) at least each token's margin away from each of its edges."""
    coords = np.arange(1, limit)
    distance_ok = np.abs(coords[:, None] - edges[None, :]) >= margins[None, :]
    return coords[distance_ok.all(1)]


def _intervals(safe: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Disjoint (start, end) pairs of safe coordinates across [0, limit), each at least a tenth of
    the image long, a sixth apart."""
    out, at = [], 0
    while True:
        starts = safe[safe >= at]
        if not len(starts):
            return out
        ends = safe[safe >= starts[0] + max(2, limit // 10)]
        if not len(ends):
            return out
        out.append((int(starts[0]), int(ends[0])))
        at = ends[0] + max(2, limit // 6)


def paint_boxes(layout: VisualLayout, blur_px: dict[str, tuple[float, float]]) -> list[tuple[int, int, int, int]]:
    """Disjoint boxes, in a checkerboard over the image, whose every edge is further from every
    token edge, in every view, than resampling blurs (``blur_px`` per view kind): painting them
    then changes a token's pixels fully or not at all, so the tokens that change must be exactly
    those whose boxes overlap a painted one. Many boxes at once check many token edges in one pass."""
    width, height = layout.image_sizes[0]
    margins = np.array([blur_px[view_kind(layout.groups[g].name)] for g in layout.group])  # [N, 2] (x, y)
    xs = _intervals(_safe_edges(layout.boxes[:, [0, 2]].ravel(), np.repeat(margins[:, 0], 2), width), width)
    ys = _intervals(_safe_edges(layout.boxes[:, [1, 3]].ravel(), np.repeat(margins[:, 1], 2), height), height)
    assert xs and ys, f"no box edges clear of every token edge by {blur_px}"
    return [(x0, y0, x1, y1) for i, (x0, x1) in enumerate(xs) for j, (y0, y1) in enumerate(ys) if (i + j) % 2 == 0]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_painting_boxes_changes_exactly_the_tokens_over_them(family):
    adapter, spec = tiny_adapter(family), TINY_SPECS[family]
    image = noise_image(spec.image_size)
    before = adapter.prepare(image, QUESTION)
    boxes = paint_boxes(before.layout, spec.blur_px)
    painted = image.copy()
    for x0, y0, x1, y1 in boxes:
        ImageDraw.Draw(painted).rectangle([x0, y0, x1 - 1, y1 - 1], fill=(255, 0, 255))  # PIL's ends are inclusive
    after = adapter.prepare(painted, QUESTION)
    np.testing.assert_array_equal(after.layout.positions, before.layout.positions)

    with position_independent_tower(adapter):
        rows = before.layout.positions
        change = (adapter.llm_input_embeddings(after.inputs)[0, rows]
                  - adapter.llm_input_embeddings(before.inputs)[0, rows]).abs().amax(-1).numpy()
    expected = before.layout.overlapping_any(boxes)
    assert expected.any() and not expected.all(), f"boxes {boxes} should cover some tokens, not all"
    assert change[expected].min() > 1e-3, f"boxes {boxes}: some tokens over them did not change"
    changed = change > 1e-5  # untouched tokens are bit-identical; touched ones move by ~0.1
    wrong = np.flatnonzero(changed != expected)
    layout = before.layout
    assert not len(wrong), (
        f"boxes {boxes}: tokens {wrong.tolist()} ({[layout.groups[layout.group[i]].name for i in wrong]}) "
        f"changed={changed[wrong].tolist()} with boxes {layout.boxes[wrong].round(1).tolist()}")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_answer_runs_generate(family):
    adapter = tiny_adapter(family)
    images = [noise_image(TINY_SPECS[family].image_size), noise_image((40, 100), seed=1)]
    questions = [QUESTION, "how many objects are there ?"]
    answer = adapter.answer(images[1], questions[1], max_new_tokens=3)
    assert isinstance(answer, Answer)
    assert math.isfinite(answer.logprob) and answer.logprob <= 0
    assert len(answer.token_ids) <= 3
    # In a batch the two images make prompts of different lengths (left padding): same answer.
    batched = adapter.answer_batch(images, questions, max_new_tokens=3)[1]
    assert batched.token_ids == answer.token_ids
    assert batched.logprob == pytest.approx(answer.logprob, abs=1e-3)
