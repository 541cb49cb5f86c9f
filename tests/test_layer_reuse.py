"""No layer computed twice: a run that first prunes before decoder layer k starts from the unpruned
prefill's state at layer k, with exactly the logits of running from the first layer, and layers
below k are not called."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.pruning.conftest import ALL_MODELS, adapter_and_input
from workbench import pipeline
from workbench.pipeline import plan_json
from workbench.pruning.executor import Job, execute, execute_batch
from workbench.pruning.layer_state import hooks_suspended
from workbench.pruning.method import ModelFacts, SelectionContext
from workbench.pruning.plan import Append, KeepPlan, Stage
from workbench.pruning.recorded_prefill import recorded_prefill
from workbench.pruning.registry import create_method
from workbench.pruning.run import record_needs


@contextlib.contextmanager
def prefill_calls(adapter):
    """Per decoder layer, how often it ran on a whole sequence (decode steps feed one row; a method
    re-running a layer up to its attention to read it, ``LayerState``, is not a layer computed)."""
    counts = [0] * len(adapter.decoder_layers())

    def counter(index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            counts[index] += int(hidden.shape[1] > 1 and not hooks_suspended.get())
        return hook

    handles = [layer.register_forward_pre_hook(counter(i), with_kwargs=True)
               for i, layer in enumerate(adapter.decoder_layers())]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("model", ALL_MODELS)
def test_a_resumed_run_equals_running_from_the_first_layer(model):
    adapter, prepared, _ = adapter_and_input(model)
    gold = "large red circle"  # several tokens: teacher forcing decodes on the replayed keys/values
    n, depth = prepared.layout.n_tokens, len(adapter.decoder_layers())
    unpruned = execute(adapter, prepared, KeepPlan.keep_all(n, where=None), 0, capture=True)
    kept = tuple(range(0, n, 3))
    plans = [(k, KeepPlan("at-k", len(kept), n, (Stage(k, kept),))) for k in range(1, depth)]
    # tokens appended at k (rows the unpruned prefill never had) resume as exactly
    plans += [(k, KeepPlan("append-at-k", len(kept), n, (Stage(k, kept, appends=(Append(3, (1, 2), (.4, .3, .3)),)),)))
              for k in range(1, depth)]
    for k, plan in plans:
        scratch = execute(adapter, prepared, plan, 4, gold_answer=gold)
        with prefill_calls(adapter) as calls:
            resumed = execute(adapter, prepared, plan, 4, gold_answer=gold, resume=unpruned.prefill)
        assert torch.equal(resumed.logits, scratch.logits), k
        assert resumed.answer_ids == scratch.answer_ids and resumed.gold_logprob == scratch.gold_logprob
        assert resumed.tokens_per_layer == scratch.tokens_per_layer
        assert resumed.first_layer == k
        assert calls == [0] * k + [1] * (depth - k), k


@pytest.mark.parametrize("model", ALL_MODELS)
def test_the_unpruned_run_goes_on_from_the_recorded_forward_exactly(model):
    """The recording's forward is the unpruned prefill: the run taking it computes no decoder
    layer and has exactly the logits, answer and prefill of one run from the first layer."""
    adapter, prepared, _ = adapter_and_input(model)
    gold = "large red circle"
    n = prepared.layout.n_tokens
    scratch = execute(adapter, prepared, KeepPlan.keep_all(n, where=None), 4, gold_answer=gold, capture=True)
    with recorded_prefill(adapter, prepared) as begun:
        record_needs(adapter, prepared, [create_method("fastv")])
    assert begun.prefill is not None and begun.prefill.depth == len(adapter.decoder_layers())
    with prefill_calls(adapter) as calls:
        resumed = execute(adapter, prepared, KeepPlan.keep_all(n, where=None), 4, gold_answer=gold,
                          resume=begun.prefill, capture=True)
    assert resumed.first_layer == begun.prefill.depth and calls == [0] * len(calls)
    assert torch.equal(resumed.logits, scratch.logits)
    assert resumed.answer_ids == scratch.answer_ids
    assert resumed.gold_logprob == scratch.gold_logprob
    for mine, theirs in zip(resumed.prefill.inputs + resumed.prefill.keys + resumed.prefill.values,
                            scratch.prefill.inputs + scratch.prefill.keys + scratch.prefill.values):
        assert torch.equal(mine, theirs)


def test_a_forward_with_its_own_cache_inside_a_recorded_prefill_keeps_it():
    """A generation on the sample's input (a saliency pass's greedy answer), or any forward of that
    input bringing its own cache, is not taken for the recorded forward: its cache stays its own
    and its answer is unchanged."""
    from transformers import DynamicCache

    adapter, prepared, _ = adapter_and_input("shipped")
    alone = adapter.model.generate(**prepared.inputs, max_new_tokens=6, do_sample=False)
    own = DynamicCache(config=adapter.language_model().config)
    with recorded_prefill(adapter, prepared) as begun, torch.no_grad():
        inside = adapter.model.generate(**prepared.inputs, max_new_tokens=6, do_sample=False)
        # a forward of the sample's own input that brings its own cache keeps it
        adapter.model(**prepared.inputs, cache=own, use_cache=True)
    assert torch.equal(inside, alone) and begun.prefill is None
    assert own.get_seq_length() == prepared.inputs["input_ids"].shape[1]


def test_a_plan_that_prunes_before_the_llm_starts_at_the_first_layer():
    adapter, prepared, _ = adapter_and_input("shipped")
    n = prepared.layout.n_tokens
    unpruned = execute(adapter, prepared, KeepPlan.keep_all(n, where=None), 0, capture=True)
    plan = KeepPlan("pre", 2, n, (Stage("pre_llm", (0, 1)),))
    with prefill_calls(adapter) as calls:
        resumed = execute(adapter, prepared, plan, 0, resume=unpruned.prefill)
    assert resumed.first_layer == 0 and calls == [1] * len(calls)
    assert torch.equal(resumed.logits, execute(adapter, prepared, plan, 0).logits)


@pytest.mark.parametrize("name", ["fastv", "pyramiddrop", "sparsevlm", "feather"])
def test_methods_that_choose_inside_the_llm_resume_exactly(name):
    """Callbacks are asked on the unpruned states until they first prune, and start there."""
    adapter, prepared, gold = adapter_and_input("shipped")
    facts, method = ModelFacts.of(adapter), create_method(name)
    recording = record_needs(adapter, prepared, [method])
    unpruned = execute(adapter, prepared, KeepPlan.keep_all(prepared.layout.n_tokens, where=None), 0, capture=True)

    def run(resume):
        context = SelectionContext(prepared.layout, 0.25, recording, facts)
        return execute(adapter, prepared, method.select(context), 4, gold_answer=gold,
                       callback=method.layer_callback(context), resume=resume)

    scratch = run(None)
    with prefill_calls(adapter) as calls:
        resumed = run(unpruned.prefill)
    first = next(s.where for s in scratch.plan.stages)
    assert resumed.first_layer == first > 0
    assert calls[:first] == [0] * first
    assert torch.equal(resumed.logits, scratch.logits)
    assert plan_json(resumed.plan) == plan_json(scratch.plan) and resumed.answer_ids == scratch.answer_ids


def test_a_batch_resumes_at_its_earliest_first_layer_exactly():
    adapter, prepared, gold = adapter_and_input("shipped")
    n, depth = prepared.layout.n_tokens, len(adapter.decoder_layers())
    unpruned = execute(adapter, prepared, KeepPlan.keep_all(n, where=None), 0, capture=True)
    plans = [KeepPlan("late", 5, n, (Stage(depth - 1, tuple(range(5))),)),
             KeepPlan("mid", 9, n, (Stage(2, tuple(range(0, 18, 2))),))]
    scratch = execute_batch(adapter, [Job(prepared, plan, gold_answer=gold) for plan in plans], 4)
    with prefill_calls(adapter) as calls:
        resumed = execute_batch(adapter, [Job(prepared, plan, gold_answer=gold, resume=unpruned.prefill)
                                          for plan in plans], 4)
    assert calls == [0, 0] + [1] * (depth - 2)
    for one, other in zip(resumed, scratch):
        assert torch.equal(one.logits, other.logits) and one.answer_ids == other.answer_ids


def test_a_sweep_of_methods_and_budgets_runs_the_layers_below_their_first_stage_once():
    """The pipeline keeps the unpruned run's prefill: every later in-LLM run only adds its suffix."""
    from workbench.samples import read_dataset

    adapter, _, _ = adapter_and_input("shipped")
    sample = read_dataset("data/eval/samples.jsonl", limit=1)[0]
    methods = [create_method(name) for name in ("fastv", "pyramiddrop")]
    fresh = pipeline.prepare_sample(adapter, sample, methods)
    with prefill_calls(adapter) as calls:
        ready = pipeline.prepare_sample(adapter, sample, methods)
        assert calls == [1] * len(calls), "the recording runs the whole forward"
        pipeline.run(adapter, ready, None)
        assert calls == [1] * len(calls), "the unpruned run goes on from the recorded forward"
        reused = [pipeline.run(adapter, ready, m, b) for m in methods for b in (0.5, 0.25, 0.1)]
    assert calls[0] == 1, "layer 0 ran again after the unpruned run"
    assert calls[-1] == 1 + len(reused)
    # The rows are those of runs from the first layer (timings aside).
    timing = {"select_time_s", "prefill_time_s", "wall_time_s"}
    for result, m_b in zip(reused, [(m, b) for m in methods for b in (0.5, 0.25, 0.1)]):
        alone = pipeline.run(adapter, fresh, *m_b)
        assert {k: v for k, v in result.row().items() if k not in timing} == \
            {k: v for k, v in alone.row().items() if k not in timing}


def test_a_run_no_other_starts_from_keeps_no_prefill():
    """A control's unpruned run (``keep_prefill=False``) gives the row a kept one gives, without
    holding every layer's inputs and cache for runs that will never come."""
    from workbench.samples import read_dataset

    adapter, _, _ = adapter_and_input("shipped")
    sample = read_dataset("data/eval/samples.jsonl", limit=1)[0]
    kept, dropped = (pipeline.prepare_sample(adapter, sample) for _ in range(2))
    with_prefill = pipeline.run_batch(adapter, [kept], None)[0]
    without = pipeline.run_batch(adapter, [dropped], None, keep_prefill=False)[0]
    assert kept.unpruned_prefill is not None and dropped.unpruned_prefill is None
    timing = {"select_time_s", "prefill_time_s", "wall_time_s"}
    assert {k: v for k, v in with_prefill.row().items() if k not in timing} == \
        {k: v for k, v in without.row().items() if k not in timing}


IN_LLM = [name for name in ("fastv", "pyramiddrop", "sparsevlm", "feather", "dart", "transprune", "vscan",
                            "gprune", "topv", "todre", "aim")]


@pytest.mark.parametrize("name", IN_LLM)
def test_every_in_llm_method_gives_after_the_unpruned_run_the_row_it_gives_alone(name):
    """The sweep's order (unpruned run first, then each method resuming from its prefill) changes
    no row, including for methods that hook the layers they watch (they run every layer live)."""
    from workbench.samples import read_dataset

    adapter, _, _ = adapter_and_input("shipped")
    sample = read_dataset("data/eval/samples.jsonl", limit=1)[0]
    method = create_method(name)
    ready = pipeline.prepare_sample(adapter, sample, [method])
    pipeline.run(adapter, ready, None)
    assert ready.unpruned_prefill is not None
    after = pipeline.run(adapter, ready, method, 0.25)
    alone = pipeline.run(adapter, pipeline.prepare_sample(adapter, sample, [method]), method, 0.25)
    assert after.status == alone.status == "ok", (after.status, after.generation)
    timing = {"select_time_s", "prefill_time_s", "wall_time_s"}
    assert {k: v for k, v in after.row().items() if k not in timing} == \
        {k: v for k, v in alone.row().items() if k not in timing}
