"""KeepPlan: validation with clear errors, views, and the plain-data round trip."""

from __future__ import annotations

import json
import math

import pytest

from workbench.pruning.plan import Append, KeepPlan, Merge, PlanError, Stage


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
    assert list(row["stages"][0]["scores"]) == ["float32"]  # all four are float32 values
    back = KeepPlan.from_dict(row)
    assert back.to_dict() == plan.to_dict() and back == plan
    assert math.isnan(back.stages[0].scores[1])
    # a plan written by hand (or stored before the encoding) gives its scores as a list, null for NaN
    row["stages"][0]["scores"] = [0.5, None, 2.0, None]
    assert KeepPlan.from_dict(row) == plan


def test_stored_scores_are_exact_and_compact():
    import numpy as np

    from workbench.pruning.plan import decode_scores, encode_scores

    attention = np.random.default_rng(0).random(576).astype(np.float32) / 100
    stored = json.dumps(encode_scores(attention.astype(np.float64)))
    assert decode_scores(json.loads(stored)) == tuple(attention.astype(np.float64).tolist())
    assert len(stored) * 4 < len(json.dumps(attention.astype(np.float64).tolist()))
    doubles = (0.1, math.nan, 1e300, -math.inf, 5e-324)  # no float32 holds these: stored as float64
    assert list(encode_scores(doubles)) == ["float64"]
    back = decode_scores(json.loads(json.dumps(encode_scores(doubles))))
    assert back[0] == 0.1 and math.isnan(back[1]) and back[2:] == (1e300, -math.inf, 5e-324)
    for bad in ({"float16": ""}, {"float32": "not base64!"}, {"float32": "AAA="}, {"float32": "", "float64": ""}):
        with pytest.raises((PlanError, ValueError)):
            KeepPlan.from_dict({"method": "m", "budget": 0, "n_visual": 0, "stages": [
                {"where": "pre_llm", "kept": [], "scores": bad}]})


def test_appended_tokens_round_trip_losslessly():
    # every field (name, sources, weights, place) survives, as the sweep stores plans as JSON
    third = 1 / (3 + 1e-6)
    plan = KeepPlan("m", 3, 8, (Stage("pre_llm", (0, 1, 2, 4, 5, 6), appends=(Append(6, (7,), (0.25, 0.75), after=2),)),
                                Stage(2, (0, 1, 6), position="reindex",
                                      appends=(Append(1, (2, 4), (third,) * 3), Append(0, (), (1.0,))))))
    back = KeepPlan.from_dict(json.loads(json.dumps(plan.to_dict(), allow_nan=False)))
    assert back == plan
    assert back.stages[1].appends[0].weights == (third,) * 3 and back.stages[0].appends[0].after == 2
    assert back.stages[1].appends[0].members == (1, 2, 4)
    row = plan.to_dict()
    for stage in row["stages"]:  # plans stored before appended tokens existed still read back
        del stage["appends"]
    assert all(s.appends == () for s in KeepPlan.from_dict(row).stages)


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
    (lambda: Stage("pre_llm", (0,), scores=((1.0, 2.0),)), "one number per visual token"),
    (lambda: KeepPlan("m", 1, 4, (Stage("pre_llm", (0, 1)), Stage(1, (0, 1, 3)))),
     r"keeps \[3\] which an earlier stage dropped"),
    (lambda: Stage("pre_llm", (2, 1)), "sorted and unique"),
    (lambda: Stage("pre_llm", (1, 1)), "sorted and unique"),
    (lambda: Stage(-1, (1,)), "non-negative layer index"),
    (lambda: Stage("later", (1,)), "'pre_llm' or a decoder layer index"),
    (lambda: Stage("pre_llm", (1,), position="shifted"), "position policy must be one of"),
    (lambda: Stage("pre_llm", (0, 1), merges=(Merge(0, (1,), (.5, .5)),)), r"sources \[1\] of merge target 0 are kept"),
    (lambda: Stage("pre_llm", (1,), merges=(Merge(0, (2,), (.5, .5)),)), "merge target 0 is not kept"),
    (lambda: Merge(0, (1, 2), (1.0,)), "1 weights for 1 target \\+ 2 sources"),
    (lambda: Merge(0, (), ()), "has no source tokens"),
    (lambda: Merge(0, (1,), (math.nan, 1.0)), "non-finite weights"),
    (lambda: Merge(0, (0, 1), (1., 1., 1.)), "lists the target among its sources"),
    (lambda: Stage(1, (0,), appends=(Append(1, (2,), (.5, .5)),)), "appended token 1 is not kept"),
    (lambda: Stage(1, (0, 1, 2), appends=(Append(1, (2,), (.5, .5)),)), r"sources \[2\] of appended token 1 are kept"),
    (lambda: Stage(1, (0, 1), appends=(Append(1, (), (1.,)), Append(1, (2,), (.5, .5)))), "token 1 is made twice"),
    (lambda: Stage(1, (0, 1), merges=(Merge(1, (3,), (.5, .5)),), appends=(Append(1, (2,), (.5, .5)),)),
     "token 1 is made twice"),
    (lambda: Stage("tower:1", (0, 1), appends=(Append(1, (2,), (.5, .5)),)), "not in the vision tower"),
    (lambda: Append(1, (2,), (1.,)), r"1 weights for 1 token \+ 1 sources"),
    (lambda: Append(1, (1,), (1., 1.)), "lists a token twice"),
    (lambda: Append(1, (), (math.inf,)), "non-finite weights"),
    (lambda: Append(1, (), (1.,), after="end"), "'after' must be a visual index or None"),
    (lambda: KeepPlan("m", 1, 4, (Stage("pre_llm", (0, 1)), Stage(1, (0,), appends=(Append(0, (2,), (.5, .5)),)))),
     r"appended token 0 uses tokens \[2\] that were already dropped"),
    (lambda: KeepPlan("m", 1, 4, (Stage("pre_llm", (0, 1)), Stage(1, (0,), appends=(Append(0, (), (1.,), after=3),)))),
     r"appended token 0 uses tokens \[3\] that were already dropped"),
])
def test_bad_plans_fail_with_clear_errors(build, message):
    with pytest.raises(PlanError, match=message):
        build()


def test_a_stage_holds_its_kept_tokens_as_python_ints_and_a_read_only_array():
    import numpy as np

    stage = Stage(np.int64(2), np.array([1, 5, 9]), np.arange(12, dtype=np.float32))
    assert stage.kept == (1, 5, 9) and all(type(i) is int for i in stage.kept)
    assert all(type(s) is float for s in stage.scores) and stage.where == 2 and type(stage.where) is int
    assert stage.kept_array.tolist() == [1, 5, 9] and not stage.kept_array.flags.writeable
    assert Stage("pre_llm", ()).kept == () and Stage("pre_llm", (1.0, 2.0)).kept == (1, 2)


def test_merge_mean():
    merge = Merge.mean(3, [4, 5, 6])
    assert merge.weights == (0.25,) * 4 and merge.sources == (4, 5, 6)
