"""KeepPlan: validation with clear errors, views, and the plain-data round trip."""

from __future__ import annotations

import json
import math

import pytest

from workbench.pruning.plan import KeepPlan, Merge, PlanError, Stage


def test_plan_views():
    plan = KeepPlan("m", 2, 6, (Stage("pre_llm", (0, 2, 3, 5)), Stage(2, (2, 5))))
    assert plan.final_kept == (2, 5)
    assert plan.kept_at("pre_llm") == (0, 2, 3, 5)
    assert plan.kept_at(1) == (0, 2, 3, 5)
    assert plan.kept_at(2) == (2, 5)
    assert plan.kept_per_stage == {"pre_llm": (0, 2, 3, 5), 2: (2, 5)}
    assert KeepPlan.keep_all(4).final_kept == (0, 1, 2, 3)
    assert KeepPlan.keep_all(4, where=None).stages == ()
    assert KeepPlan.keep_all(4, where=3).stages[0].where == 3


def test_plan_round_trips_through_json_with_nan_scores():
    scores = (0.5, math.nan, 2.0, math.nan)
    plan = KeepPlan("m", 1, 4, (Stage("pre_llm", (0, 2), scores, (Merge(0, (1,), (0.5, 0.5)),)),
                                Stage(1, (2,), position="reindex")))
    row = json.loads(json.dumps(plan.to_dict(), allow_nan=False))
    assert row["stages"][0]["scores"] == [0.5, None, 2.0, None]
    back = KeepPlan.from_dict(row)
    assert back.to_dict() == plan.to_dict()
    assert math.isnan(back.stages[0].scores[1])


@pytest.mark.parametrize("build, message", [
    (lambda: KeepPlan("m", 1, 4, (Stage("pre_llm", (0, 4)),)), r"kept indices \[4\] are out of range 0..3"),
    (lambda: KeepPlan("m", 1, 4, (Stage("pre_llm", (-1, 2)),)), r"kept indices \[-1\] are out of range"),
    (lambda: KeepPlan("m", 1, 4, (Stage("pre_llm", (0, 1)), Stage(2, (1, 2)))),
     r"keeps \[2\] which an earlier stage dropped"),
    (lambda: KeepPlan("m", 1, 4, (Stage(2, (0,)), Stage("pre_llm", (0,)))), "strictly increasing order"),
    (lambda: KeepPlan("m", 1, 4, (Stage(1, (0, 1)), Stage(1, (0,)))), "strictly increasing order"),
    (lambda: KeepPlan("m", 1, 4, (Stage("pre_llm", (0,), scores=(1.0, 2.0)),)), "2 scores for 4 visual tokens"),
    (lambda: KeepPlan("m", 9, 4), r"budget 9 is outside 0..4"),
    (lambda: KeepPlan("m", 1, 4, (Stage("pre_llm", (0, 1)), Stage(1, (0,), merges=(Merge(0, (2,), (.5, .5)),)))),
     r"uses sources \[2\] that were already dropped"),
    (lambda: Stage("pre_llm", (2, 1)), "sorted and unique"),
    (lambda: Stage("pre_llm", (1, 1)), "sorted and unique"),
    (lambda: Stage(-1, (1,)), "non-negative layer index"),
    (lambda: Stage("later", (1,)), "'pre_llm' or a decoder layer index"),
    (lambda: Stage("pre_llm", (1,), position="shifted"), "position policy must be one of"),
    (lambda: Stage("pre_llm", (0, 1), merges=(Merge(0, (1,), (.5, .5)),)), r"merge sources \[1\] are kept"),
    (lambda: Stage("pre_llm", (1,), merges=(Merge(0, (2,), (.5, .5)),)), "merge target 0 is not kept"),
    (lambda: Merge(0, (1, 2), (1.0,)), "1 weights for 1 target \\+ 2 sources"),
    (lambda: Merge(0, (), ()), "has no source tokens"),
    (lambda: Merge(0, (1,), (math.nan, 1.0)), "non-finite weights"),
    (lambda: Merge(0, (0, 1), (1., 1., 1.)), "lists the target among its sources"),
])
def test_bad_plans_fail_with_clear_errors(build, message):
    with pytest.raises(PlanError, match=message):
        build()


def test_merge_mean():
    merge = Merge.mean(3, [4, 5, 6])
    assert merge.weights == (0.25,) * 4 and merge.sources == (4, 5, 6)
