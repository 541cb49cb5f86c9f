"""The executor: pruning before and inside the LLM, merges, generation on a pruned cache, callbacks.

Every check compares against something computed another way: the unpruned model itself, or
``reference.reference_logits`` (the decoder layers called by hand on physically shortened
sequences, without a cache).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.conftest import ALL_MODELS, SHIPPED, adapter_and_input, sample_for
from tests.pruning.reference import HeadCalls, LayerIO, reference_logits
from workbench.pruning.executor import ExecutionError, answer_tokens, execute
from workbench.pruning.plan import Append, KeepPlan, Merge, PlanError, Stage


def every_other(n: int, start: int = 0, step: int = 2) -> tuple[int, ...]:
    return tuple(range(start, n, step))


# --- identity ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ALL_MODELS)
def test_keep_all_plan_reproduces_the_unpruned_model(model):
    adapter, prepared, _ = adapter_and_input(model)
    with torch.no_grad():
        # generate's prefill computes the head on the last position only, as the executor does
        last_only = adapter.model(**prepared.inputs, logits_to_keep=1).logits[0, -1].float()
        full = adapter.model(**prepared.inputs).logits[0, -1].float()
    _, image, question, _ = sample_for(model)
    answer = adapter.answer_batch([image], [question], max_new_tokens=8)[0]  # model.generate
    length = prepared.inputs["input_ids"].shape[1]
    for where in ("pre_llm", 1, None):
        plan = KeepPlan.keep_all(prepared.layout.n_tokens, where=where)
        execution = execute(adapter, prepared, plan, max_new_tokens=8)
        assert torch.equal(execution.logits, last_only), where
        torch.testing.assert_close(execution.logits, full, atol=1e-6, rtol=1e-6)
        assert execution.answer_ids == answer.token_ids, where
        assert execution.answer == answer.text
        assert execution.answer_logprob == pytest.approx(answer.logprob, abs=1e-4)
        assert execution.tokens_per_layer == (length,) * len(adapter.decoder_layers())
        assert execution.plan == plan


# --- pre-LLM -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("position", ["original", "reindex"])
def test_pre_llm_drop_equals_physically_removed_rows(shipped, position):
    adapter, prepared, _ = shipped
    n = prepared.layout.n_tokens
    kept = every_other(n, 1, 3)
    plan = KeepPlan("test", len(kept), n, (Stage("pre_llm", kept, position=position),))
    execution = execute(adapter, prepared, plan, max_new_tokens=0)

    # Independent: the whole wrapper model run on the shortened embeddings, positions given.
    inputs = adapter.llm_inputs(prepared.inputs)
    keep = np.ones(inputs.inputs_embeds.shape[1], dtype=bool)
    keep[prepared.layout.positions] = False
    keep[prepared.layout.positions[list(kept)]] = True
    rows = torch.from_numpy(np.flatnonzero(keep))
    positions = torch.arange(len(rows))[None] if position == "reindex" else inputs.position_ids[:, rows]
    if position == "reindex":
        assert not torch.equal(positions, inputs.position_ids[:, rows])  # the policies really differ
    with torch.no_grad():
        expected = adapter.model(inputs_embeds=inputs.inputs_embeds[:, rows], position_ids=positions,
                                 attention_mask=torch.ones(1, len(rows), dtype=torch.long), logits_to_keep=1).logits[0, -1]
    assert torch.equal(execution.logits, expected)
    depth = len(adapter.decoder_layers())
    assert execution.tokens_per_layer == (len(rows),) * depth
    assert execution.visual_tokens_per_layer == (len(kept),) * depth
    assert execution.final_kept == kept


def test_position_policies_give_different_answers_to_the_model(shipped):
    adapter, prepared, _ = shipped
    n = prepared.layout.n_tokens
    runs = [execute(adapter, prepared, KeepPlan("t", 10, n, (Stage("pre_llm", tuple(range(10)), position=p),)),
                    max_new_tokens=0) for p in ("original", "reindex")]
    assert not torch.equal(runs[0].logits, runs[1].logits)


# --- in-LLM -----------------------------------------------------------------------------------------

def test_in_llm_drop_layers_before_k_see_everything_after_k_only_the_kept(shipped):
    adapter, prepared, _ = shipped
    n, k = prepared.layout.n_tokens, 2
    kept = every_other(n, 0, 4)
    with LayerIO(adapter) as unpruned:
        execute(adapter, prepared, KeepPlan.keep_all(n, where=None), max_new_tokens=0)
    with LayerIO(adapter) as pruned:
        execution = execute(adapter, prepared, KeepPlan("t", len(kept), n, (Stage(k, kept),)), max_new_tokens=0)
    length = prepared.layout.sequence_length
    for layer in range(k):
        assert pruned.inputs[layer].shape[1] == length
        assert torch.equal(pruned.outputs[layer], unpruned.outputs[layer])
    drop = np.setdiff1d(np.arange(n), kept)
    rows = torch.from_numpy(np.setdiff1d(np.arange(length), prepared.layout.positions[drop]))
    assert torch.equal(pruned.inputs[k], unpruned.outputs[k - 1][:, rows])
    assert pruned.outputs[k].shape[1] == len(rows)
    after = len(adapter.decoder_layers()) - k
    assert execution.tokens_per_layer == (length,) * k + (len(rows),) * after
    assert execution.visual_tokens_per_layer == (n,) * k + (len(kept),) * after
    torch.testing.assert_close(execution.logits, reference_logits(adapter, prepared, execution.plan)[-1],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["original", "reindex"])
def test_two_stages_match_the_cache_free_reference(shipped, position):
    adapter, prepared, _ = shipped
    n = prepared.layout.n_tokens
    first, second = every_other(n), every_other(n, 0, 6)
    plan = KeepPlan("t", len(second), n, (Stage("pre_llm", first), Stage(1, second, position=position)))
    execution = execute(adapter, prepared, plan, max_new_tokens=0)
    torch.testing.assert_close(execution.logits, reference_logits(adapter, prepared, plan)[-1], atol=1e-5, rtol=1e-5)


# --- merges ----------------------------------------------------------------------------------------

def test_pre_llm_merge_puts_the_mean_embedding_at_the_target_row(shipped):
    adapter, prepared, _ = shipped
    n, (i, j) = prepared.layout.n_tokens, (5, 6)
    kept = tuple(t for t in range(n) if t != j)
    plan = KeepPlan("t", n - 1, n, (Stage("pre_llm", kept, merges=(Merge(i, (j,), (0.5, 0.5)),)),))
    with LayerIO(adapter) as seen:
        execute(adapter, prepared, plan, max_new_tokens=0)
    embeds = adapter.llm_inputs(prepared.inputs).inputs_embeds
    pi, pj = prepared.layout.positions[[i, j]]
    row_of_i = pi  # j comes after i, so i's row does not move
    torch.testing.assert_close(seen.inputs[0][0, row_of_i], (embeds[0, pi] + embeds[0, pj]) / 2, atol=1e-7, rtol=0)
    assert seen.inputs[0].shape[1] == embeds.shape[1] - 1
    assert torch.equal(seen.inputs[0][0, pj], embeds[0, pj + 1])  # j's row is gone


def test_in_llm_merge_uses_the_hidden_states_entering_the_layer(shipped):
    adapter, prepared, _ = shipped
    n, (i, j, k) = prepared.layout.n_tokens, (7, 3, 2)
    kept = tuple(t for t in range(n) if t not in (j, k))
    merge = Merge(i, (j, k), (0.5, 0.25, 0.25))
    plan = KeepPlan("t", len(kept), n, (Stage(1, kept, merges=(merge,)),))
    with LayerIO(adapter) as seen:
        execution = execute(adapter, prepared, plan, max_new_tokens=0)
    before = seen.outputs[0][0]
    pi, pj, pk = prepared.layout.positions[[i, j, k]]
    expected = 0.5 * before[pi] + 0.25 * before[pj] + 0.25 * before[pk]
    row_of_i = pi - 2  # j and k sit before i
    torch.testing.assert_close(seen.inputs[1][0, row_of_i], expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(execution.logits, reference_logits(adapter, prepared, plan)[-1], atol=1e-5, rtol=1e-5)


# --- appended tokens -------------------------------------------------------------------------------

@pytest.mark.parametrize("position", ["original", "reindex"])
def test_in_llm_appended_token_is_the_weighted_sum_placed_after_the_visual_block(shipped, position):
    adapter, prepared, _ = shipped
    n, k, depth = prepared.layout.n_tokens, 2, len(adapter.decoder_layers())
    kept = tuple(sorted(every_other(n, 0, 4) + (5,)))
    plan = KeepPlan("t", len(kept), n, (Stage(k, kept, appends=(Append(5, (6, 7), (0.5, 0.3, 0.2)),), position=position),))
    with LayerIO(adapter) as seen:
        execution = execute(adapter, prepared, plan, max_new_tokens=0)
    before, visual = seen.outputs[k - 1][0], prepared.layout.positions
    expected = 0.5 * before[visual[5]] + 0.3 * before[visual[6]] + 0.2 * before[visual[7]]
    # The new row comes right after every surviving row up to the image's last token (5's own row left).
    end = int(visual.max())
    row = int(sum(1 for r in range(end + 1) if r not in set(visual.tolist())) + len(kept) - 1)
    torch.testing.assert_close(seen.inputs[k][0, row], expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(seen.inputs[k][0, row + 1], before[end + 1])  # the text follows it
    assert torch.equal(seen.inputs[k][0, row - 1], before[visual[kept[-1]]])  # the last kept token precedes it
    # later layers process it: it counts as a visual token of every layer from k on
    length = prepared.layout.sequence_length
    assert execution.tokens_per_layer == (length,) * k + (length - n + len(kept),) * (depth - k)
    assert execution.visual_tokens_per_layer == (n,) * k + (len(kept),) * (depth - k)
    assert seen.inputs[k + 1].shape[1] == length - n + len(kept)
    torch.testing.assert_close(execution.logits, reference_logits(adapter, prepared, plan)[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["original", "reindex"])
def test_appended_tokens_before_the_llm_and_again_inside_it_match_the_cache_free_reference(shipped, position):
    adapter, prepared, _ = shipped
    n = prepared.layout.n_tokens
    first = tuple(sorted(every_other(n) + (1, 3)))
    moved, made = Append(3, (), (1.0,), after=8), Append(1, (5, 7), (0.25, 0.5, 0.25))
    second = (0, 1, 3, 6)  # keeps both appended tokens; 8 is the one 3 was moved after
    again = Append(0, (2, 4), (0.2, 0.4, 0.4), after=1)  # appended after an appended token, from a later stage
    plan = KeepPlan("t", len(second), n, (Stage("pre_llm", first, appends=(moved, made), position=position),
                                          Stage(1, second, appends=(again,), position=position)))
    with LayerIO(adapter) as seen:
        execution = execute(adapter, prepared, plan, max_new_tokens=0)
    embeds = adapter.llm_inputs(prepared.inputs).inputs_embeds[0]
    visual = prepared.layout.positions
    assert np.array_equal(visual, np.arange(visual[0], visual[0] + n))  # one block of image rows
    row = int(visual[0]) + [t for t in first if t not in (1, 3)].index(8)  # 1 and 3 left their places
    assert torch.equal(seen.inputs[0][0, row], embeds[visual[8]])
    assert torch.equal(seen.inputs[0][0, row + 1], embeds[visual[3]])  # 3 sits right after 8
    torch.testing.assert_close(execution.logits, reference_logits(adapter, prepared, plan)[-1], atol=1e-5, rtol=1e-5)
    assert execution.visual_tokens_per_layer[1:] == (len(second),) * (len(adapter.decoder_layers()) - 1)


# --- generation on a pruned cache ------------------------------------------------------------------

def _pruned_plans(n: int, one_axis_positions: bool):
    plans = [
        KeepPlan("pre", n // 2, n, (Stage("pre_llm", every_other(n)),)),
        KeepPlan("in", n // 4, n, (Stage(1, every_other(n, 1, 4)),)),
        KeepPlan("both", n // 4, n, (Stage("pre_llm", every_other(n)), Stage(1, every_other(n, 0, 4)))),
        KeepPlan("at0", n // 3, n, (Stage(0, every_other(n, 0, 3)),)),
        KeepPlan("appended", n // 4, n, (Stage("pre_llm", every_other(n, 0, 2), appends=(Append(2, (1,), (.5, .5), after=4),)),
                                          Stage(1, (0, 2, 4), appends=(Append(0, (6,), (.7, .3)),)))),
    ]
    if one_axis_positions:
        plans += [
            KeepPlan("pre-reindex", n // 2, n, (Stage("pre_llm", every_other(n), position="reindex"),)),
            KeepPlan("in-reindex", n // 4, n, (Stage("pre_llm", every_other(n)),
                                               Stage(1, every_other(n, 0, 4), position="reindex"))),
            KeepPlan("appended-reindex", 3, n, (Stage(1, (0, 2, 4), position="reindex",
                                                      appends=(Append(2, (1, 3), (.2, .4, .4)),)),)),
        ]
    return plans


@pytest.mark.parametrize("model", ALL_MODELS)
def test_decode_steps_on_the_pruned_cache_equal_a_cache_free_forward(model):
    adapter, prepared, _ = adapter_and_input(model)
    n = prepared.layout.n_tokens
    one_axis = adapter.llm_inputs(prepared.inputs).position_ids.dim() == 2
    gold = "large red circle"
    gold_ids = answer_tokens(adapter, prepared.prompt, gold)
    assert len(gold_ids) >= 2
    for plan in _pruned_plans(n, one_axis):
        # Teacher forcing: every step's logits against the reference over prompt + gold tokens.
        with HeadCalls(adapter) as head:
            execution = execute(adapter, prepared, plan, max_new_tokens=1, gold_answer=gold)
        expected = reference_logits(adapter, prepared, plan, gold_ids[:-1])
        steps = torch.stack(head.outputs[: len(gold_ids)])
        torch.testing.assert_close(steps, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{plan.method}: {m}")
        logp = torch.log_softmax(expected.float(), -1)[torch.arange(len(gold_ids)), torch.tensor(gold_ids)].sum()
        assert execution.gold_logprob == pytest.approx(float(logp), abs=1e-4)
        # Greedy: each token is the reference's argmax, and the log-prob adds up.
        execution = execute(adapter, prepared, plan, max_new_tokens=5)
        ids = list(execution.answer_ids)
        if ids:
            expected = reference_logits(adapter, prepared, plan, ids[:-1])
            assert expected.argmax(-1).tolist() == ids, plan.method
            logp = torch.log_softmax(expected.float(), -1)[torch.arange(len(ids)), torch.tensor(ids)].sum()
            assert execution.answer_logprob == pytest.approx(float(logp), abs=1e-4)


@pytest.mark.parametrize("gold", ["large red circle", "yes"])
def test_teacher_forcing_a_gold_answer_leaves_the_greedy_answer_as_it_is_without_one(gold):
    """Teacher forcing runs on the prefill's cache before greedy decoding does: a gold answer of
    several tokens must be forced on a copy, and a one-token one needs no decoder step at all."""
    adapter, prepared, _ = adapter_and_input(SHIPPED)
    n = prepared.layout.n_tokens
    for plan in (KeepPlan.keep_all(n), KeepPlan("half", n // 2, n, (Stage(1, every_other(n), position="reindex"),))):
        alone = execute(adapter, prepared, plan, max_new_tokens=5)
        forced = execute(adapter, prepared, plan, max_new_tokens=5, gold_answer=gold)
        assert forced.answer_ids == alone.answer_ids
        assert forced.answer_logprob == pytest.approx(alone.answer_logprob, abs=1e-5)
        assert forced.gold_logprob is not None and alone.gold_logprob is None


def test_keep_all_gold_logprob_matches_a_teacher_forced_full_forward(shipped):
    adapter, prepared, gold = shipped
    execution = execute(adapter, prepared, KeepPlan.keep_all(prepared.layout.n_tokens), max_new_tokens=0,
                        gold_answer=gold)
    ids = answer_tokens(adapter, prepared.prompt, gold)
    inputs = dict(prepared.inputs)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([ids])], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        logits = adapter.model(**inputs).logits[0, -len(ids) - 1: -1]
    expected = torch.log_softmax(logits.float(), -1)[torch.arange(len(ids)), torch.tensor(ids)].sum()
    assert execution.gold_logprob == pytest.approx(float(expected), abs=1e-4)
    assert execution.answer_ids == ()  # max_new_tokens=0: prefill only


# --- callbacks ------------------------------------------------------------------------------------

def test_callback_stage_equals_the_same_stage_in_the_plan(shipped):
    adapter, prepared, _ = shipped
    n = prepared.layout.n_tokens
    first = every_other(n)
    plan = KeepPlan("cb", n // 4, n, (Stage("pre_llm", first),))
    seen = {}

    def halve(layer, state):
        seen[layer] = state
        if layer != 1:
            return None
        keep = state.visual_indices[: len(state.visual_indices) // 2]
        scores = np.full(n, np.nan)
        scores[state.visual_indices] = -np.arange(len(state.visual_indices))
        return Stage(1, tuple(keep), scores=tuple(scores))

    execution = execute(adapter, prepared, plan, max_new_tokens=0, callback=halve)
    assert sorted(seen) == list(range(len(adapter.decoder_layers())))
    state = seen[1]
    assert tuple(state.visual_indices) == first  # it saw the pre-LLM pruning
    assert state.hidden_states.shape[1] == prepared.layout.sequence_length - (n - len(first))
    assert len(state.text_rows) > 0 and state.text_rows.max() == state.hidden_states.shape[1] - 1
    assert tuple(seen[2].visual_indices) == first[: len(first) // 2]  # and the next layer its own stage
    applied = execution.plan
    assert [s.where for s in applied.stages] == ["pre_llm", 1]
    assert applied.stages[1].kept == first[: len(first) // 2]
    static = execute(adapter, prepared, applied, max_new_tokens=0)
    assert torch.equal(static.logits, execution.logits)


def test_layer_state_attention_matches_eager_attention(shipped):
    adapter, prepared, _ = shipped
    n = prepared.layout.n_tokens
    captured = {}

    def grab(layer, state):
        if layer == 1:
            last = torch.tensor([state.n_rows - 1])
            captured["probs"] = state.attention(last)
            captured["visual"] = state.attention(state.visual_rows[:3])
        return None

    execute(adapter, prepared, KeepPlan.keep_all(n, where=None), max_new_tokens=0, callback=grab)
    model = adapter.model
    installed = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(**prepared.inputs, output_attentions=True).attentions[1][0]
    finally:
        model.set_attn_implementation(installed)
    torch.testing.assert_close(captured["probs"][:, 0], eager[:, -1], atol=1e-5, rtol=1e-5)
    rows = torch.from_numpy(prepared.layout.positions[:3])
    torch.testing.assert_close(captured["visual"], eager[:, rows], atol=1e-5, rtol=1e-5)


def test_layer_state_attention_on_a_pruned_sequence_is_a_distribution(shipped):
    adapter, prepared, _ = shipped
    n = prepared.layout.n_tokens
    out = {}

    def grab(layer, state):
        if layer == 2:
            out["probs"] = state.attention(state.text_rows)
            out["rows"] = state.n_rows
        return None

    plan = KeepPlan("t", n // 4, n, (Stage("pre_llm", every_other(n)), Stage(1, every_other(n, 0, 4))))
    execution = execute(adapter, prepared, plan, max_new_tokens=0, callback=grab)
    assert out["probs"].shape[-1] == out["rows"] == execution.tokens_per_layer[2]
    torch.testing.assert_close(out["probs"].sum(-1), torch.ones(out["probs"].shape[:2]))


# --- bad plans ------------------------------------------------------------------------------------

def test_plans_that_do_not_fit_the_sample_or_model_fail_clearly(shipped):
    adapter, prepared, _ = shipped
    n = prepared.layout.n_tokens
    with pytest.raises(PlanError, match="plan is for 10 visual tokens, this sample has 144"):
        execute(adapter, prepared, KeepPlan.keep_all(10))
    depth = len(adapter.decoder_layers())
    with pytest.raises(ExecutionError, match=f"before layers \\[7\\]; the decoder has {depth} layers"):
        execute(adapter, prepared, KeepPlan("t", 1, n, (Stage(7, (0,)),)))


def test_bad_callback_stages_fail_clearly(shipped):
    adapter, prepared, _ = shipped
    n = prepared.layout.n_tokens
    first = KeepPlan("t", 2, n, (Stage(1, (0, 1)),))
    with pytest.raises(PlanError, match="returned a stage for before decoder layer 2"):
        execute(adapter, prepared, KeepPlan.keep_all(n, where=None), callback=lambda i, s: Stage(2, (0,)) if i == 1 else None)
    with pytest.raises(PlanError, match="both the plan and the callback prune before layer 1"):
        execute(adapter, prepared, first, callback=lambda i, s: Stage(1, (0,)) if i == 1 else None)
    with pytest.raises(PlanError, match="keeps \\[5\\] which are no longer in the sequence"):
        execute(adapter, prepared, first, callback=lambda i, s: Stage(2, (0, 5)) if i == 2 else None)


def test_reindex_with_mrope_positions_is_refused():
    adapter, prepared, _ = adapter_and_input("qwen2_vl")
    n = prepared.layout.n_tokens
    for where in ("pre_llm", 1):
        plan = KeepPlan("t", 2, n, (Stage(where, (0, 1), position="reindex"),))
        with pytest.raises(ExecutionError, match="'reindex' needs 1-D position ids"):
            execute(adapter, prepared, plan)


def test_separators_and_text_are_never_dropped():
    """OneVision's layout has separators (row-end newlines); a plan keeping no visual token at all
    leaves exactly the non-visual rows."""
    model = "llava_onevision" if "llava_onevision" in ALL_MODELS else SHIPPED
    adapter, prepared, _ = adapter_and_input(model)
    layout = prepared.layout
    plan = KeepPlan("none", 0, layout.n_tokens, (Stage("pre_llm", ()),))
    execution = execute(adapter, prepared, plan, max_new_tokens=0)
    assert execution.tokens_per_layer[0] == layout.sequence_length - layout.n_tokens
    assert execution.visual_tokens_per_layer[0] == 0
