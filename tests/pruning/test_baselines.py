"""The layout-only baselines, budgets, the spatial windows and the method registry."""

from __future__ import annotations

import numpy as np
import pytest

from tests.pruning.handmade import grid_layout
from workbench.pruning.baselines import AveragePool, RandomPrune, UniformGrid
from workbench.pruning.budget import resolve_budget, split_budget
from workbench.pruning.executor import execute
from workbench.pruning.grid import grid_windows
from workbench.pruning.method import SelectionContext
from workbench.pruning.plan import Merge
from workbench.pruning.registry import InvalidMethodParameters, UnknownMethod, available_methods, create_method, method_class


# --- budgets and windows ---------------------------------------------------------------------------

def test_budget_is_a_count_or_a_fraction():
    assert resolve_budget(36, 144) == 36
    assert resolve_budget(0.25, 144) == 36
    assert resolve_budget(1.0, 144) == 144 and resolve_budget(0.0, 144) == 0
    assert resolve_budget(0.5, 5) == 3  # half up
    for bad, message in [(200, "outside 0..144"), (-1, "outside"), (1.5, "fraction"), (True, "count"),
                         ("36", "count"), (float("nan"), "fraction")]:
        with pytest.raises(ValueError, match=message):
            resolve_budget(bad, 144)


def test_split_budget_is_proportional_and_exact():
    assert split_budget(5, [4, 16]) == [1, 4]
    assert split_budget(3, [2, 2, 2]) == [1, 1, 1]
    assert split_budget(2, [3, 3, 3]) == [1, 1, 0]
    assert sum(split_budget(37, [144, 576, 576])) == 37


@pytest.mark.parametrize("rows, cols", [(4, 4), (3, 5), (12, 12), (1, 7), (6, 2)])
def test_windows_partition_the_grid_for_every_count(rows, cols):
    for count in range(rows * cols + 1):
        windows = grid_windows(rows, cols, count)
        assert len(windows) == count
        cells = [c for w in windows for c in w.cells]
        if count:
            assert sorted(cells) == [(r, c) for r in range(rows) for c in range(cols)]
        assert all(w.centre in w.cells for w in windows)


def test_square_counts_give_the_regular_pooling():
    windows = grid_windows(12, 12, 36)
    assert {len(w.cells) for w in windows} == {4}
    assert [w.centre for w in windows[:3]] == [(1, 1), (1, 3), (1, 5)]


# --- the baselines -------------------------------------------------------------------------------

def test_uniform_grid_keeps_the_window_centres():
    layout = grid_layout((4, 4))
    assert UniformGrid().select(SelectionContext(layout, 4)).final_kept == (5, 7, 13, 15)
    assert UniformGrid().select(SelectionContext(layout, 0.25)).final_kept == (5, 7, 13, 15)
    assert UniformGrid().select(SelectionContext(layout, 2)).final_kept == (9, 11)  # one band, row 2


def test_uniform_grid_shares_the_budget_across_groups():
    layout = grid_layout((2, 2), (4, 4))  # tokens 0-3, then 4-19
    plan = UniformGrid().select(SelectionContext(layout, 5))
    assert plan.final_kept == (3, 9, 11, 17, 19)
    assert plan.method == "uniform_grid" and plan.budget == 5 and plan.n_visual == 20


def test_average_pool_merges_each_window_into_its_centre():
    layout = grid_layout((4, 4))
    plan = AveragePool().select(SelectionContext(layout, 4))
    stage = plan.stages[0]
    assert stage.kept == (5, 7, 13, 15)
    assert stage.merges == (Merge.mean(5, (0, 1, 4)), Merge.mean(7, (2, 3, 6)),
                            Merge.mean(13, (8, 9, 12)), Merge.mean(15, (10, 11, 14)))
    # full budget: nothing to merge
    assert AveragePool().select(SelectionContext(layout, 16)).stages[0].merges == ()


def test_random_prune_is_seeded():
    layout = grid_layout((4, 4))
    plan = RandomPrune(seed=3).select(SelectionContext(layout, 6))
    assert plan.final_kept == tuple(sorted(np.random.default_rng(3).choice(16, 6, replace=False)))
    assert plan == RandomPrune(seed=3).select(SelectionContext(layout, 6))
    assert plan != RandomPrune(seed=4).select(SelectionContext(layout, 6))


@pytest.mark.parametrize("method", [RandomPrune(), UniformGrid(), AveragePool()])
@pytest.mark.parametrize("budget", [0, 1, 7, 0.3, 1.0])
def test_every_baseline_keeps_exactly_the_budget(method, budget):
    layout = grid_layout((3, 3), (4, 5))
    context = SelectionContext(layout, budget)
    plan = method.select(context)
    assert len(plan.final_kept) == context.n_keep == plan.budget


def test_invalid_hyper_parameters_and_contexts():
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        RandomPrune(seed=-1)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        RandomPrune(seed=0.5)
    with pytest.raises(ValueError, match="outside 0..16"):
        SelectionContext(grid_layout((4, 4)), 17)


def test_baselines_run_under_the_executor(shipped):
    adapter, prepared, _ = shipped
    layout = prepared.layout
    for method in (RandomPrune(), UniformGrid(), AveragePool()):
        execution = execute(adapter, prepared, method.select(SelectionContext(layout, 36)), max_new_tokens=2)
        assert execution.visual_tokens_per_layer == (36,) * len(adapter.decoder_layers())
        assert execution.tokens_per_layer[0] == layout.sequence_length - layout.n_tokens + 36


# --- registry ------------------------------------------------------------------------------------

def test_registry_lists_creates_and_rejects_by_name():
    assert {"random", "uniform_grid", "average_pool"} <= set(available_methods())
    assert method_class("uniform_grid") is UniformGrid
    assert create_method("random", seed=5) == RandomPrune(seed=5)
    assert RandomPrune().name == "random" and RandomPrune(seed=2).params() == {"position": "reindex", "seed": 2}
    with pytest.raises(UnknownMethod, match="unknown pruning method 'fastvv'; available: .*average_pool.*random"):
        method_class("fastvv")
    with pytest.raises(InvalidMethodParameters, match="random: .*unexpected keyword argument 'sed'"):
        create_method("random", sed=5)
    with pytest.raises(InvalidMethodParameters, match="random: seed must be a non-negative int"):
        create_method("random", seed=-1)
