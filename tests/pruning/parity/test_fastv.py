"""FastV parity: the official ``fast_v_inplace`` rule against ``FastV().select``.

Official code: pkunlp-icler/FastV, src/transformers/src/transformers/models/llama/modeling_llama.py
lines 736-746 (HEAD): at ``idx == AGG_LAYER`` (K) it takes ``layer_outputs[1]`` -- the attention of
the previous layer, K-1 -- averages it over heads (``torch.mean(..., dim=1)[0]``, line 740), takes
the LAST token's row (``[-1]``, line 742), slices the image keys
``[SYS_LENGTH:SYS_LENGTH+IMAGE_TOKEN_LENGTH]`` (line 744) and keeps
``.topk(ATTENTION_RANK).indices`` (line 746); ATTENTION_RANK is the configured kept count, so the
budget is the official count. K=2 on the 32-layer decoder, placed at the same relative depth.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.pruning.parity.common import (case, eager_forward, facts, jaccard, labels, n_keep, torch_topk,
                                         visual_positions, workbench_plan)
from tests.tiny_models import TINY_FAMILIES
from workbench.pruning.layers import scaled_layer
from workbench.pruning.methods.fastv import FastV

BUDGETS = (0.11, 0.25, 0.5)


def official_fastv(adapter, prepared, n_keep: int, agg_layer: int = 2) -> tuple[int, np.ndarray]:
    """(K, kept visual indices) by the official rule, from the eager model's own attention maps."""
    k = scaled_layer(agg_layer, facts(adapter).decoder_layers)
    attention = eager_forward(adapter, prepared).attentions[k - 1]  # layer_outputs[1] at idx == K
    avg = attention.double().mean(dim=1)[0]                        # line 740: mean over heads
    last = avg[-1]                                                 # line 742: the last token's row
    image = last[visual_positions(prepared)]                       # line 744: the image keys
    return k, torch_topk(image, n_keep)                            # line 746


@pytest.mark.parametrize("label", labels(TINY_FAMILIES))
def test_default_equals_the_official_rule(label):
    adapter, prepared = case(label)
    for budget in BUDGETS:
        plan = workbench_plan(FastV(), adapter, prepared, budget)
        (stage,) = plan.stages
        k, kept = official_fastv(adapter, prepared, n_keep(prepared, budget))
        assert stage.where == k, label
        assert jaccard(stage.kept, kept) == 1.0, (label, budget)
