"""Composition: a pre-LLM method, then an in-LLM method choosing among its survivors only; one plan
with both stages that the executor runs like any other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.handmade import LLAVA_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import run_checked, shipped_sample, tiny_input
from tests.tiny_models import TINY_FAMILIES
from workbench.cli import main
from workbench.pruning.compose import Composed, SurvivorRecording, _to_original, survivor_layout
from workbench.pruning.executor import execute
from workbench.pruning.method import ModelFacts, SignalNeed
from workbench.pruning.methods.fopru import FoPru
from workbench.pruning.methods.pyramiddrop import LastTokenRanking, PyramidDrop
from workbench.pruning.plan import PRE_LLM, Append, Merge, Stage, tower_where
from workbench.pruning.registry import InvalidMethodParameters, create_method
from workbench.sweep import MethodSpec

RECEIVED = SignalNeed("attention", "tower", LLAVA_FACTS.projector_feed_tower_layer, "mean")


def test_a_spec_names_both_methods_and_routes_their_parameters():
    spec = MethodSpec.parse("visionzip+pyramiddrop:pyramiddrop.ratio=0.25,inner_budget=0.4")
    method = spec.create()
    assert isinstance(method, Composed) and method.name == "visionzip+pyramiddrop"
    assert (method.first.name, method.second.name, method.second.ratio, method.inner_budget) == \
        ("visionzip", "pyramiddrop", 0.25, 0.4)
    assert method.params()["pyramiddrop.ratio"] == 0.25 and "visionzip.merge" in method.params()
    assert MethodSpec.parse(spec.label) == spec  # tables' labels read back
    assert spec.label == "visionzip+pyramiddrop(inner_budget=0.4,pyramiddrop.ratio=0.25)"


@pytest.mark.parametrize("name, params, message", [
    ("pyramiddrop+sparsevlm", {}, "must act before the LLM only"),
    ("visionzip+fastv", {}, "does not select on the live pruned state"),
    ("visionzip+pyramiddrop+sparsevlm", {}, "exactly two methods"),
    ("pyramiddrop+pyramiddrop", {}, "two different methods"),
    ("visionzip+pyramiddrop", {"ratio": 0.5}, "prefix a method's parameters"),
    ("visionzip+pyramiddrop", {"fastv.layer": 3}, "not part of it"),
    ("visionzip+pyramiddrop", {"pyramiddrop.ratio": 2.0}, "lambda"),
    ("visionzip+pyramiddrop", {"inner_budget": 0}, "inner_budget"),
    ("nosuch+pyramiddrop", {}, "unknown pruning method 'nosuch'"),
])
def test_misfit_compositions_fail_with_one_clear_line(name, params, message):
    with pytest.raises((InvalidMethodParameters, ValueError), match=message):
        create_method(name, **params)


def test_a_first_method_that_ranks_inside_the_llm_does_not_apply():
    reason = create_method("fastv+pyramiddrop").applicability(LLAVA_FACTS)
    assert "fastv ranks inside the LLM" in reason
    assert create_method("fopru+pyramiddrop").applicability(LLAVA_FACTS) is None
    assert create_method("fopru+sparsevlm").applicability(LLAVA_FACTS) is None  # reads layer-0 states only


def test_the_second_method_sees_the_survivors_as_its_image():
    # FoPru keeps 8 of 16 (the rows 1 and 3), PyramidDrop's fixed ratio list then thins those 8:
    # int(8 * .5) = 4, 2, 1 before layers 8 / 16 / 24 of the reference decoder
    significance = np.repeat([[.2, .9, .1, .8]], 4, axis=1).reshape(1, 16)
    context = handmade_context(grid_layout((4, 4)), 8, {RECEIVED: significance})
    method = Composed(FoPru(strategy="row"), PyramidDrop())
    plan = method.select(context)
    assert [s.where for s in plan.stages] == [PRE_LLM]  # PyramidDrop chooses on the live state
    assert plan.final_kept == (4, 5, 6, 7, 12, 13, 14, 15)
    assert method.kept_counts(context) == (8, 4, 2, 1)
    inner = method.inner_context(context, np.asarray(plan.final_kept))
    assert inner.n_visual == 8 and inner.n_keep == 4  # inner_budget 0.5 of the survivors
    assert inner.layout.positions.tolist() == context.layout.positions[[4, 5, 6, 7, 12, 13, 14, 15]].tolist()
    counted = Composed(FoPru(strategy="row"), PyramidDrop(), inner_budget=20)
    assert counted.inner_context(context, np.asarray(plan.final_kept)).n_keep == 8  # a count: at most the survivors


def test_survivor_stages_map_back_to_original_indices():
    kept = np.array([2, 5, 7, 9])
    stage = _to_original(Stage(3, (0, 3), (0.5, 0.1, 0.2, 0.9), (Merge(3, (1,), (0.5, 0.5)),), "reindex"), kept, 12)
    assert stage.kept == (2, 9) and stage.where == 3 and stage.position == "reindex"
    assert stage.merges == (Merge(9, (5,), (0.5, 0.5)),)
    assert np.isnan(stage.scores[0]) and stage.scores[9] == pytest.approx(0.9) and stage.scores[5] == pytest.approx(0.1)
    appended = _to_original(Stage(3, (0, 3), appends=(Append(0, (2,), (0.5, 0.5), after=1),)), kept, 12)
    assert appended.appends == (Append(2, (7,), (0.5, 0.5), after=5),)  # e.g. SparseVLM's recycled tokens
    layout = survivor_layout(grid_layout((4, 4)), kept)
    assert layout.n_tokens == 4 and layout.groups[0].cols == 4


def test_the_survivor_recording_offers_only_the_decoder_input():
    states = np.arange(16 * 2, dtype=float).reshape(16, 2)
    context = handmade_context(grid_layout((4, 4)), 4, {SignalNeed("visual_states", "llm", 0): states,
                                                        SignalNeed("visual_states", "llm", 1): states})
    survivors = SurvivorRecording(context.recording, np.array([1, 4]))
    assert survivors.get("visual_states", 0, "tokens").numpy().tolist() == [[2, 3], [8, 9]]
    with pytest.raises(KeyError, match="not available"):
        survivors.get("visual_states", 1, "tokens")


def test_on_the_shipped_model_the_plan_holds_both_stages_and_replays_exactly():
    adapter, prepared, gold = shipped_sample()
    method = create_method("fopru+pyramiddrop")
    execution, context = run_checked(adapter, prepared, method, 32, gold=gold)  # counts: 32, 16, 8, 4
    first, *later = execution.plan.stages
    assert first.where == PRE_LLM and len(first.kept) == 32
    assert [(s.where, len(s.kept)) for s in later] == [(1, 16), (2, 8), (3, 4)]
    alive = set(first.kept)
    for stage in later:  # each in-LLM stage keeps a subset of what was alive
        assert set(stage.kept) <= alive
        scored = np.flatnonzero(~np.isnan(np.asarray(stage.scores)))
        assert set(scored) <= alive  # nothing the first stage dropped was even ranked
        alive = set(stage.kept)
    # the executor under the plan alone (no callback) gives the same run: the plan is the whole story
    replay = execute(adapter, prepared, execution.plan, gold_answer=gold)
    assert replay.answer_ids == execution.answer_ids
    torch.testing.assert_close(replay.logits, execution.logits)
    assert replay.visual_tokens_per_layer == execution.visual_tokens_per_layer == (32, 16, 8, 4)
    # and it is PyramidDrop's own rule on the survivors: its callback with their schedule, after FoPru's stage
    plain = execute(adapter, prepared, execution.plan.with_stages([first]), gold_answer=gold,
                    callback=LastTokenRanking("pyramiddrop", {1: 16, 2: 8, 3: 4}, 144, "reindex"))
    for ours, theirs in zip(execution.plan.stages, plain.plan.stages, strict=True):
        assert (ours.where, ours.kept, ours.position) == (theirs.where, theirs.kept, theirs.position)
        np.testing.assert_array_equal(ours.score_array, theirs.score_array)  # NaN where unranked, on both


def test_the_pipeline_and_the_methods_command_handle_compositions(capsys):
    from workbench import pipeline
    from workbench.samples import read_dataset

    adapter, _, _ = shipped_sample()
    method = create_method("visionzip+pyramiddrop")
    ready = pipeline.prepare_sample(adapter, read_dataset("data/eval/samples.jsonl", limit=1)[0], [method])
    result = pipeline.run(adapter, ready, method, 0.22, max_new_tokens=2)
    assert result.status == "ok" and result.method == "visionzip+pyramiddrop"
    feed = tower_where(ModelFacts.of(adapter).projector_feed_tower_layer)  # VisionZip merges in the tower
    assert [s.where for s in result.plan.stages][:3] == [feed, PRE_LLM, 1]
    assert main(["methods", "visionzip+pyramiddrop"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("visionzip+pyramiddrop  (composition: visionzip before the LLM, then pyramiddrop")
    assert "pyramiddrop.ratio=0.5" in out and "first: visionzip" in out and "then: pyramiddrop" in out
    assert main(["methods", "visionzip+fastv"]) != 0
    assert "does not select on the live pruned state" in capsys.readouterr().err


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a_composition_runs_or_says_why_not_on_every_family(family):
    adapter, prepared = tiny_input(family)
    method = create_method("fopru+pyramiddrop")
    reason = method.applicability(ModelFacts.of(adapter))
    if reason is not None:
        pytest.fail(f"fopru+pyramiddrop should apply to {family}: {reason}")
    execution, _ = run_checked(adapter, prepared, method, 0.5, max_new_tokens=2)
    first, *later = execution.plan.stages
    assert not first.in_llm and all(set(s.kept) <= set(first.kept) for s in later)


def test_a_compositions_code_version_covers_both_methods(monkeypatch):
    import sys

    from workbench.sweep_identity import code_version

    method = create_method("visionzip+pyramiddrop")
    before = code_version(method)
    module = sys.modules[type(method.second).__module__]
    monkeypatch.setattr("inspect.getsource", lambda m, real=__import__("inspect").getsource:
                        real(m) + ("# changed" if m is module else ""))
    assert code_version(method) != before  # a change to PyramidDrop's module invalidates stored rows


def test_a_methods_code_version_covers_its_base_classes(monkeypatch):
    import sys

    from workbench.pruning.method import PreLLMMethod
    from workbench.sweep_identity import code_version

    method = create_method("fastervlm")
    assert isinstance(method, PreLLMMethod)
    before = code_version(method)
    module = sys.modules[PreLLMMethod.__module__]
    monkeypatch.setattr("inspect.getsource", lambda m, real=__import__("inspect").getsource:
                        real(m) + ("# changed" if m is module else ""))
    assert code_version(method) != before  # a change to the shared base invalidates stored rows
