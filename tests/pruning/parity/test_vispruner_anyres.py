"""VisPruner parity on multi-crop (AnyRes) layouts: the official per-view rule against ``select`` on the
tiny LLaVA-NeXT at three image shapes.

Official code: Theia-4869/VisPruner (HEAD), llava/model/llava_arch.py
- lines 141-185 (``encode_images``), on the concatenated views (line 202, the base image then the
  crops): per view the head-mean [CLS] row of ``attentions[-2]`` and the patch features of
  ``hidden_states[-2]`` (clip_encoder.py lines 36-43), ``int(T * 0.5)`` important tokens by
  ``argsort(descending=True)``, the rest de-duplicated in rounds of ``min(8, R - T_div)`` (lines
  159-176; A of ``ceil(R / 2)`` as in test_vispruner.py), the same T for every view;
- lines 209-212: ``mm_patch_merge_type.replace('_unpad', '')``: the crops are stitched without unpadding
  or newlines (lines 243-248), so every chosen crop patch reaches the code's LLM. The model's own layout
  is unpadded: a chosen patch in the padding has no token here, and the comparison covers the tokens
  the layout has (the reference's patches mapped by the code's ``unpad_image`` geometry).
T = round(P x n_keep / N), the budget's ratio of a view (as the code's README states its counts).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.pruning.parity.anyres import SIZES, assert_per_view_parity, llava_next_case, stitching, to_layout
from tests.pruning.parity.common import eager_tower, facts, n_keep, workbench_plan
from tests.pruning.parity.test_vispruner import official_view
from workbench.pruning.methods.vispruner import VisPruner

BUDGETS = (0.125, 0.25, 0.5)


def official_vispruner_anyres(adapter, prepared, visual_token_num: int):
    layer = facts(adapter).projector_feed_tower_layer
    out = eager_tower(adapter, prepared, prepared.inputs["pixel_values"].flatten(0, 1))
    features = out.hidden_states[layer + 1][:, 1:].double()                      # hidden_states[-2], patches
    attentions = out.attentions[layer][:, :, 0, 1:].double().mean(1)             # [:, :, 0, 1:], head mean
    kept = {v: official_view(features[v], attentions[v], visual_token_num) for v in range(len(features))}
    return to_layout(prepared, stitching(adapter, prepared, features.shape[1]), kept)


@pytest.mark.parametrize("size", SIZES)
def test_default_equals_the_official_per_view_rule(size):
    assert_per_view_parity(VisPruner(), official_vispruner_anyres, size, BUDGETS)


@pytest.mark.parametrize("size", SIZES)
def test_budget_variant_keeps_exactly_the_budget(size):
    adapter, prepared = llava_next_case(size)
    for budget in BUDGETS:
        (stage,) = workbench_plan(VisPruner(crops="budget"), adapter, prepared, budget).stages
        assert len(stage.kept) == n_keep(prepared, budget)
        assert np.all(np.diff(stage.kept) > 0)
