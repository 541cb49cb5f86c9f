"""An ``Append`` made on the tower's features (``space="tower"``): its row is the projector on the weighted
sum of its members' feed-layer patch outputs, as VisionZip's code merges before the projector. Here: the
field's round trip and validation, the row the executor makes, and its refusals. What VisionZip's plans
give the LLM with it is checked against the official code in parity/test_visionzip_anyres.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.pruning.parity.anyres import SIZES, llava_next_case
from tests.pruning.parity.common import eager_model, eager_tower
from tests.pruning.reference import LayerIO
from tests.pruning.shipped import tiny_input
from workbench.pruning.executor import execute
from workbench.pruning.plan import PRE_LLM, Append, KeepPlan, PlanError, Stage, cls_token, padded_patch


def test_the_space_travels_with_the_plan_and_old_plans_read_back_as_embedding():
    append = Append(3, (1, 2), (1.0, 0.5, 0.5), after=5, space="tower")
    plan = KeepPlan("t", 4, 8, (Stage(PRE_LLM, (0, 3, 5, 7), appends=(append,)),))
    back = KeepPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan and back.stages[0].appends[0].space == "tower"
    old = append.to_dict()
    del old["space"]
    assert Append.from_dict(old).space == "embedding" == Append(3, (), (1.0,)).space


def test_the_space_is_checked():
    with pytest.raises(PlanError, match="space must be one of"):
        Append(3, (1,), (1.0, 1.0), space="projector")
    Stage(0, (0, 3), appends=(Append(3, (1,), (1.0, 1.0), space="tower"),))  # before layer 0: the same rows
    with pytest.raises(PlanError, match="only in the 'pre_llm' stage or before decoder layer 0"):
        Stage(1, (0, 3), appends=(Append(3, (1,), (1.0, 1.0), space="tower"),))


def crop_tokens(prepared, view: int, count: int) -> list[tuple[int, int]]:
    """(token, patch) of the first ``count`` patches of ``view`` that feed a layout token."""
    owner = prepared.layout.tower_owner[view]
    return [(int(owner[p]), int(p)) for p in np.flatnonzero(owner >= 0)[:count]]


@torch.no_grad()
@pytest.mark.parametrize("where", [PRE_LLM, 0])
def test_the_row_is_the_projector_on_the_weighted_feed_features(where):
    adapter, prepared = llava_next_case(SIZES[0])
    layout = prepared.layout
    sizes = [len(o) for o in layout.tower_owner]
    view = 1
    (target, t_patch), (source, s_patch) = crop_tokens(prepared, view, 2)
    pad = int(np.flatnonzero(layout.tower_owner[view] < 0)[0])
    pad_name = padded_patch(layout.n_tokens, sizes, view, pad)
    weights = (1.0, 0.5, 0.5)
    others = tuple(t for t in range(layout.n_tokens) if t not in (target, source))
    if where == PRE_LLM:  # the padded patch is no row before the LLM: name only layout tokens there
        members, stages = (source,), ()
        weights = (1.0, 1.0)
    else:  # the padded patch enters in the pre-LLM stage, the token is made before layer 0
        members = (source, pad_name)
        stages = (Stage(PRE_LLM, tuple(range(layout.n_tokens)) + (pad_name,),
                        appends=(Append(pad_name, (), (1.0,)),)),)
    kept = tuple(sorted(set(others) | {target}))
    stage = Stage(where, kept, appends=(Append(target, members, weights, space="tower"),))
    plan = KeepPlan("t", len(kept), layout.n_tokens, stages + (stage,))
    with LayerIO(adapter) as seen:
        execute(adapter, prepared, plan, max_new_tokens=0)
    states = eager_tower(adapter, prepared, prepared.inputs["pixel_values"].flatten(0, 1)).hidden_states
    feed = states[adapter.projector_feed_layer][view]
    patches = (t_patch, s_patch, pad)[:len(weights)]
    summed = sum(w * feed[1 + p] for w, p in zip(weights, patches))
    projector = eager_model(adapter).model.multi_modal_projector
    expected = projector(summed[None, None])[0, 0]
    # after the last visual row (the padded patch's, if entered); the target's and source's rows, before it, left
    row = seen.inputs[0][0, int(layout.positions[-1]) - 1]
    torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-5)
    on_embeddings = sum(w * projector(feed[1 + p]) for w, p in zip(weights, patches))
    assert not torch.allclose(row, on_embeddings, atol=1e-4, rtol=1e-4)  # the projector is not linear


def test_a_cls_member_is_refused():
    adapter, prepared = tiny_input("llava")
    n = prepared.layout.n_tokens
    cls = cls_token(n, 0)  # enters before the LLM, then is a member of a token made on the tower's features
    entry = Stage(PRE_LLM, tuple(range(n)) + (cls,), appends=(Append(cls, (), (1.0,), before=0),))
    made = Stage(0, tuple(range(1, n)), appends=(Append(1, (0, cls), (1.0, 0.5, 0.5), space="tower"),))
    with pytest.raises(PlanError, match=f"member {cls} is a tower's \\[CLS\\], not a patch"):
        execute(adapter, prepared, KeepPlan("t", n - 1, n, (entry, made)), max_new_tokens=0)


def test_a_member_owning_several_patches_is_refused():
    adapter, prepared = tiny_input("qwen2_vl")  # its merger folds 2 x 2 patches into one token
    n = prepared.layout.n_tokens
    stage = Stage(PRE_LLM, tuple(range(1, n)), appends=(Append(1, (0,), (1.0, 1.0), space="tower"),))
    with pytest.raises(PlanError, match="member 1 owns 4 tower patches \\(a member must own exactly one\\)"):
        execute(adapter, prepared, KeepPlan("t", n - 1, n, (stage,)), max_new_tokens=0)
