"""VisPruner: important + de-duplicated diverse tokens worked out by hand, the shipped model, validation."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

from tests.pruning.handmade import LLAVA_FACTS, NO_CLS_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import check_on_shipped, folded, run_checked, tiny_input
from workbench.pruning.method import MethodNotApplicable, SelectionContext, SignalNeed
from workbench.pruning.methods.vispruner import VisPruner, remove_duplicates

CLS22 = SignalNeed("attention", "tower", 22, "cls")
STATES22 = SignalNeed("visual_states_out", "tower", 22)


def entries():
    """4x4 tokens, [CLS] attention falling with the index (rank = index). Features: the odd tokens
    7, 9, 11, 13, 15 are the axes e0..e4; the even ones are near copies of them with max cosines
    6: 1.0, 8: 0.9, 10: 0.8, 14: 0.5 and 12 orthogonal to all (axis e5)."""
    attention = 1.0 - np.arange(16) / 20
    features = np.zeros((16, 6))
    for axis, token in enumerate((7, 9, 11, 13, 15)):
        features[token, axis] = 1.0
    for token, axis, cos in ((6, 0, 1.0), (8, 1, 0.9), (10, 2, 0.8), (14, 4, 0.5)):
        features[token, axis] = cos
        features[token, 5] = np.sqrt(1 - cos ** 2)
    features[12, 5] = 1.0
    features[:6, 3] = 1.0  # the important tokens: any feature
    return {CLS22: [attention], STATES22: features}


def test_defaults_split_and_needs():
    assert VisPruner().important_ratio == 0.5  # llava/eval/model_vqa_loader.py --important_ratio
    assert VisPruner().split(64) == (32, 32)
    assert VisPruner(important_ratio=0.75).split(64) == (48, 16)  # README: 48 important + 16 diverse
    assert VisPruner().split(5) == (2, 3)  # int(T * r)
    assert VisPruner().needs(LLAVA_FACTS) == (CLS22, STATES22)


def test_important_by_cls_then_the_least_duplicated_remaining_tokens():
    layout = grid_layout((4, 4))
    # budget 12, ratio 0.5: important = tokens 0..5 (top [CLS]); 6 diverse from the residual 6..15 (in
    # attention order). R = 10, r = min(8, 10 - 6, 5) = 4: A = 6, 8, 10, 12, 14 and B = 7, 9, 11, 13, 15;
    # the 4 A tokens most similar to B go (6, 8, 10, 14), leaving 12 and all of B.
    plan = VisPruner().select(handmade_context(layout, 12, entries()))
    assert plan.final_kept == (0, 1, 2, 3, 4, 5, 7, 9, 11, 12, 13, 15)
    assert plan.stages[0].scores[3] == pytest.approx(0.85)


def test_all_important_keeps_the_cls_top_k():
    layout = grid_layout((4, 4))
    plan = VisPruner(important_ratio=1.0).select(handmade_context(layout, 5, entries()))
    assert plan.final_kept == (0, 1, 2, 3, 4)


def test_rounds_continue_with_the_rest_of_a_then_b():
    # residual r0..r5 (features below), keep 2. Round 1: R = 6, r = min(8, 4, 3) = 3: all of A (0, 2, 4)
    # goes, residual = B = 1, 3, 5. Round 2: R = 3, r = 1: A = 1, 5 and B = 3; 5 is parallel to 3, so it goes.
    features = np.array([[1, 0, 0], [0, 1, 0], [1, 0.1, 0], [0, 0, 1], [0.9, 0, 0.1], [0, 0, 2.0]])
    assert remove_duplicates(features, np.arange(6), 2).tolist() == [1, 3]


def test_invalid_hyper_parameters():
    with pytest.raises(ValueError, match="vispruner: important_ratio must be a number in \\[0, 1\\], got 1.5"):
        VisPruner(important_ratio=1.5)
    with pytest.raises(ValueError, match="vispruner: reference_layer must be an int"):
        VisPruner(reference_layer=24)


def test_no_cls_tower_is_not_applicable():
    assert VisPruner().needs(NO_CLS_FACTS) == ()
    with pytest.raises(MethodNotApplicable, match="vispruner does not apply to qwen2_vl: .*no \\[CLS\\]"):
        VisPruner().select(SelectionContext(grid_layout((2, 2)), 1, None, NO_CLS_FACTS))


def test_runs_on_tiny_llava_next_through_the_tower_map():
    adapter, prepared = tiny_input("llava_next")
    execution, context = run_checked(adapter, prepared, VisPruner(), 0.5, max_new_tokens=2)
    # the default's per-crop counts are checked against the code in parity/test_vispruner_anyres.py
    assert len(run_checked(adapter, prepared, VisPruner(crops="budget"), 0.5)[0].plan.final_kept) == context.n_keep
    layer = VisPruner().layer(context.model)
    np.testing.assert_allclose(execution.plan.stages[0].scores, folded(context.recording, prepared.layout,
                                                                      "attention", layer, "cls"))


def test_runs_on_the_shipped_model():
    execution, _ = check_on_shipped(VisPruner())
    assert [len(st.kept) for st in execution.plan.stages] == [32]


# --- parity with the official rule on the shipped model ------------------------------------------
# The helpers below read the model's own tensors without the workbench's recorder (a deep copy running
# transformers' eager attention with ``output_attentions`` / ``output_hidden_states``); the SCOPE,
# CDPruner and HoloV tests reuse them.

@functools.lru_cache(maxsize=None)
def shipped_eager():
    """(adapter, prepared, facts, tower output, LLM input embeddings [S, D]) of the shipped sample."""
    from tests.pruning.shipped import shipped_sample
    from workbench.pruning.method import ModelFacts

    adapter, prepared, _ = shipped_sample()
    model = copy.deepcopy(adapter.model)
    model.set_attn_implementation("eager")
    model.eval()
    tower = model.vision_tower if hasattr(model, "vision_tower") else model.model.vision_tower
    with torch.no_grad():
        tower_out = tower(prepared.inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        embeds = model(**prepared.inputs, output_hidden_states=True).hidden_states[0][0]
    return adapter, prepared, ModelFacts.of(adapter), tower_out, embeds.double()


def feed_tensors():
    """(patch features [N, C], [CLS] attention [heads, N]) at the projector-feed layer, as the references
    read ``hidden_states[-2][:, 1:]`` and ``attentions[-2][:, :, 0, 1:]``."""
    _, _, facts, out, _ = shipped_eager()
    feed = facts.projector_feed_layer
    return out.hidden_states[feed][0, 1:].double(), out.attentions[feed - 1][0, :, 0, 1:].double()


def workbench_kept(method, budget):
    from workbench.pruning.run import record_needs

    adapter, prepared, facts, _, _ = shipped_eager()
    recording = record_needs(adapter, prepared, [method])
    return method.select(SelectionContext(prepared.layout, budget, recording, facts)).final_kept


def official_vispruner(k: int, ratio: float) -> set[int]:
    # Theia-4869/VisPruner llava/model/llava_arch.py encode_images, transliterated for one image
    features, attention = feed_tensors()
    important = int(k * ratio)
    diverse = k - important
    order = attention.mean(dim=0).argsort(descending=True)
    kept, residual = order[:important], order[important:]
    unit = features / features.norm(dim=-1, keepdim=True)
    while diverse > 0:
        r = min(8, len(residual) - diverse)
        if r <= 0:
            break
        tokens = unit[residual]
        best = (tokens[::2] @ tokens[1::2].T).max(dim=-1).values
        distinct = best.argsort(descending=True)[r:]
        residual = torch.cat([residual[::2][distinct], residual[1::2]])
    return {int(i) for i in torch.cat([kept, residual])}


@pytest.mark.parametrize("k, ratio", [(32, 0.5), (48, 0.5), (64, 0.75)])  # budgets the official loop runs at
def test_parity_with_the_official_rule_on_the_shipped_model(k, ratio):
    assert set(workbench_kept(VisPruner(important_ratio=ratio), k)) == official_vispruner(k, ratio)
