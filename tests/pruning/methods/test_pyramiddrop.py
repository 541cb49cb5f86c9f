"""PyramidDrop: the geometric schedule, the last-instruction ranking on the live state, re-indexing."""

from __future__ import annotations

import numpy as np
import pytest

from tests.pruning.handmade import LLAVA_FACTS, grid_layout
from tests.pruning.shipped import check_on_shipped, run_checked, tiny_input
from workbench.pruning.method import SelectionContext
from workbench.pruning.methods.pyramiddrop import PyramidDrop, pyramid_schedule, rank_stage


def test_reference_schedule_on_the_reference_decoder():
    # LLaVA-1.5: 576 tokens, lambda 0.5 -> 288 / 144 / 72 before layers 8 / 16 / 24.
    assert pyramid_schedule((8, 16, 24), 32, 576, 72, 0.5, "fixed") == ((8, 288), (16, 144), (24, 72))
    # matching the final count: n_keep = N/8 gives back lambda = 0.5 ...
    assert pyramid_schedule((8, 16, 24), 32, 576, 72, 0.5, "final") == ((8, 288), (16, 144), (24, 72))
    # ... and n_keep = N/27 gives lambda = 1/3: 729/3 = 243, 729/9 = 81, then 27
    assert pyramid_schedule((8, 16, 24), 32, 729, 27, 0.5, "final") == ((8, 243), (16, 81), (24, 27))
    # the fixed schedule floors as the code does: int(100 * 0.5**3) = 12
    assert pyramid_schedule((8, 16, 24), 32, 100, 1, 0.5, "fixed") == ((8, 50), (16, 25), (24, 12))


def test_schedule_folds_stages_on_a_shallow_decoder():
    # 8, 16, 24 on 3 layers -> 1, 2, 2: the stage at 2 keeps the deeper (third) reference count
    assert pyramid_schedule((8, 16, 24), 3, 576, 72, 0.5, "fixed") == ((1, 288), (2, 72))
    # final matching at 32 of 144: lambda = (32/144)^(1/3) = 0.6057 -> floor(144 * 0.6057) = 87
    assert pyramid_schedule((8, 16, 24), 3, 144, 32, 0.5, "final") == ((1, 87), (2, 32))


def test_kept_counts_are_the_schedule():
    context = SelectionContext(grid_layout((24, 24)), 72, None, LLAVA_FACTS)
    assert PyramidDrop().kept_counts(context) == (288, 144, 72)
    assert PyramidDrop().select(context).stages == ()  # everything happens on the live state


def test_rank_stage_keeps_the_best_of_the_live_tokens():
    alive = np.array([1, 4, 6, 9])
    stage = rank_stage(8, alive, np.array([0.1, 0.5, 0.3, 0.5]), 2, 12, "reindex")
    assert stage.kept == (4, 9) and stage.where == 8 and stage.position == "reindex"
    assert np.isnan(stage.scores[0]) and stage.scores[6] == pytest.approx(0.3)
    assert rank_stage(8, alive, np.array([0.1, 0.5, 0.3, 0.5]), 3, 12, "original").kept == (4, 6, 9)


def test_parameters_are_checked():
    for bad, message in [(dict(layers=(16, 8)), "strictly increasing"), (dict(ratio=0.0), "lambda"),
                         (dict(budget_mode="average"), "budget_mode"), (dict(position="keep"), "position")]:
        with pytest.raises(ValueError, match=message):
            PyramidDrop(**bad)


def test_runs_on_the_shipped_model():
    execution, _ = check_on_shipped(PyramidDrop())
    stages = execution.plan.stages
    assert [len(s.kept) for s in stages] == [72, 36, 18]  # the code's int(144 * 0.5**s); the budget is ignored
    assert [s.where for s in stages] == [1, 2, 3] and {s.position for s in stages} == {"reindex"}
    assert set(stages[1].kept) <= set(stages[0].kept)
    assert np.isnan(np.asarray(stages[1].scores)[[i for i in range(144) if i not in stages[0].kept]]).all()
    final, _ = check_on_shipped(PyramidDrop(budget_mode="final"))  # lambda = (32/144)^(1/3)
    assert [len(s.kept) for s in final.plan.stages] == [87, 52, 32]


def test_falls_back_to_original_positions_on_m_rope():
    execution, _ = run_checked(*tiny_input("qwen2_vl"), PyramidDrop(), 0.25, max_new_tokens=2)
    assert [s.position for s in execution.plan.stages] == ["original"]
