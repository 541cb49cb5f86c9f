"""The paper-only methods (FoPru, G-Prune, TopV: no code released) against their papers' rules on
multi-tile layouts: the tiny LLaVA-NeXT (base view + AnyRes crops, three image shapes for FoPru), and
for the in-LLM rules the tiny OneVision, Idefics3 and SmolVLM (base view + tiles) as well.

The rules and the choices the papers leave open are those of test_fopru.py, test_gprune.py and
test_topv.py (their references are reused). What a multi-tile layout adds:
- FoPru reads the tower: every view's significance (head mean, mean over every query row, patch keys)
  is placed on the layout's tokens by the code-independent LLaVA-NeXT geometry (base row-major, crops
  stitched and unpadded, ``anyres.py``), not by the layout's tower map; ``rank`` ranks all tokens,
  ``row`` ranks the rows of the base grid and of the stitched grid together (the method's choice).
- G-Prune and TopV read the decoder: the visual tokens are the layout's (newline separators excluded),
  TopV's spatial terms use every token's pixel box in the original image (base and tiles overlap).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.anyres import SIZES, llava_next_case, stitching, token_of
from tests.pruning.parity.common import case, eager_tower, facts, jaccard, n_keep, torch_topk, workbench_plan
from tests.pruning.parity.test_gprune import SEARCHED, paper_gprune
from tests.pruning.parity.test_topv import VARIANTS, paper_topv
from workbench.pruning.methods.fopru import FoPru
from workbench.pruning.methods.gprune import GPrune
from workbench.pruning.methods.topv import TopV

BUDGETS = (0.125, 0.3, 0.5)
MULTI_TILE = ("llava_next", "llava_onevision", "idefics3", "smolvlm")


def layout_significance(adapter, prepared) -> np.ndarray:
    """[N] FoPru's significance of every layout token, from its own view's patch."""
    layer = facts(adapter).projector_feed_tower_layer
    attention = eager_tower(adapter, prepared, prepared.inputs["pixel_values"].flatten(0, 1)).attentions[layer]
    per_view = attention.double().mean(dim=1).mean(dim=1)[:, 1:]          # heads, every query; patch keys
    locate = token_of(prepared, stitching(adapter, prepared, per_view.shape[1]))
    out = np.full(prepared.layout.n_tokens, np.nan)
    for v in range(per_view.shape[0]):
        for p in range(per_view.shape[1]):
            token = locate(v, p)
            if token is not None:
                out[token] = float(per_view[v, p])
    assert not np.isnan(out).any()
    return out


def paper_rows(layout, sig: np.ndarray, k: int) -> np.ndarray:
    """Rows of every grid by mean significance (earlier grid, then row, on ties), whole while they fit,
    the partial last row by its most significant tokens."""
    rows = []
    for g, group in enumerate(layout.groups):
        for r in range(group.rows):
            cells = np.flatnonzero((layout.group == g) & (layout.cell[:, 0] == r))
            cells = cells[np.argsort(layout.cell[cells, 1])]
            rows.append((-sig[cells].mean(), g, r, cells))
    kept: list[int] = []
    for _, _, _, cells in sorted(rows, key=lambda row: row[:3]):
        room = k - len(kept)
        if room <= 0:
            break
        kept.extend(cells.tolist() if room >= len(cells) else cells[torch_topk(sig[cells], room)].tolist())
    return np.sort(kept)


@pytest.mark.parametrize("size", SIZES)
def test_fopru_on_anyres_crops_equals_the_paper_rule(size):
    adapter, prepared = llava_next_case(size)
    sig = layout_significance(adapter, prepared)
    for budget in BUDGETS:
        k = n_keep(prepared, budget)
        for strategy, kept in (("rank", torch_topk(torch.as_tensor(sig), k)), ("row", paper_rows(prepared.layout, sig, k))):
            (stage,) = workbench_plan(FoPru(strategy=strategy), adapter, prepared, budget).stages
            assert len(stage.kept) == len(kept) == k, (size, budget, strategy)
            assert jaccard(stage.kept, kept) == 1.0, (size, budget, strategy)


@pytest.mark.parametrize("family", MULTI_TILE)
def test_gprune_on_multi_tile_layouts_equals_the_paper_rule(family):
    adapter, prepared = case(f"tiny-{family}")
    assert len(prepared.layout.tower_owner) > 1  # several views
    for budget in BUDGETS:
        for kwargs in ({}, {"rows": "last"}, {"rates": SEARCHED}):
            reference = paper_gprune(adapter, prepared, budget, **kwargs)
            stages = {s.where: s.kept for s in workbench_plan(GPrune(**kwargs), adapter, prepared, budget).stages}
            assert reference and stages.keys() == reference.keys(), (family, budget, kwargs)
            for layer, kept in reference.items():
                assert jaccard(stages[layer], kept) == 1.0, (family, budget, kwargs, layer)


@pytest.mark.parametrize("family", MULTI_TILE)
def test_topv_on_multi_tile_layouts_equals_the_paper_rule(family):
    adapter, prepared = case(f"tiny-{family}")
    for budget in BUDGETS:
        for kwargs in VARIANTS:
            k, kept = paper_topv(adapter, prepared, n_keep(prepared, budget), **kwargs)
            (stage,) = workbench_plan(TopV(**kwargs), adapter, prepared, budget).stages
            assert stage.where == k and len(stage.kept) == len(kept) == n_keep(prepared, budget), (family, kwargs)
            assert jaccard(stage.kept, kept) == 1.0, (family, budget, kwargs)
