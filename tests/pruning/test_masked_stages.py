"""Masking stages (``Stage.dropped == "masked"``): the dropped tokens stay rows of the sequence, still
computed, with their keys hidden from every query from the stage's layer on, in the prefill and while
decoding. A visible row then computes exactly what it computes when those rows are removed (positions
kept), which is what these tests hold the executor to, on every family, in batches and resumed runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.conftest import ALL_MODELS, SHIPPED, adapter_and_input
from workbench.pruning.executor import Job, execute, execute_batch
from workbench.pruning.plan import Append, KeepPlan, Merge, PlanError, Stage

GOLD = "large red circle"  # several tokens: teacher forcing decodes on the masked cache


def plans(n: int, depth: int, dropped: str):
    """Plans dropping before layer depth - 2 and again before the last layer, the dropped tokens ``dropped``."""
    first, second = tuple(range(0, n, 2)), tuple(range(0, n, 6))
    return [KeepPlan("one", len(first), n, (Stage(depth - 2, first, dropped=dropped),)),
            KeepPlan("two", len(second), n, (Stage(depth - 2, first, dropped=dropped),
                                              Stage(depth - 1, second, dropped=dropped)))]


@pytest.mark.parametrize("model", ALL_MODELS)
def test_masked_tokens_are_computed_but_no_row_sees_them(model):
    adapter, prepared, _ = adapter_and_input(model)
    n, depth = prepared.layout.n_tokens, len(adapter.decoder_layers())
    length = prepared.inputs["input_ids"].shape[1]
    for masked, removed in zip(plans(n, depth, "masked"), plans(n, depth, "removed")):
        hidden = execute(adapter, prepared, masked, 4, gold_answer=GOLD)
        gone = execute(adapter, prepared, removed, 4, gold_answer=GOLD)
        torch.testing.assert_close(hidden.logits, gone.logits, atol=1e-4, rtol=1e-4)
        assert hidden.gold_logprob == pytest.approx(gone.gold_logprob, abs=1e-3)  # decoding hides them too
        assert hidden.answer_ids == gone.answer_ids
        # every row computed (the FLOPs count them); the visible visual tokens as with removal
        assert hidden.tokens_per_layer == (length,) * depth
        assert hidden.visual_tokens_per_layer == gone.visual_tokens_per_layer
        assert [v + m for v, m in zip(hidden.visual_tokens_per_layer, hidden.masked_tokens_per_layer)] == [n] * depth
        assert hidden.masked_tokens_per_layer[:depth - 2] == (0,) * (depth - 2)
        assert hidden.masked_tokens_per_layer[-1] == n - len(masked.final_kept) > 0
        assert gone.masked_tokens_per_layer == (0,) * depth and gone.tokens_per_layer[-1] < length
        assert hidden.plan.stages == masked.stages


def test_a_callback_sees_the_masked_rows_as_queries_with_hidden_keys():
    adapter, prepared, _ = adapter_and_input(SHIPPED)
    n = prepared.layout.n_tokens
    kept = tuple(range(0, n, 2))
    plan = KeepPlan("masked", len(kept), n, (Stage(1, kept, dropped="masked"),))
    seen = {}

    def callback(layer, state):
        seen[layer] = (state, state.attention(torch.arange(state.n_rows)))
        return None

    execute(adapter, prepared, plan, 1, callback=callback)
    before, probs_before = seen[0]
    state, probs = seen[2]
    assert state.n_rows == before.n_rows  # no row left the sequence
    assert list(state.visual_indices) == list(kept)
    masked = state.masked_rows.numpy()
    assert len(masked) == n - len(kept) and not np.isin(masked, state.visual_rows.numpy()).any()
    assert np.array_equal(masked, before.visual_rows.numpy()[~np.isin(before.visual_indices, kept)])
    assert (probs[:, :, masked] == 0).all()  # every query, theirs included, gives them nothing
    assert torch.allclose(probs[:, masked].sum(-1), torch.ones(()))  # and their rows still attend
    assert (probs_before[:, :, masked] > 0).any() and len(before.masked_rows) == 0
    later = seen[3][0]  # the layers still compute the masked rows
    assert not torch.allclose(later.hidden_states[0, masked], state.hidden_states[0, masked])


def test_a_batch_masks_each_sample_as_it_runs_alone_and_a_resumed_run_is_exact():
    adapter, prepared, _ = adapter_and_input(SHIPPED)
    n, depth = prepared.layout.n_tokens, len(adapter.decoder_layers())
    different = KeepPlan("odd", 5, n, (Stage(2, tuple(range(1, n, 7))[:5], dropped="masked"),))
    jobs = [Job(prepared, plan, gold_answer=GOLD) for plan in plans(n, depth, "masked") + [different]]
    single = [execute_batch(adapter, [job], 4)[0] for job in jobs]
    for one, alone in zip(execute_batch(adapter, jobs, 4), single):
        torch.testing.assert_close(one.logits, alone.logits, atol=1e-4, rtol=1e-4)
        assert one.gold_logprob == pytest.approx(alone.gold_logprob, abs=1e-3)
        assert one.answer_ids == alone.answer_ids and one.masked_tokens_per_layer == alone.masked_tokens_per_layer
    unpruned = execute(adapter, prepared, KeepPlan.keep_all(n, where=None), 0, capture=True)
    for job, alone in zip(jobs, single):
        (resumed,) = execute_batch(adapter, [Job(prepared, job.plan, gold_answer=GOLD, resume=unpruned.prefill)], 4)
        assert resumed.first_layer == job.plan.stages[0].where
        assert torch.equal(resumed.logits, alone.logits) and resumed.gold_logprob == alone.gold_logprob
        assert resumed.masked_tokens_per_layer == alone.masked_tokens_per_layer


def test_a_later_removing_stage_takes_the_masked_rows_out():
    adapter, prepared, _ = adapter_and_input(SHIPPED)
    n, depth = prepared.layout.n_tokens, len(adapter.decoder_layers())
    first, second = tuple(range(0, n, 2)), tuple(range(0, n, 4))
    mixed = KeepPlan("mixed", len(second), n, (Stage(1, first, dropped="masked"), Stage(depth - 1, second)))
    removed = KeepPlan("removed", len(second), n, (Stage(1, first), Stage(depth - 1, second)))
    a, b = (execute(adapter, prepared, plan, 2, gold_answer=GOLD) for plan in (mixed, removed))
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    assert a.tokens_per_layer[-1] == b.tokens_per_layer[-1] < a.tokens_per_layer[1]
    assert a.masked_tokens_per_layer[-1] == 0
    with pytest.raises(PlanError, match="keeps"):  # a masked token cannot come back
        execute(adapter, prepared, KeepPlan("back", 2, n, (Stage(1, first, dropped="masked"), Stage(2, (0, 1)))), 1)


def test_a_masking_stage_is_checked_and_round_trips():
    for bad in (dict(where="pre_llm"), dict(where="tower:1"), dict(merges=(Merge(0, (1,), (.5, .5)),)),
                dict(appends=(Append(0, (), (1.0,)),)), dict(position="reindex")):
        with pytest.raises(PlanError, match="masking stage"):
            Stage(**{"where": 2, "kept": (0, 2), "dropped": "masked", **bad})
    with pytest.raises(PlanError, match="dropped must be one of"):
        Stage(2, (0,), dropped="hidden")
    plan = KeepPlan("m", 2, 4, (Stage(2, (0, 2), dropped="masked"),))
    assert KeepPlan.from_dict(plan.to_dict()) == plan
    old = plan.to_dict()
    del old["stages"][0]["dropped"]  # plans written before masking stages existed
    assert KeepPlan.from_dict(old).stages[0].dropped == "removed"
