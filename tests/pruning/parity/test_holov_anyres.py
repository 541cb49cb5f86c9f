"""HoloV parity on multi-crop (AnyRes) layouts: the official rule on the code's flattened crops against
``select`` on the tiny LLaVA-NeXT at three image shapes.

Official code: obananas/HoloV (HEAD), llava/model/llava_arch.py
- lines 141-145 (``encode_images``): every view's [CLS] row (``attentions[-2][:, :, 0, 1:]``), head mean;
- lines 168-203: the crops' features AND attention rows stitched (``view(nph, npw, h, w)``,
  ``permute``) and unpadded with ``unpad_image``, the newline columns commented out (lines 191-198),
  flattened row-major and appended to the base view's (lines 204-205): one sequence, base first;
- line 239: ``HoloV(...)`` on that sequence with the projected features (utils.py lines 22-143, the
  rule of test_holov.py, whose reference is reused with this attention).
The layout keeps the model's newline tokens as separators outside the visual tokens, so its visual
tokens are the code's sequence in the same order; the reference builds the attention sequence from the
views by the code's geometry, not by the layout's tower map. Crop counts: ``chunk_count`` as in
test_holov.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.pruning.parity.anyres import SIZES, llava_next_case, stitching, view_attentions
from tests.pruning.parity.common import facts, jaccard, n_keep, workbench_plan
from tests.pruning.parity.test_holov import official_holov
from workbench.pruning.methods.holov import HoloV, chunk_count

BUDGETS = (0.125, 0.25, 0.5)


def code_attention_sequence(adapter, prepared) -> torch.Tensor:
    """[N] the code's flattened attention: the base view's row, then the stitched, unpadded crops'."""
    rows = view_attentions(adapter, prepared, facts(adapter).projector_feed_tower_layer).mean(dim=1)
    grid = stitching(adapter, prepared, rows.shape[1])
    crops = rows[1:].view(grid.nph, grid.npw, grid.side, grid.side).permute(0, 2, 1, 3)    # lines 181, 186
    stitched = crops.reshape(grid.nph * grid.side, grid.npw * grid.side)                    # line 188
    unpadded = stitched[grid.top:grid.top + grid.rows, grid.left:grid.left + grid.cols]     # unpad_image
    return torch.cat([rows[0], unpadded.flatten()])                                          # lines 199-205


@pytest.mark.parametrize("size", SIZES)
def test_default_equals_the_official_rule_on_the_flattened_crops(size):
    adapter, prepared = llava_next_case(size)
    attention = code_attention_sequence(adapter, prepared)
    assert len(attention) == prepared.layout.n_tokens
    for budget in BUDGETS:
        k = n_keep(prepared, budget)
        (stage,) = workbench_plan(HoloV(), adapter, prepared, budget).stages
        kept = official_holov(adapter, prepared, k, chunk_count(prepared.layout.n_tokens, k), None, attention)
        assert len(stage.kept) == len(kept)
        assert jaccard(stage.kept, kept) == 1.0, (size, budget)
