"""TransPrune: the transition weight and one live stage worked out by hand, the shipped model, families."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.pruning.handmade import LLAVA_FACTS, grid_layout
from tests.pruning.shipped import check_on_shipped, run_checked, shipped_sample, tiny_input
from workbench.pruning.method import MethodNotApplicable, ModelFacts, SelectionContext
from workbench.pruning.methods.transprune import TransPrune, transition_weight


def test_transition_weight_by_hand():
    # rows: (1,0)->(2,0): ratio 2, 1-cos 0; (1,0)->(0,1): 1, 1; (1,0)->(-1,0): 1, 2. Z = 1 + e + e^2.
    before = torch.tensor([[1.0, 0], [1, 0], [1, 0]])
    after = torch.tensor([[2.0, 0], [0, 1], [-1, 0]])
    assert transition_weight(before, after).tolist() == pytest.approx([0.180061, 0.244728, 0.665241], abs=1e-5)


class Returns(torch.nn.Module):
    """Stands in for a sublayer: returns the output it is told to (as a tuple, like attention)."""

    def __init__(self, tuple_output):
        super().__init__()
        self.tuple_output, self.output = tuple_output, None

    def forward(self, hidden_states):
        return (self.output,) if self.tuple_output else self.output


def fake_state(layer, attention_module, mlp, probs=None):
    # rows: 0 system, 1-4 visual (ids 0-3), 5-6 instruction
    return SimpleNamespace(layer=layer, position_ids=torch.zeros(1, 6), visual_rows=torch.tensor([1, 2, 3, 4]), visual_indices=np.arange(4),
                           text_rows=torch.tensor([5, 6]), attention_module=attention_module,
                           module=SimpleNamespace(mlp=mlp), attention=lambda rows: probs)


def test_live_stage_by_hand():
    # Layer 6 (accumulating): attention in == out for every row -> 1/7 each; FFN: id 3 goes (1,0) -> (-3,0):
    # 3 e^2 / (6 + e^2) = 1.65561, the other rows 1 / (6 + e^2) = 0.07469. TTV: ids 0-2 0.21755, id 3 1.79847,
    # normalised 0.08876 / 0.73373. IGA before layer 7 (mean of the 2 instruction rows): .1 .5 .3 .1.
    # Score: .189 .589 .389 .834 -> keep {1, 3}. IGA alone keeps {1, 2}, TTV alone {0, 3}.
    attention, mlp = Returns(True), Returns(False)
    method = TransPrune(accumulate_layers=(7,), prune_layers=(7,), ratios=(0.5,))
    context = SelectionContext(grid_layout((2, 2)), 2, None, LLAVA_FACTS)
    assert method.kept_counts(context) == (2,) and method.accumulating(LLAVA_FACTS) == (6,)
    callback = method.layer_callback(context)
    assert callback(6, fake_state(6, attention, mlp)) is None
    same = torch.tensor([[[1.0, 0]] * 7])
    attention.output = same
    attention(same)
    mlp.output = same.clone()
    mlp.output[0, 4] = torch.tensor([-3.0, 0])
    mlp(same)
    mlp(torch.ones(1, 7, 2))  # the hooks fire once (the prefill), not on later calls
    probs = torch.zeros(2, 2, 7)
    probs[:, 0, 1:5] = torch.tensor([0.2, 0.2, 0.6, 0.0])
    probs[:, 1, 1:5] = torch.tensor([0.0, 0.8, 0.0, 0.2])
    stage = callback(7, fake_state(7, attention, mlp, probs))
    assert stage.where == 7 and stage.kept == (1, 3) and stage.position == "reindex"
    assert stage.score_array.tolist() == pytest.approx([0.188755, 0.588755, 0.388755, 0.833734], abs=1e-5)
    assert callback(8, fake_state(8, attention, mlp, probs)) is None


def test_transitions_follow_the_pruned_rows():
    # Stage before 7 keeps {1, 3} (as above); layer 7 also accumulates, on the pruned sequence:
    # rows 0 system, 1 id 1, 2 id 3, 3-4 instruction. Attention in == out: 1/5 each; FFN flips row 1:
    # 3 e^2 / (4 + e^2) = 1.94640, others 1 / (4 + e^2) = 0.08780. TTV: id 1 0.21755 + 2.14640,
    # id 3 1.79847 + 0.28780 -> id 1 wins the stage before 9 (equal IGA). Reading the old rows
    # (2 and 4) would credit id 3 instead.
    attention, mlp = Returns(True), Returns(False)
    method = TransPrune(accumulate_layers=(7, 8), prune_layers=(7, 9), ratios=(0.5, 0.25))
    context = SelectionContext(grid_layout((2, 2)), 1, None, LLAVA_FACTS)
    assert method.kept_counts(context) == (2, 1) and method.accumulating(LLAVA_FACTS) == (6, 7)
    callback = method.layer_callback(context)
    callback(6, fake_state(6, attention, mlp))
    same = torch.tensor([[[1.0, 0]] * 7])
    attention.output, mlp.output = same, same.clone()
    mlp.output[0, 4] = torch.tensor([-3.0, 0])
    attention(same)
    mlp(same)
    probs = torch.zeros(2, 2, 7)
    probs[:, 0, 1:5] = torch.tensor([0.2, 0.2, 0.6, 0.0])
    probs[:, 1, 1:5] = torch.tensor([0.0, 0.8, 0.0, 0.2])
    assert callback(7, fake_state(7, attention, mlp, probs)).kept == (1, 3)
    pruned = torch.tensor([[[1.0, 0]] * 5])
    attention.output, mlp.output = pruned, pruned.clone()
    mlp.output[0, 1] = torch.tensor([-3.0, 0])
    attention(pruned)
    mlp(pruned)
    late = torch.zeros(2, 2, 5)
    late[:, :, 1:3] = 0.5
    state = SimpleNamespace(layer=9, position_ids=torch.zeros(1, 4), visual_rows=torch.tensor([1, 2]), visual_indices=np.array([1, 3]),
                            text_rows=torch.tensor([3, 4]), attention=lambda rows: late)
    stage = callback(9, state)
    assert stage.kept == (1,)
    assert stage.score_array[[1, 3]].tolist() == pytest.approx([0.5 + 2.36395 / 4.45022, 0.5 + 2.08627 / 4.45022],
                                                               abs=1e-4)


def test_schedule():
    context = SelectionContext(grid_layout((24, 24)), 72, None, LLAVA_FACTS)
    assert TransPrune().schedule(context) == [(7, 504), (9, 360), (12, 72)]
    assert TransPrune().accumulating(LLAVA_FACTS) == (6, 7, 8, 9, 10, 11)
    # the default is the code's fixed ratios (the budget is ignored); "final" keeps the budget last
    assert TransPrune().schedule(SelectionContext(grid_layout((24, 24)), 30, None, LLAVA_FACTS))[-1] == (12, 72)
    assert TransPrune(budget_mode="final").schedule(
        SelectionContext(grid_layout((24, 24)), 30, None, LLAVA_FACTS)) == [(7, 504), (9, 360), (12, 30)]
    shipped = SelectionContext(grid_layout((12, 12)), 0.22, None, ModelFacts("llava", 3, 3, True, 3))
    assert TransPrune().schedule(shipped) == [(1, 18)]
    assert TransPrune(budget_mode="final").schedule(shipped) == [(1, 32)]
    assert TransPrune().accumulating(shipped.model) == (0,)


def test_validation_and_applicability():
    with pytest.raises(ValueError, match="one fraction in \\(0, 1\\] per pruning layer"):
        TransPrune(ratios=(0.5,))
    with pytest.raises(ValueError, match="strictly increasing"):
        TransPrune(prune_layers=(9, 7, 12))
    with pytest.raises(ValueError, match="budget_mode must be one of"):
        TransPrune(budget_mode="average")
    with pytest.raises(MethodNotApplicable, match="at least 2 layers"):
        TransPrune().check_applies(ModelFacts("llava", 1, 3, True, 3))


def test_shipped_model():
    execution, _ = check_on_shipped(TransPrune())
    assert [len(st.kept) for st in execution.plan.stages] == [90, 18]  # int(144 * 0.625), int(144 * 0.125)
    assert [st.where for st in execution.plan.stages] == [1, 2]
    assert all(np.isfinite(st.score_array[list(st.kept)]).all() for st in execution.plan.stages)
    adapter = shipped_sample()[0]
    # hooks are one-shot: nothing left on the model
    assert not adapter.decoder_attention(0)._forward_hooks and not adapter.decoder_layers()[0].mlp._forward_hooks


def test_tiny_qwen_family():
    # M-RoPE cannot be renumbered by the executor
    run_checked(*tiny_input("qwen2_vl"), TransPrune(position="original"), 0.5)
