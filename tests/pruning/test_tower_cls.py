"""The tower's [CLS] passed to the LLM as a visual token (VisionZip's and VisionDrop's code do it).

A plan names it by the reserved index N (``cls_token``, past the layout's N tokens) and brings it in
with an ``Append`` of a ``pre_llm`` stage. Checked against things computed another way: the model
run by hand on the embedding sequence the code builds ([CLS], kept patches, contextual tokens merged
on the tower's features, all through the projector, then the text),
the vision tower run by hand on the tokens a tower stage kept, one sample at a time against a batch.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.pruning.parity.common import eager_model, eager_tower, shipped
from tests.pruning.reference import LayerIO
from tests.pruning.shipped import run_checked, tiny_input
from workbench.models.base import encoder_layers
from workbench.overlay import kept_overlay
from workbench.pruning.executor import ExecutionError, Job, execute, execute_batch
from workbench.pruning.flops import DecoderShape, prefill_flops
from workbench.pruning.method import ModelFacts, SelectionContext
from workbench.pruning.methods.visiondrop import VisionDrop
from workbench.pruning.methods.visionzip import VisionZip
from workbench.pruning.plan import PRE_LLM, Append, KeepPlan, Merge, PlanError, Stage, boxed, cls_token, tower_where
from workbench.pruning.registry import create_method
from workbench.pruning.run import record_needs, run_method


def cls_plan(n: int, kept=(0, 2, 5), position="reindex", **place) -> KeepPlan:
    cls = cls_token(n)
    stage = Stage(PRE_LLM, tuple(kept) + (cls,), appends=(Append(cls, (), (1.0,), **(place or {"before": kept[0]})),),
                  position=position)
    return KeepPlan("t", len(stage.kept), n, (stage,))


@torch.no_grad()
def projected_cls(adapter, prepared, hidden_states=None) -> torch.Tensor:
    """[D]: the [CLS] row of the projector's feed layer, through the projector, on an eager copy."""
    if hidden_states is None:
        hidden_states = eager_tower(adapter, prepared).hidden_states[adapter.projector_feed_layer]
    return eager_model(adapter).model.multi_modal_projector(hidden_states[:, :1].float())[0, 0]


# --- the plan ------------------------------------------------------------------------------------

def test_the_cls_is_named_past_the_layout_and_round_trips():
    plan = cls_plan(16)
    assert cls_token(16) == 16 and cls_token(16, view=2) == 18
    assert plan.final_kept == (0, 2, 5, 16) and list(boxed(plan.final_kept, 16)) == [0, 2, 5]
    assert KeepPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    later = plan.with_stages(plan.stages + (Stage(1, (2, 16), merges=(Merge(16, (5,), (0.5, 0.5)),)),))
    assert later.final_kept == (2, 16)  # a later stage keeps and merges into it by name


@pytest.mark.parametrize("stages, message", [
    ((Stage(1, (0, 16), appends=(Append(16, (), (1.0,)),)),), "enters the sequence in the 'pre_llm' stage"),
    ((Stage(PRE_LLM, (0, 16), appends=(Append(16, (3,), (0.5, 0.5)),)),), "made of no other token"),
    ((Stage(PRE_LLM, (0, 16)),), "out of range"),  # kept without being brought in
    ((Stage(PRE_LLM, (0, 2)), Stage(1, (0, 16))), "out of range"),
])
def test_the_cls_enters_before_the_llm_alone(stages, message):
    with pytest.raises(PlanError, match=message):
        KeepPlan("t", 2, 16, stages)
    with pytest.raises(PlanError, match="'after' or 'before', not both"):
        Append(16, (), (1.0,), after=1, before=0)


# --- the executor ----------------------------------------------------------------------------------

@torch.no_grad()
def feed_features(adapter, prepared) -> torch.Tensor:
    """[1 + N, D]: the model's own tower rows at the projector's feed layer ([CLS] first, then the patches)."""
    out = adapter.vision_tower()(prepared.inputs["pixel_values"], output_hidden_states=True)
    return out.hidden_states[adapter.projector_feed_layer][0]


@pytest.mark.parametrize("position", ["reindex", "original"])
def test_pruned_logits_equal_the_model_on_the_codes_sequence(position):
    # VisionZip's default plan: the code's block [CLS, dominant patches, contextual tokens]
    # (clip_encoder.py lines 58 and 83), each contextual token target + mean(sources) on the tower's
    # feed-layer rows, the projector run on the block; the sequence numbered 0..L'-1 as after the code's
    # concatenation ("reindex"), or each row at its own place's id ("original": the [CLS] at its first
    # kept patch's, contextual tokens at the image's last patch's, as the ``Append`` docstring says).
    adapter, samples = shipped()
    prepared = samples[0]
    method = VisionZip(position=position)
    execution, _ = run_checked(adapter, prepared, method, 0.25, max_new_tokens=0)
    tower, stage = execution.plan.stages
    n, visual = prepared.layout.n_tokens, prepared.layout.positions
    cls = cls_token(n)
    merged = {m.target: m for m in tower.merges}
    targets = [a.token for a in stage.appends if a.token != cls]
    dominant = [i for i in stage.kept if i < n and i not in targets]

    inputs = adapter.llm_inputs(prepared.inputs)
    embeds, ids = inputs.inputs_embeds[0], inputs.position_ids[0]
    feed = feed_features(adapter, prepared)
    contextual = [sum(w * feed[1 + i] for w, i in zip(merged[t].weights, (t,) + merged[t].sources)) if t in merged
                  else feed[1 + t] for t in targets]
    with torch.no_grad():
        rows = adapter.projector()(torch.stack([feed[0]] + [feed[1 + i] for i in dominant] + contextual)[None])[0]
    start, end = int(visual.min()), int(visual.max())
    sequence = torch.cat([embeds[:start], rows, embeds[end + 1:]])[None]
    positions = torch.cat([ids[:start], ids[visual[[tower.kept[0]] + dominant]], ids[visual[[n - 1] * len(targets)]],
                           ids[end + 1:]])[None]
    with torch.no_grad():
        expected = adapter.model(inputs_embeds=sequence, position_ids=positions if position == "original" else None,
                                 logits_to_keep=1).logits[0, -1]
    torch.testing.assert_close(execution.logits, expected.float(), atol=1e-5, rtol=1e-5)
    # the [CLS] is one of the tokens the LLM gets: counted in every layer, in the FLOPs, in the kept count
    depth = len(adapter.decoder_layers())
    assert len(stage.kept) == SelectionContext(prepared.layout, 0.25).n_keep == len(rows)
    assert execution.visual_tokens_per_layer == (len(rows),) * depth
    assert execution.tokens_per_layer == (sequence.shape[1],) * depth
    shape = DecoderShape.of(adapter.language_model().config)
    without = prefill_flops(shape, [sequence.shape[1] - 1] * depth)
    assert prefill_flops(shape, execution.tokens_per_layer) > without


def test_a_batch_of_cls_plans_equals_one_sample_at_a_time():
    adapter, samples = shipped()
    facts = ModelFacts.of(adapter)
    jobs = []
    for prepared, method in zip(samples[:2], (VisionZip(), VisionDrop())):
        recording = record_needs(adapter, prepared, [method])
        context = SelectionContext(prepared.layout, 0.25, recording, facts)
        jobs.append(Job(prepared, method.select(context), method.layer_callback(context)))
    assert all(cls_token(j.prepared.layout.n_tokens) in j.plan.stage_at(PRE_LLM).kept for j in jobs)
    batched = execute_batch(adapter, jobs, max_new_tokens=4)
    for job, together in zip(jobs, batched):
        alone = execute(adapter, job.prepared, job.plan, max_new_tokens=4, callback=job.callback)
        torch.testing.assert_close(together.logits, alone.logits, atol=1e-5, rtol=1e-5)
        assert together.answer_ids == alone.answer_ids
        assert [(s.kept, s.appends, s.merges) for s in together.plan.stages] == \
            [(s.kept, s.appends, s.merges) for s in alone.plan.stages]
        assert together.visual_tokens_per_layer == alone.visual_tokens_per_layer


@torch.no_grad()
def test_the_cls_comes_from_the_tower_pass_that_pruned():
    # A stage after tower layer 0 changes what every later tower layer computes, the [CLS] included:
    # the LLM must get the [CLS] of that pruned pass (its tower run by hand on the kept rows).
    adapter, samples = shipped()
    prepared = samples[0]
    n, feed = prepared.layout.n_tokens, adapter.projector_feed_layer
    assert feed >= 2  # the stage after layer 0 is below the feed layer
    kept = tuple(range(0, n, 3))
    cls = cls_token(n)
    entry = Stage(PRE_LLM, kept + (cls,), appends=(Append(cls, (), (1.0,), before=0),))
    plan = KeepPlan("t", len(kept) + 1, n, (Stage(tower_where(0), kept), entry))
    with LayerIO(adapter) as seen:
        execute(adapter, prepared, plan, max_new_tokens=0)
    out = eager_tower(adapter, prepared)
    layers = encoder_layers(eager_model(adapter).model.vision_tower)
    states = out.hidden_states[1][:, [0] + [i + 1 for i in kept]]  # after layer 0, the [CLS] and kept patches
    for layer in layers[1:feed]:
        states = layer(states, None)
        states = states[0] if isinstance(states, tuple) else states
    start = int(prepared.layout.positions[0])
    torch.testing.assert_close(seen.inputs[0][0, start], projected_cls(adapter, prepared, states), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen.inputs[0][0, start], projected_cls(adapter, prepared), atol=1e-4)
    torch.testing.assert_close(seen.inputs[0][0, start + 1], projected_cls(adapter, prepared, states[:, 1:2]),
                               atol=1e-5, rtol=1e-5)  # the first kept patch follows it


def test_a_tower_without_cls_cannot_pass_one():
    adapter, prepared = tiny_input("qwen2_vl")
    plan = cls_plan(prepared.layout.n_tokens, position="original")
    with pytest.raises(ExecutionError, match=r"passes the vision tower's \[CLS\].*has no \[CLS\]"):
        execute(adapter, prepared, plan, max_new_tokens=0)


def test_a_composition_keeps_the_cls_the_first_method_passed():
    adapter, samples = shipped()
    prepared = samples[0]
    execution, _ = run_checked(adapter, prepared, create_method("visionzip+pyramiddrop"), 0.5, max_new_tokens=0)
    cls = cls_token(prepared.layout.n_tokens)
    tower, *llm = execution.plan.stages  # VisionZip merges in the tower, then brings the [CLS] in
    assert tower.in_tower and cls not in tower.kept and len(llm) > 1
    assert all(cls in stage.kept for stage in llm)


def test_the_overlay_draws_no_box_for_the_cls():
    adapter, samples = shipped()
    prepared = samples[0]
    n = prepared.layout.n_tokens
    image = Image.fromarray(np.full((prepared.image_size[1], prepared.image_size[0], 3), 200, dtype=np.uint8))
    merges = (Merge(n, (4,), (0.5, 0.5)),)  # a later stage merged patch 4 into the [CLS]
    drawn = np.asarray(kept_overlay(image, prepared.layout, [0, 3, n], merges=merges))
    assert np.array_equal(drawn, np.asarray(kept_overlay(image, prepared.layout, [0, 3], merges=merges)))
    assert not np.array_equal(drawn, np.asarray(kept_overlay(image, prepared.layout, [0, 3])))  # 4 outlined


def test_visiondrop_counts_the_cls_it_passes():
    adapter, samples = shipped()
    execution, context = run_checked(adapter, samples[0], VisionDrop(), 0.22, max_new_tokens=0)
    cls = cls_token(samples[0].layout.n_tokens)
    tower, entry = execution.plan.stages[:2]
    assert cls not in tower.kept and entry.kept == tower.kept + (cls,)
    assert execution.visual_tokens_per_layer[0] == len(entry.kept)  # what the first decoder layer gets
    empty = run_method(adapter, samples[0], VisionDrop(cls_slot="empty"), 0.22, max_new_tokens=0)
    assert empty.plan.stages[0].kept == tower.kept and cls not in empty.plan.final_kept
    assert empty.visual_tokens_per_layer[0] == len(tower.kept)


@pytest.mark.parametrize("position", ["reindex", "original"])
def test_a_token_placed_before_another_inside_the_llm(position):
    # ``Append.before`` is not only for the [CLS]: token 3 moves in front of token 0 before layer 1.
    adapter, samples = shipped()
    prepared = samples[0]
    n, visual = prepared.layout.n_tokens, prepared.layout.positions
    plan = KeepPlan("t", 4, n, (Stage(1, (0, 1, 2, 3), position=position,
                                      appends=(Append(3, (), (1.0,), before=0),)),))
    with LayerIO(adapter) as seen:
        execution = execute(adapter, prepared, plan, max_new_tokens=0)
    start, before = int(visual.min()), seen.outputs[0][0]
    assert torch.equal(seen.inputs[1][0, start:start + 4], before[visual[[3, 0, 1, 2]]])
    assert torch.equal(seen.inputs[1][0, start + 4], before[int(visual.max()) + 1])  # then the text
    assert execution.visual_tokens_per_layer[1:] == (4,) * (len(adapter.decoder_layers()) - 1)


def test_the_recorded_forward_leaves_the_cls_so_the_tower_runs_once_per_sample():
    """The sample's recording runs the tower; a VisionZip run after it that merges at the LLM input
    reads that pass's [CLS] (equal to the [CLS] of a tower pass of its own) without running the tower
    again. (Its default merges inside the tower, which takes a tower pass of its own.)"""
    from workbench import pipeline
    from workbench.samples import read_dataset

    adapter, _ = shipped()
    sample = read_dataset("data/eval/samples.jsonl", limit=1)[0]
    method = create_method("visionzip", merge_at="embedding")
    passes = []
    handle = adapter.vision_tower().register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        ready = pipeline.prepare_sample(adapter, sample, [method])
        result = pipeline.run(adapter, ready, method, 0.22)
    finally:
        handle.remove()
    assert len(passes) == 1 and result.status == "ok"
    assert cls_token(ready.n_visual) in result.plan.final_kept
    fresh = adapter.prepare(sample.load_image(), sample.question)
    assert torch.equal(ready.prepared._decoder_inputs["cls"], adapter.tower_cls(fresh))
