"""AIM parity, in-LLM stage: the official PageRank pruning, with pruned tokens masked as keys, against
the workbench's executed stages; and the masked run against the model run by hand with that mask.

Official code: LaVi-Lab/AIM (HEAD), other_packages/transformers/src/transformers/models/qwen2/modeling_qwen2.py
- lines 61-78 (get_importance): on the layer's masked attention LOGITS (every query row of the sequence,
  the masked tokens' rows included), ``M = softmax(attn / 0.1)`` per head, ``dist = 1/N`` over all N rows,
  then 5 times ``dist = (dist @ M) * (1 - d) + d / N`` with ``d = 0``, then ``mean(dist ** 2 over heads)
  ** 0.5``; called in the eager attention forward on the prefill (lines 352-360: the logits with the
  layer's causal mask added);
- line 936 (Qwen2Model.forward): ``retain_rate[i] = max(0, 1 - (i - 14 + 1) * 0.125)`` for layer
  ``i >= 14`` of 28, else 1;
- lines 998-1017: after layer i, tokens masked earlier get -1 (``attention_mask == False``), the text
  (system prompt and question) 1.0; ``sort(descending)`` and the first ``int((N - protected) * retain_rate[i]
  + protected)`` stay; ``attention_mask = attention_mask & token_mask`` and the 4-D mask is rebuilt, for
  every later layer; the hidden states keep every row (nothing is sliced), so the masked tokens are still
  computed, and their positions never change;
- lines 81-131 (_prepare_4d_causal_attention_mask_with_cache_position): a 0 in the 2-D mask masks that
  KEY for every query (``masked_fill`` with the dtype's minimum), its own row included;
- lines 986-994: while decoding, each layer gets the mask its prefill ended with (``attention_mask_cache``).
Placement (the method's documented choices, used here too): the code's first layer 14 of 28 is
``first_layer`` 16 of the 32-layer reference, reference layer r placed at ``scaled_layer(r)`` capped at
depth - 2, reference layers landing on one decoder layer fold (the later count wins); top-k ties to the
lower row (stable sort). The LLM's input is the merged sequence of the pre-LLM stage, built with the
merging reference of ``test_aim.py``, in the code's order (``get_2dPool`` returns [unmerged, destinations]
and the features are spliced in as they come, positions 0..L-1).
The eager copy's decoder layers are run by hand; the workbench's stages come from its executor.
``dropped="removed"`` (the old behaviour) is checked against the same rule with the pruned rows removed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import (case, causal_mask, eager_forward, eager_model, labels, language_model,
                                         layer_attention, n_keep, visual_positions, workbench_stages)
from tests.pruning.parity.test_aim import official_aim_merge
from workbench.pruning.executor import Job, answer_tokens, execute_batch
from workbench.pruning.flops import DecoderShape, prefill_flops
from workbench.pruning.layers import scaled_layer
from workbench.pruning.method import ModelFacts, SelectionContext
from workbench.pruning.methods.aim import AIM
from workbench.pruning.plan import PRE_LLM
from workbench.pruning.run import record_needs

BUDGETS = (0.25, 0.5, 1.0)  # the code's 25 % merge, one step, none
TWO_STAGES = {"first_layer": 8, "rate_step": 0.02}  # two stages (92 % then 52 %) on the shipped decoder
VARIANTS = ({},                                  # the default: every visual token gone before the last layer
            {"rate_step": 0.05},                # one stage keeping 20 % on the shipped decoder
            TWO_STAGES,
            {"rate_step": 0.05, "iterations": 2, "damping": 0.15, "temperature": 0.5})
GOLD = "a red circle"  # any text: its teacher-forced log-probability runs the decoding steps


def get_importance(logits: torch.Tensor, tau: float, iters: int, d: float) -> torch.Tensor:
    """[S] importance from the [H, S, S] masked logits (lines 61-78)."""
    m = torch.softmax(logits.double() / tau, dim=-1)
    n = m.shape[-1]
    dist = torch.full((m.shape[0], 1, n), 1.0 / n, dtype=torch.float64)
    for _ in range(iters):
        dist = (dist @ m) * (1 - d) + d / n
    return dist.pow(2).mean(dim=0).pow(0.5)[0]


def merge_steps(n: int, keep: int) -> tuple[int, ...]:
    """The merging steps of the budgets tested here (``test_aim.py``): none at 100 %, ``n // 2`` at 50 %,
    the code's ``n // 2, n // 4`` at 25 %."""
    steps = {n: (), n // 2: (n // 2,), n // 4: (n // 2, n // 4)}
    return steps[keep]


def masked_keys(length: int, hidden: np.ndarray) -> torch.Tensor:
    """[1, 1, S, S] additive mask: causal, and the ``hidden`` rows' keys masked for every query (lines 122-128)."""
    return causal_mask(length).masked_fill(torch.as_tensor(hidden), torch.finfo(torch.float32).min)


def llm_input(adapter, prepared, places):
    """(states [1, L, D], kinds [L]) of the LLM's input: the text rows as embedded and the merged visual
    rows (``places``: {place: weights over the original tokens}, in sequence order) spliced in between."""
    embedded = eager_forward(adapter, prepared).hidden_states[0][0]
    image = visual_positions(prepared)
    assert (np.diff(image) == 1).all()
    features = embedded[torch.as_tensor(image)].double()
    visual = torch.stack([torch.as_tensor(w) @ features for w in places.values()]).to(embedded.dtype)
    states = torch.cat([embedded[:image[0]], visual, embedded[image[-1] + 1:]])[None]
    kinds = np.concatenate([np.full(image[0], -1), list(places), np.full(embedded.shape[0] - image[-1] - 1, -1)])
    return states, kinds


def official_aim_llm(adapter, prepared, budget, first_layer=16, rate_step=0.125, temperature=0.1,
                     iterations=5, damping=0.0, masked=True, code_order=True):
    """{layer: visual tokens visible entering it} for every decoder layer. ``masked=False``: the pruned
    rows are removed instead (the old behaviour); ``code_order=False``: merged tokens in layout order."""
    depth = len(adapter.decoder_layers())
    merged = official_aim_merge(adapter, prepared, merge_steps(prepared.layout.n_tokens, n_keep(prepared, budget)))
    if not code_order:
        merged = {p: merged[p] for p in sorted(merged)}
    m = len(merged)
    rates = {}  # scoring layer -> retain_rate after it (line 936; folded, the later reference layer wins)
    for r in range(first_layer, 32):
        rates[min(scaled_layer(r, depth), depth - 2)] = max(0.0, 1.0 - (r - first_layer + 1) * rate_step)

    states, kinds = llm_input(adapter, prepared, merged)
    positions = torch.arange(states.shape[1])[None]
    hidden = np.zeros(len(kinds), dtype=bool)  # False in the code's 2-D attention_mask
    lm = language_model(eager_model(adapter))
    alive = {}
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            alive[i] = tuple(sorted(int(v) for v in kinds[(kinds >= 0) & ~hidden]))
            mask = masked_keys(states.shape[1], hidden)
            if i in rates:  # every row a query, the masked keys hidden (lines 352-360)
                logits = layer_attention(lm, i, states, positions, np.arange(states.shape[1]), logits=True)
                logits = logits.masked_fill(torch.as_tensor(hidden), torch.finfo(torch.float32).min)
                importance = get_importance(logits, temperature, iterations, damping)
                protected = kinds < 0
                importance[torch.as_tensor(hidden)] = -1.0  # line 1001
                importance[torch.as_tensor(protected)] = 1.0  # line 1002
                order = torch.sort(-importance, stable=True).indices.numpy()
                keep = order[:int(m * rates[i] + protected.sum())]  # lines 1005-1008
            out = layer(states, attention_mask=mask, position_ids=positions,
                        position_embeddings=lm.rotary_emb(states, positions))
            states = out[0] if isinstance(out, tuple) else out
            if i in rates:
                dropped = ~np.isin(np.arange(len(kinds)), keep)
                if masked:  # line 1013: attention_mask & token_mask, every row kept
                    hidden |= dropped
                else:
                    rows = np.flatnonzero(~dropped)
                    states, kinds, positions = states[:, rows], kinds[rows], positions[:, torch.as_tensor(rows)]
                    hidden = hidden[rows]
    return alive


def executed_alive(stages, depth):
    """{layer: visual tokens visible entering it} from the workbench's stages."""
    current, alive = tuple(sorted(stages[PRE_LLM])), {}
    for i in range(depth):
        if i in stages:
            current = tuple(sorted(stages[i]))
        alive[i] = current
    return alive


@pytest.mark.parametrize("label", labels(("llava",)))
def test_in_llm_pruning_equals_the_official_rule(label):
    adapter, prepared = case(label)
    depth = len(adapter.decoder_layers())
    for budget in BUDGETS:
        for kwargs in VARIANTS:
            reference = official_aim_llm(adapter, prepared, budget, **kwargs)
            executed = executed_alive(workbench_stages(AIM(**kwargs), adapter, prepared, budget), depth)
            assert executed == reference, (label, budget, kwargs)
    # the old behaviours, each against the same rule changed the same way
    for kwargs, changed in (({"dropped": "removed"}, {"masked": False}), ({"order": "layout"}, {"code_order": False})):
        reference = official_aim_llm(adapter, prepared, 0.25, **TWO_STAGES, **changed)
        executed = executed_alive(workbench_stages(AIM(**TWO_STAGES, **kwargs), adapter, prepared, 0.25), depth)
        assert executed == reference, (label, kwargs)


def aim_job(adapter, prepared, method, budget, gold=GOLD) -> Job:
    """The job ``run_method`` would run: the plan, a fresh callback, the gold answer."""
    facts = ModelFacts.of(adapter)
    context = SelectionContext(prepared.layout, budget, record_needs(adapter, prepared, [method]), facts)
    return Job(prepared, method.select(context), method.layer_callback(context), gold)


@torch.no_grad()
def by_hand(adapter, prepared, plan, gold_ids):
    """(logits [V] at the prompt's last row, the gold tokens' log-probability) of the eager copy run by
    hand on the LLM input ``plan``'s pre-LLM stage makes (its appended tokens in their order), every
    layer's mask hiding the keys of the tokens the in-LLM stages before it dropped, the gold tokens fed
    after the prompt (they see every visible key)."""
    pre = plan.stages[0]
    assert pre.where == PRE_LLM and not pre.merges
    n = prepared.layout.n_tokens
    places = {}
    for append in pre.appends:
        weights = np.zeros(n)
        weights[list(append.members)] = append.weights
        places[append.token] = weights
    states, kinds = llm_input(adapter, prepared, places)
    length = states.shape[1]
    gold = torch.as_tensor(gold_ids)
    states = torch.cat([states, adapter.token_embeddings()(gold[:-1])[None].to(states.dtype)], 1)
    kinds = np.concatenate([kinds, np.full(len(gold) - 1, -1)])
    positions = torch.arange(states.shape[1])[None]
    lm = language_model(eager_model(adapter))
    hidden = np.zeros(len(kinds), dtype=bool)
    for i, layer in enumerate(lm.layers):
        stage = plan.stage_at(i)
        if stage is not None:
            assert stage.dropped == "masked"
            hidden |= (kinds >= 0) & ~np.isin(kinds, stage.kept_array)
        out = layer(states, attention_mask=masked_keys(states.shape[1], hidden), position_ids=positions,
                    position_embeddings=lm.rotary_emb(states, positions))
        states = out[0] if isinstance(out, tuple) else out
    logits = adapter.output_head()(lm.norm(states))[0].float()
    logp = torch.log_softmax(logits[length - 1:], -1)
    return logits[length - 1], float(logp[torch.arange(len(gold)), gold].sum())


@pytest.mark.parametrize("label", labels(("llava",)))
def test_the_masked_run_is_the_model_run_with_those_keys_masked(label):
    adapter, prepared = case(label)
    depth = len(adapter.decoder_layers())
    for kwargs in ({}, TWO_STAGES):
        (execution,) = execute_batch(adapter, [aim_job(adapter, prepared, AIM(**kwargs), 0.25)], max_new_tokens=1)
        in_llm = execution.plan.stages[1:]
        assert in_llm and all(s.dropped == "masked" for s in in_llm)
        logits, gold = by_hand(adapter, prepared, execution.plan, answer_tokens(adapter, prepared.prompt, GOLD))
        torch.testing.assert_close(execution.logits, logits, atol=1e-4, rtol=1e-4)
        assert execution.gold_logprob == pytest.approx(gold, abs=1e-3)  # the decoding steps mask them too
        # cost: every layer computes every row of the merged sequence; it attends to the visible ones
        merged = len(execution.plan.stages[0].kept)
        length = prepared.inputs["input_ids"].shape[1] - prepared.layout.n_tokens + merged
        assert execution.tokens_per_layer == (length,) * depth
        visible = executed_alive({s.where: s.kept for s in execution.plan.stages}, depth)
        assert execution.visual_tokens_per_layer == tuple(len(visible[i]) for i in range(depth))
        assert execution.masked_tokens_per_layer == tuple(merged - len(visible[i]) for i in range(depth))
        shape = DecoderShape.of(adapter.language_model().config)
        assert prefill_flops(shape, execution.tokens_per_layer) == depth * shape.layer_flops(length)
    # the old behaviour takes the rows out: the same stages here (one stage keeping none), fewer rows computed
    (removed,) = execute_batch(adapter, [aim_job(adapter, prepared, AIM(dropped="removed"), 0.25)], max_new_tokens=1)
    assert removed.tokens_per_layer[-1] < length


def test_a_batch_masks_each_sample_as_it_runs_alone():
    """Two shipped samples of different lengths and different masked tokens: batch 2 equals batch 1."""
    adapter, first = case("shipped-0")
    _, second = case("shipped-1")
    method = AIM(**TWO_STAGES)
    single = [execute_batch(adapter, [aim_job(adapter, p, method, 0.25)], max_new_tokens=4)[0] for p in (first, second)]
    batched = execute_batch(adapter, [aim_job(adapter, p, method, 0.25) for p in (first, second)], max_new_tokens=4)
    assert single[0].plan.stages[1].kept != single[1].plan.stages[1].kept  # each sample hides its own tokens
    for one, alone in zip(batched, single):
        assert [(s.where, s.kept, s.dropped) for s in one.plan.stages] == \
            [(s.where, s.kept, s.dropped) for s in alone.plan.stages]
        torch.testing.assert_close(one.logits, alone.logits, atol=1e-4, rtol=1e-4)
        assert one.answer_ids == alone.answer_ids
        assert one.gold_logprob == pytest.approx(alone.gold_logprob, abs=1e-3)
        assert one.tokens_per_layer == alone.tokens_per_layer
        assert one.masked_tokens_per_layer == alone.masked_tokens_per_layer and max(one.masked_tokens_per_layer) > 0
