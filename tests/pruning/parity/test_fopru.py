"""FoPru parity against the paper's rule (no official code was released; see the method's docstring).

Paper: Jiang et al., "FoPru: Focal Pruning for Efficient Large Vision-Language Models" (arXiv
2411.14164): a token's significance is the attention it RECEIVES in the vision encoder, averaged over
the heads and over every query; the rank strategy (global view) keeps the most significant tokens
anywhere, the row strategy (local view, "continuous key information") keeps the grid rows with the
highest mean significance whole; the kept tokens go back to their original order before the LLM.
What the paper leaves open is fixed by the method's parameters, and the reference uses the same
choices: the projector's feed layer of the tower, every query row ([CLS] included) and the patch keys,
a partial last row filled by its most significant tokens; ties to the lower index / the earlier row.
The reference reads the eager copy's tower attention (``output_attentions``) directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import case, eager_tower, facts, jaccard, labels, n_keep, torch_topk, workbench_plan
from workbench.pruning.methods.fopru import FoPru
from workbench.pruning.plan import PRE_LLM

BUDGETS = (0.125, 0.3, 0.5)  # 0.3 of a 12-wide grid is not whole rows: the partial-row rule


def significance(adapter, prepared) -> torch.Tensor:
    """[patches] attention received by each patch key: head mean, mean over every query row."""
    attention = eager_tower(adapter, prepared).attentions[facts(adapter).projector_feed_tower_layer]
    a = attention[0].double()                     # [H, P+1, P+1] (one view)
    return a.mean(dim=0).mean(dim=0)[1:]          # heads, then every query; the patch keys


def paper_rank(sig: torch.Tensor, k: int) -> np.ndarray:
    return torch_topk(sig, k)


def paper_row(sig: torch.Tensor, rows: int, cols: int, k: int) -> np.ndarray:
    grid = sig.reshape(rows, cols)
    order = torch.sort(-grid.mean(dim=1), stable=True).indices.tolist()  # rows by mean, earlier first on ties
    kept: list[int] = []
    for r in order:
        room = k - len(kept)
        if room <= 0:
            break
        cells = r * cols + np.arange(cols)
        if room >= cols:
            kept.extend(cells.tolist())
        else:  # the partial last row: its most significant tokens
            kept.extend(cells[torch_topk(grid[r], room)].tolist())
    return np.sort(np.asarray(kept))


@pytest.mark.parametrize("label", labels(("llava",)))
def test_both_strategies_equal_the_paper_rule(label):
    adapter, prepared = case(label)
    (group,) = prepared.layout.groups  # single-grid layouts: patch order = layout order
    sig = significance(adapter, prepared)
    assert len(sig) == prepared.layout.n_tokens == group.rows * group.cols
    for budget in BUDGETS:
        k = n_keep(prepared, budget)
        for strategy, kept in (("rank", paper_rank(sig, k)), ("row", paper_row(sig, group.rows, group.cols, k))):
            (stage,) = workbench_plan(FoPru(strategy=strategy), adapter, prepared, budget).stages
            assert stage.where == PRE_LLM
            assert len(stage.kept) == len(kept) == k, (label, budget, strategy)
            assert jaccard(stage.kept, kept) == 1.0, (label, budget, strategy)
