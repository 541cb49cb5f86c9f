"""VisionZip: dominant + contextual tokens worked out by hand, the shipped model, [CLS]-free towers."""

from __future__ import annotations

import numpy as np
import pytest

import dataclasses

from tests.pruning.handmade import LLAVA_FACTS, NO_CLS_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import check_on_shipped, folded, run_checked, tiny_input
from workbench.pruning.method import MethodNotApplicable, SelectionContext, SignalNeed
from workbench.pruning.methods.visionzip import VisionZip
from workbench.pruning.plan import PRE_LLM, Append, Merge, tower_where
from workbench.pruning.run import run_method

CLS22 = SignalNeed("attention", "tower", 22, "cls")
KEYS22 = SignalNeed("visual_keys", "tower", 22)
FEED = tower_where(LLAVA_FACTS.projector_feed_tower_layer)  # tower:22


def entries():
    """4x4 tokens; [CLS] attention highest at 2 and 3; keys: tokens 0, 1, 4, 5 point along x, the rest along y."""
    attention = np.full(16, 0.01)
    attention[[2, 3]] = [0.5, 0.4]
    keys = np.tile([0.1, 1.0, 0.0], (16, 1))
    keys[[0, 1, 4, 5]] = [1.0, 0.1, 0.0]
    keys[0] = [1.0, 0.0, 0.0]
    keys[9] = [0.0, 1.0, 0.5]
    return {CLS22: [attention], KEYS22: keys}


def test_reference_splits_and_ratio():
    assert VisionZip().split(64) == (54, 10)
    assert VisionZip().split(128) == (108, 20)
    assert VisionZip().split(192) == (162, 30)
    assert VisionZip().split(32) == (27, 5)
    assert VisionZip().needs(LLAVA_FACTS) == (CLS22, KEYS22)


def test_dominant_then_stride_targets_among_the_remaining_tokens():
    layout = grid_layout((4, 4))
    tower, entry = VisionZip(contextual_ratio=0.5, cls_slot="patch").select(handmade_context(layout, 4, entries())).stages
    # dominant: 2, 3. Remaining: 0, 1, 4, 5, ..., 15 (14 tokens); stride 14 // 2 = 7 -> targets are the
    # remaining tokens at positions 0 and 7: tokens 0 and 9 (a stride over all 16 tokens would give 8).
    # The code merges on the tower's features at the projector-feed layer (tower:22), each other
    # remaining token joining its most similar target by key cosine: target + mean(sources).
    assert tower.where == FEED and tower.kept == (0, 2, 3, 9) and tower.appends == ()
    assert tower.merges == (Merge(0, (1, 4, 5), (1.0, 1 / 3, 1 / 3, 1 / 3)),
                            Merge(9, (6, 7, 8, 10, 11, 12, 13, 14, 15), (1.0,) + (1 / 9,) * 9))
    assert tower.scores[2] == pytest.approx(0.5)
    # then the contextual tokens move behind the dominant ones, in target order (already merged)
    assert entry.where == PRE_LLM and entry.kept == tower.kept and entry.merges == ()
    assert entry.appends == (Append(0, (), (1.0,)), Append(9, (), (1.0,)))
    mean = VisionZip(contextual_ratio=0.5, merge="mean", cls_slot="patch").select(handmade_context(layout, 4, entries()))
    assert mean.stages[0].merges[0] == Merge(0, (1, 4, 5), (0.25,) * 4)
    # merged in place in the tower: nothing moves, no pre_llm stage
    (in_place,) = VisionZip(contextual_ratio=0.5, cls_slot="patch", contextual_at="target").select(
        handmade_context(layout, 4, entries())).stages
    assert in_place == tower


def test_embedding_merging_merges_the_projected_tokens_at_the_llm_input():
    layout = grid_layout((4, 4))
    method = VisionZip(contextual_ratio=0.5, cls_slot="patch", merge_at="embedding")
    (stage,) = method.select(handmade_context(layout, 4, entries())).stages
    # the same choice; the contextual tokens follow the dominant ones (after the image's last token)
    assert stage.where == PRE_LLM and stage.kept == (0, 2, 3, 9) and stage.merges == ()
    assert stage.appends == (Append(0, (1, 4, 5), (1.0, 1 / 3, 1 / 3, 1 / 3), after=15),
                             Append(9, (6, 7, 8, 10, 11, 12, 13, 14, 15), (1.0,) + (1 / 9,) * 9, after=15))
    assert stage.scores[2] == pytest.approx(0.5)
    mean = dataclasses.replace(method, merge="mean").select(handmade_context(layout, 4, entries()))
    assert mean.stages[0].appends[0] == Append(0, (1, 4, 5), (0.25,) * 4, after=15)
    (in_place,) = dataclasses.replace(method, contextual_at="target").select(
        handmade_context(layout, 4, entries())).stages
    assert in_place.kept == stage.kept and in_place.appends == ()
    assert in_place.merges == (Merge(0, (1, 4, 5), (1.0, 1 / 3, 1 / 3, 1 / 3)),
                               Merge(9, (6, 7, 8, 10, 11, 12, 13, 14, 15), (1.0,) + (1 / 9,) * 9))
    assert method.kept_counts(handmade_context(layout, 4, entries())) == (4,)


def test_a_multi_view_tower_merges_at_the_llm_input_whatever_merge_at_says():
    # tower stages prune one view's sequence (tower_stages.in_tower_reason): on a multi-view model the
    # default falls back to merging the projected embeddings, in one pre_llm stage
    layout = grid_layout((4, 4))
    multi = dataclasses.replace(LLAVA_FACTS, multi_view=True)
    context = handmade_context(layout, 4, entries(), model=multi)
    default = VisionZip(contextual_ratio=0.5, cls_slot="patch").select(context)
    embedding = VisionZip(contextual_ratio=0.5, cls_slot="patch", merge_at="embedding").select(context)
    assert default.stages == embedding.stages and [s.where for s in default.stages] == [PRE_LLM]
    assert VisionZip(contextual_ratio=0.5, cls_slot="patch").kept_counts(context) == (4,)


def test_the_reference_cls_slot_takes_one_dominant_patch_and_passes_the_cls():
    # dominant 2 = [CLS] + 1 patch (visionzip/main.py: dominant_num = dominant - 1): token 2 only.
    # Remaining: the 15 others; stride 15 // 2 = 7 -> targets are remaining[0], remaining[7]: 0 and 8.
    # The [CLS] (reserved index 16) is passed first (clip_encoder.py line 58): 4 tokens, the budget;
    # the tower stage keeps the 3 patches, the pre_llm stage brings the [CLS] in before the first.
    layout = grid_layout((4, 4))
    context = handmade_context(layout, 4, entries())
    tower, entry = VisionZip(contextual_ratio=0.5).select(context).stages
    assert tower.kept == (0, 2, 8) and entry.kept == (0, 2, 8, 16)
    assert entry.appends[0] == Append(16, (), (1.0,), before=0)
    assert VisionZip(contextual_ratio=0.5).kept_counts(context) == (3, 4)
    (embedded,) = VisionZip(contextual_ratio=0.5, merge_at="embedding").select(context).stages
    assert embedded.kept == (0, 2, 8, 16) and embedded.appends[0] == Append(16, (), (1.0,), before=0)
    assert VisionZip(contextual_ratio=0.5, merge_at="embedding").kept_counts(context) == (4,)
    empty = VisionZip(contextual_ratio=0.5, cls_slot="empty")
    assert empty.select(context).final_kept == (0, 2, 8) and empty.kept_counts(context) == (3, 3)
    assert VisionZip(contextual_ratio=0.5, cls_slot="patch").kept_counts(context) == (4, 4)
    assert VisionZip(contextual_ratio=0.5, cls_slot="patch", contextual_at="target").kept_counts(context) == (4,)


def test_no_contextual_slots_is_plain_top_k():
    layout = grid_layout((4, 4))
    plan = VisionZip(contextual_ratio=0.0, cls_slot="patch").select(handmade_context(layout, 2, entries()))
    assert plan.final_kept == (2, 3) and plan.stages[0].merges == () and len(plan.stages) == 1
    assert VisionZip(contextual_ratio=0.0).select(handmade_context(layout, 2, entries())).final_kept == (2, 16)


def test_invalid_hyper_parameters():
    with pytest.raises(ValueError, match="merge must be one of"):
        VisionZip(merge="sum")
    with pytest.raises(ValueError, match="contextual_ratio must be"):
        VisionZip(contextual_ratio=2.0)
    with pytest.raises(ValueError, match="cls_slot must be one of"):
        VisionZip(cls_slot="cls")
    with pytest.raises(ValueError, match="contextual_at must be one of"):
        VisionZip(contextual_at="start")
    with pytest.raises(ValueError, match="merge_at must be one of"):
        VisionZip(merge_at="projector")


def test_no_cls_tower_is_not_applicable():
    assert VisionZip().needs(NO_CLS_FACTS) == ()
    with pytest.raises(MethodNotApplicable, match="visionzip does not apply to qwen2_vl: .*no \\[CLS\\]"):
        VisionZip().select(SelectionContext(grid_layout((2, 2)), 1, None, NO_CLS_FACTS))


def test_runs_on_tiny_llava():
    adapter, prepared = tiny_input("llava")
    execution, _ = run_checked(adapter, prepared, VisionZip(), 0.5, max_new_tokens=2)
    n, kept = prepared.layout.n_tokens, execution.plan.final_kept
    assert len(kept) == (n + 1) // 2 and kept[-1] == n  # the [CLS] fills one slot and is passed on
    tower, entry = execution.plan.stages  # contextual tokens merged in the tower, then moved
    assert tower.in_tower and tower.merges and len(entry.appends) == 1 + VisionZip().split(len(kept))[1]


def test_runs_on_tiny_llava_next_through_the_tower_map_and_not_on_qwen2_vl():
    from workbench.tower_map import tower_features

    adapter, prepared = tiny_input("llava_next")
    layout = prepared.layout
    # the default: the code's per-view rule and sequence (parity/test_visionzip_anyres.py); the crops'
    # contextual tokens are made by a stage before decoder layer 0, on the same embeddings
    default, _ = run_checked(adapter, prepared, VisionZip(), 0.5, max_new_tokens=2)
    assert [s.where for s in default.plan.stages] == ["pre_llm", 0] and default.plan.stages[0].separators == "dropped"
    # no tower stage on a multi-view tower: the merges are made at the LLM input (merge_at is moot)
    assert not any(s.in_tower for s in run_checked(adapter, prepared, VisionZip(crops="budget"), 0.5,
                                                   max_new_tokens=0)[0].plan.stages)
    # crops="budget": the layout's groups stand in for the crops, each with its share of the budget
    execution, context = run_checked(adapter, prepared, VisionZip(crops="budget"), 0.5, max_new_tokens=2)
    recording, stage = context.recording, execution.plan.stages[0]
    # every view's [CLS] fills a slot and is passed: the base view's first, the crops' after the tiles
    n, views = layout.n_tokens, len(layout.tower_owner)
    assert len(stage.kept) == context.n_keep and stage.kept[-views:] == tuple(range(n, n + views))
    entering = [a for a in stage.appends if a.token >= n]
    assert entering[0] == Append(n, (), (1.0,), before=0)
    assert {a.after for a in entering[1:]} == {n - 1} and [a.token for a in entering] == list(range(n, n + views))
    # each crop's contextual tokens follow that crop's tokens
    contextual = [a for a in stage.appends if a.token < n]
    assert {a.after for a in contextual} <= {int(np.flatnonzero(layout.group == g)[-1]) for g in range(len(layout.groups))}
    assert all(layout.group[a.token] == layout.group[a.after] for a in contextual)
    layer = VisionZip().layer(context.model)
    np.testing.assert_allclose(stage.scores, folded(recording, layout, "attention", layer, "cls"))
    keys = tower_features(recording, layout, "visual_keys", layer)
    assert keys.shape[0] == layout.n_tokens and np.isfinite(keys).all()
    np.testing.assert_allclose(keys[:16], recording.get("visual_keys", layer, "tokens", "tower", view=0).numpy(),
                               rtol=1e-6)  # base crop: one patch per token

    adapter, prepared = tiny_input("qwen2_vl")
    with pytest.raises(MethodNotApplicable, match="visionzip does not apply"):
        run_method(adapter, prepared, VisionZip(), 0.5)


def test_runs_on_the_shipped_model():
    execution, _ = check_on_shipped(VisionZip())
    # the tower keeps 31 patches and merges the rest into the contextual ones; the LLM gets 32 = [CLS] + 31
    assert [len(st.kept) for st in execution.plan.stages] == [31, 32]
    assert execution.plan.stages[0].merges and len(execution.plan.stages[1].appends) > 1
    embedding, _ = check_on_shipped(VisionZip(merge_at="embedding"))
    assert [len(st.kept) for st in embedding.plan.stages] == [32] and embedding.final_kept == execution.final_kept
