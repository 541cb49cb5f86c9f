"""A pre-LLM stage that leaves the layout's separators out of the LLM input (``Stage.separators``).

On the tiny LLaVA-NeXT the separators are the model's image-newline rows. A stage with
``separators="dropped"`` takes them out with the visual tokens it drops: the decoder's input is the
text and the kept patches only, numbered as the stage's position policy says; every layer computes
the shorter sequence (``tokens_per_layer``, FLOPs), alone or in a batch, and a resumed run starts
at the first layer.
"""

from __future__ import annotations

import json

import pytest
import torch

from analyses.failures import restore_plan
from tests.pruning.handmade import stack_inputs, text_and_kept_rows
from tests.tiny_models import QUESTION, TINY_SPECS, noise_image, tiny_adapter
from workbench.pruning.executor import Job, execute, execute_batch
from workbench.pruning.flops import DecoderShape, prefill_flops
from workbench.pruning.plan import PRE_LLM, KeepPlan, PlanError, Stage


def case(seed: int = 0, size=None):
    adapter = tiny_adapter("llava_next")
    return adapter, adapter.prepare(noise_image(size or TINY_SPECS["llava_next"].image_size, seed=seed), QUESTION)


def every_third(n: int, offset: int = 0) -> tuple[int, ...]:
    return tuple(range(offset, n, 3))


def plan(n: int, kept, separators: str = "dropped", position: str = "reindex", later=()) -> KeepPlan:
    stages = (Stage(PRE_LLM, kept, position=position, separators=separators),) + tuple(later)
    return KeepPlan("test", len(stages[-1].kept), n, stages)


# --- the plan ------------------------------------------------------------------------------------

def test_the_policy_travels_with_the_plan_and_old_plans_keep_separators():
    dropped = plan(10, (1, 4))
    assert dropped.stages[0].separators == "dropped"
    assert KeepPlan.from_dict(json.loads(json.dumps(dropped.to_dict()))) == dropped
    old = dropped.to_dict()
    del old["stages"][0]["separators"]  # plans written before the field existed
    assert KeepPlan.from_dict(old).stages[0].separators == "kept"
    assert Stage(PRE_LLM, (1,)).separators == "kept"



@pytest.mark.parametrize("where", [2, "tower:1"])
def test_only_the_pre_llm_stage_can_drop_separators(where):
    with pytest.raises(PlanError, match="only the 'pre_llm' stage can leave the layout's separators out"):
        Stage(where, (1,), separators="dropped")
    with pytest.raises(PlanError, match=r"separators must be one of \('kept', 'dropped'\)"):
        Stage(PRE_LLM, (1,), separators="hidden")


# --- the executor --------------------------------------------------------------------------------

@pytest.mark.parametrize("position", ["reindex", "original"])
def test_the_llm_gets_text_and_kept_patches_only_and_its_logits_are_the_models_on_them(position):
    adapter, prepared = case()
    layout = prepared.layout
    assert len(layout.separators) > 0
    n, depth = layout.n_tokens, len(adapter.decoder_layers())
    kept = every_third(n)
    execution, embeds, positions = stack_inputs(
        adapter, lambda: execute(adapter, prepared, plan(n, kept, position=position), 0))
    inputs = adapter.llm_inputs(prepared.inputs)
    rows = text_and_kept_rows(prepared, kept)
    length = layout.sequence_length - n + len(kept) - len(layout.separators)
    assert len(rows) == length
    torch.testing.assert_close(embeds, inputs.inputs_embeds[:, rows], atol=0, rtol=0)
    expected_positions = torch.arange(length)[None] if position == "reindex" else inputs.position_ids[:, rows]
    assert torch.equal(positions.cpu(), expected_positions.cpu())
    assert execution.tokens_per_layer == (length,) * depth
    assert execution.visual_tokens_per_layer == (len(kept),) * depth
    shape = DecoderShape.of(adapter.language_model().config)
    assert prefill_flops(shape, execution.tokens_per_layer) == depth * shape.layer_flops(length)
    with torch.no_grad():  # the model by hand on that sequence
        expected = adapter.model(inputs_embeds=inputs.inputs_embeds[:, rows], position_ids=expected_positions,
                                 logits_to_keep=1).logits[0, -1]
    torch.testing.assert_close(execution.logits, expected.float(), atol=1e-5, rtol=1e-5)

    kept_run = execute(adapter, prepared, plan(n, kept, separators="kept", position=position), 0)
    assert kept_run.tokens_per_layer == (length + len(layout.separators),) * depth
    assert not torch.equal(kept_run.logits, execution.logits)


def test_a_later_stage_inside_the_llm_works_on_the_shorter_sequence():
    adapter, prepared = case()
    n, depth = prepared.layout.n_tokens, len(adapter.decoder_layers())
    kept = every_third(n)
    seen = []

    def callback(layer, state):
        seen.append((layer, len(state.separator_rows), len(state.visual_indices)))
        return Stage(layer, tuple(state.visual_indices[::2])) if layer == 1 else None

    job = plan(n, kept)
    execution = execute(adapter, prepared, job, 2, callback=callback)
    length = prepared.layout.sequence_length - n + len(kept) - len(prepared.layout.separators)
    later = len(kept[::2])
    assert seen[:2] == [(0, 0, len(kept)), (1, 0, len(kept))]
    assert execution.tokens_per_layer == (length,) + (length - len(kept) + later,) * (depth - 1)
    assert execution.plan.stages[0].separators == "dropped"


def test_a_batch_of_different_shapes_equals_each_sample_alone():
    adapter = tiny_adapter("llava_next")
    w, h = TINY_SPECS["llava_next"].image_size
    prepared = [case(0, (w, h))[1], case(1, (h, w))[1]]
    assert prepared[0].layout.sequence_length != prepared[1].layout.sequence_length
    for policies in (("dropped", "dropped"), ("dropped", "kept"), ("kept", "dropped")):
        jobs = [Job(p, plan(p.layout.n_tokens, every_third(p.layout.n_tokens, i), separators=s), gold_answer="red")
                for i, (p, s) in enumerate(zip(prepared, policies))]
        single = [execute(adapter, job.prepared, job.plan, 4, gold_answer=job.gold_answer) for job in jobs]
        batched = execute_batch(adapter, jobs, 4)
        for job, one, together, policy in zip(jobs, single, batched, policies):
            layout = job.prepared.layout
            dropped = len(layout.separators) if policy == "dropped" else 0
            length = layout.sequence_length - layout.n_tokens + len(job.plan.final_kept) - dropped
            assert one.tokens_per_layer == together.tokens_per_layer == (length,) * len(adapter.decoder_layers())
            assert together.answer_ids == one.answer_ids
            assert together.plan.stages[0].separators == policy
            torch.testing.assert_close(together.logits, one.logits, atol=1e-4, rtol=1e-4)
            assert together.gold_logprob == pytest.approx(one.gold_logprob, abs=1e-4)


def test_a_run_given_the_unpruned_prefill_starts_at_the_first_layer():
    adapter, prepared = case()
    n = prepared.layout.n_tokens
    unpruned = execute(adapter, prepared, KeepPlan.keep_all(n, where=None), 0, capture=True)
    job = plan(n, every_third(n))
    scratch = execute(adapter, prepared, job, 3, gold_answer="red")
    resumed = execute(adapter, prepared, job, 3, gold_answer="red", resume=unpruned.prefill)
    assert resumed.first_layer == 0
    assert torch.equal(resumed.logits, scratch.logits)
    assert resumed.tokens_per_layer == scratch.tokens_per_layer
    assert resumed.tokens_per_layer[0] < unpruned.tokens_per_layer[0] - n + len(job.final_kept)


def test_a_counterfactual_restore_keeps_the_policy():
    restored = restore_plan(plan(10, (1, 4)), [2])
    assert restored.stages[0].kept == (1, 2, 4) and restored.stages[0].separators == "dropped"
