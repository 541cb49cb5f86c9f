"""Every registered method: documented, listed, and runnable on the shipped model and on every tiny
family it applies to, keeping the counts its schedule documents."""

from __future__ import annotations

import functools

import pytest

from tests.pruning.shipped import run_checked, shipped_sample, tiny_input
from tests.tiny_models import TINY_FAMILIES
from workbench.cli import main
from workbench.pruning.method import MethodNotApplicable, ModelFacts
from workbench.pruning.registry import available_methods, create_method, method_class, register_method
from workbench.pruning.run import record_needs

PUBLISHED = ("fastv", "fastervlm", "vtc_cls", "visionzip", "sparsevlm", "pyramiddrop", "flowcut", "divprune",
             "hiprune", "feather", "visiondrop", "dart", "transprune", "mmtok", "todre", "hired",
             "vispruner", "cdpruner", "scope", "holov", "aim", "vscan", "vflowopt", "fopru", "gprune", "topv")
BASELINES = ("random", "uniform_grid", "average_pool")


def test_every_published_method_and_baseline_is_registered_and_documented(capsys):
    assert set(PUBLISHED + BASELINES) <= set(available_methods())
    for name in PUBLISHED:
        cls = method_class(name)
        assert cls.__doc__ and len(cls.reference) > 80, name  # names its reference and how we follow it
        create_method(name)  # the reference defaults validate
    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    assert all(f"\n{name}  (" in "\n" + listed for name in PUBLISHED + BASELINES)
    scored_by = {name: method_class(name).scored_by for name in available_methods()}
    assert sorted(n for n, s in scored_by.items() if s == "layout") == sorted(BASELINES)
    assert "scored by: layout" in listed
    assert {scored_by[n] for n in ("fastv", "pyramiddrop", "sparsevlm")} == {"text_attention"}
    assert {scored_by[n] for n in ("fastervlm", "visionzip")} == {"visual_attention"}


def test_a_method_must_say_what_scores_its_tokens():
    from workbench.pruning.method import PruningMethod

    class Unlabelled(PruningMethod):
        def select(self, context):
            raise NotImplementedError

    with pytest.raises(ValueError, match="scored_by"):
        register_method("unlabelled")(Unlabelled)
    assert "unlabelled" not in available_methods()


@functools.lru_cache(maxsize=None)
def shipped_recording():
    """One recording of the shipped sample that every registered method reads."""
    adapter, prepared, _ = shipped_sample()
    return record_needs(adapter, prepared, [create_method(name) for name in available_methods()])


@pytest.mark.parametrize("budget", [0.33, 0.11])
@pytest.mark.parametrize("name", sorted(set(PUBLISHED + BASELINES)))
def test_kept_counts_follow_the_documented_schedule_on_the_shipped_model(name, budget):
    adapter, prepared, _ = shipped_sample()
    execution, _ = run_checked(adapter, prepared, create_method(name), budget, recording=shipped_recording(),
                               max_new_tokens=2)
    assert execution.visual_tokens_per_layer[-1] == len(execution.final_kept)
    assert execution.answer_ids


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_method_runs_or_says_why_not_on_every_family(family):
    adapter, prepared = tiny_input(family)
    facts = ModelFacts.of(adapter)
    methods = [create_method(name) for name in available_methods()]
    recording = record_needs(adapter, prepared, [m for m in methods if m.applicability(facts) is None])
    ran = []
    for method in methods:
        reason = method.applicability(facts)
        if reason is not None:
            with pytest.raises(MethodNotApplicable, match=method.name):
                method.check_applies(facts)
            continue
        run_checked(adapter, prepared, create_method(method.name), 0.25, recording=recording, max_new_tokens=2)
        ran.append(method.name)
    assert set(BASELINES) <= set(ran) and len(ran) >= len(BASELINES) + 8, ran


def test_methods_say_where_they_act_on_the_loaded_model(capsys):
    # FastV's K=2 of 32 layers lands before layer 1 of the shipped model's 4; PyramidDrop's three
    # stages (8 / 16 / 24 of 32) before layers 1, 2 and 3; GlobalCom2 says why it does not apply.
    assert main(["methods", "fastv", "pyramiddrop", "globalcom2", "--model", "shapes-vlm", "--budget", "0.25"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("  (")[0]: line for line in out.splitlines()}
    acts = [line for line in out.splitlines() if "acts on shapes-vlm" in line]
    assert acts[0].endswith("before decoder layer 1 (36 kept)")
    assert "before decoder layer 1 (72 kept); before decoder layer 2 (36 kept); before decoder layer 3 (18 kept)" in acts[1]
    assert "does not apply: its layouts have no thumbnail" in acts[2]
    assert "fastv" in lines
