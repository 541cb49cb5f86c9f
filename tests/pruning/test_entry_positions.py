"""How the LLM numbers the sequence a cut before it leaves (``entry_position``).

The released LLaVA code of the pre-LLM methods concatenates the pruned image features with the text
embeddings (``prepare_inputs_labels_for_multimodal``) and lets the model number that shorter sequence
0..L'-1; their Qwen2.5-VL code slices the M-RoPE ids of the unpruned sequence. Every method that cuts
before the LLM (or inside the vision tower) does the same by default, read here at the decoder stack
itself, and ``position="original"`` keeps the unpruned ids with their gaps.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from tests.pruning.shipped import shipped_sample, tiny_input
from workbench.pruning.method import MethodNotApplicable, ModelFacts, PreLLMMethod, entry_position
from workbench.pruning.plan import boxed
from workbench.pruning.registry import InvalidMethodParameters, available_methods, create_method, method_class
from workbench.pruning.run import record_needs, run_method

ENTRY_METHODS = tuple(name for name in available_methods() if issubclass(method_class(name), PreLLMMethod))
BUDGET = 0.22


def stack_positions(adapter, prepared, method, recording):
    """(execution, the position ids the decoder stack got in the prefill) of ``method`` at ``BUDGET``."""
    seen = []

    def grab(module, args, kwargs):
        seen.append(kwargs.get("position_ids"))

    hook = adapter.language_model().register_forward_pre_hook(grab, with_kwargs=True)
    try:
        execution = run_method(adapter, prepared, method, BUDGET, recording=recording, max_new_tokens=0)
    finally:
        hook.remove()
    # the last call is the prefill (an earlier one may capture the wrapper's inputs to the stack)
    assert seen and seen[-1] is not None
    return execution, seen[-1].cpu()


def entry_stage(plan):
    """The last stage before the LLM: the one whose policy numbers the LLM's input."""
    before = [stage for stage in plan.stages if not stage.in_llm]
    assert before, f"{plan.method} cut nothing before the LLM"
    return before[-1]


def kept_rows(prepared, kept) -> torch.Tensor:
    """Rows of the unpruned sequence that survive a cut keeping visual tokens ``kept``, in order (a
    [CLS] passed to the LLM has no row there)."""
    keep = np.ones(prepared.inputs["input_ids"].shape[1], dtype=bool)
    keep[prepared.layout.positions] = False
    keep[prepared.layout.positions[boxed(kept, prepared.layout.n_tokens)]] = True
    return torch.from_numpy(np.flatnonzero(keep))


@functools.lru_cache(maxsize=None)
def recording_of(model: str):
    adapter, prepared = model_input(model)
    return record_needs(adapter, prepared, [create_method(name) for name in ENTRY_METHODS])


def model_input(model: str):
    if model == "shipped":
        adapter, prepared, _ = shipped_sample()
        return adapter, prepared
    return tiny_input(model)


def test_the_rule_reindexes_one_axis_positions_and_keeps_m_rope_ones():
    one_axis = ModelFacts("llava", 4, 4, True, 3)
    m_rope = ModelFacts("qwen2_vl", 4, 4, False, 4, mrope=True)
    assert entry_position("reindex", one_axis) == "reindex"
    assert entry_position("original", one_axis) == "original"
    assert entry_position("reindex", m_rope) == entry_position("original", m_rope) == "original"
    assert entry_position("reindex", None) == "reindex"  # no model facts: as asked
    for name in ENTRY_METHODS:
        assert create_method(name).params()["position"] == "reindex", name  # listed by ``workbench methods``
        assert create_method(name, position="original").position == "original"
    with pytest.raises(InvalidMethodParameters, match="fastervlm: position must be one of"):
        create_method("fastervlm", position="shifted")


def test_every_method_that_prunes_before_the_llm_is_covered():
    # the LLaVA-style pre-LLM methods and baselines of the literature, and the tower-side ones
    assert {"fastervlm", "visionzip", "divprune", "vispruner", "cdpruner", "holov", "scope", "globalcom2",
            "hired", "hiprune", "vtc_cls", "mmtok", "todre", "fopru", "aim", "vflowopt", "vscan", "flowcut",
            "visiondrop", "random", "uniform_grid", "average_pool"} <= set(ENTRY_METHODS)


@pytest.mark.parametrize("name", ENTRY_METHODS)
def test_the_llm_numbers_the_kept_sequence_contiguously_on_one_axis_positions(name):
    method = create_method(name)
    model = "shipped"
    if method.applicability(ModelFacts.of(model_input(model)[0])) is not None:
        model = "llava_next"  # GlobalCom2 needs a base view plus crops
    adapter, prepared = model_input(model)
    execution, positions = stack_positions(adapter, prepared, method, recording_of(model))
    assert entry_stage(execution.plan).position == "reindex"
    length = execution.tokens_per_layer[0]
    assert length < prepared.inputs["input_ids"].shape[1]  # something was cut
    assert torch.equal(positions, torch.arange(length)[None])


@pytest.mark.parametrize("name", ["fastervlm", "uniform_grid"])
def test_the_default_equals_the_model_run_on_the_shortened_sequence_and_original_keeps_the_gaps(name):
    adapter, prepared = model_input("shipped")
    recording = recording_of("shipped")
    execution, _ = stack_positions(adapter, prepared, create_method(name), recording)
    inputs = adapter.llm_inputs(prepared.inputs)
    rows = kept_rows(prepared, execution.final_kept)
    with torch.no_grad():  # as the code: the kept rows only, the model's own (default) position ids
        expected = adapter.model(inputs_embeds=inputs.inputs_embeds[:, rows], logits_to_keep=1).logits[0, -1]
    torch.testing.assert_close(execution.logits, expected.float(), atol=1e-5, rtol=1e-5)

    original, positions = stack_positions(adapter, prepared, create_method(name, position="original"), recording)
    assert original.final_kept == execution.final_kept
    assert torch.equal(positions, inputs.position_ids[:, rows].cpu())
    assert not torch.equal(positions, torch.arange(len(rows))[None])  # the gaps are really there
    assert not torch.equal(original.logits, execution.logits)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_m_rope_models_keep_their_positions_and_one_axis_families_reindex(family):
    adapter, prepared = model_input(family)
    facts = ModelFacts.of(adapter)
    inputs = adapter.llm_inputs(prepared.inputs)
    checked = []
    for name in ENTRY_METHODS:
        method = create_method(name)
        if method.applicability(facts) is not None:
            continue
        try:
            execution, positions = stack_positions(adapter, prepared, method, recording_of(family))
        except MethodNotApplicable:
            continue
        entry = entry_stage(execution.plan)
        rows = kept_rows(prepared, entry.kept)
        if facts.mrope:
            assert entry.position == "original" and not entry.appends, name
            assert torch.equal(positions, inputs.position_ids[..., rows].cpu()), name
        else:
            assert entry.position == "reindex", name
            passed = len(entry.kept) - len(boxed(entry.kept, prepared.layout.n_tokens))  # [CLS] tokens passed
            assert torch.equal(positions, torch.arange(len(rows) + passed)[None]), name
        checked.append(name)
    assert facts.mrope == (family == "qwen2_vl")
    assert len(checked) >= 8, checked
