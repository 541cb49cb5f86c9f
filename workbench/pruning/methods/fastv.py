"""FastV: drop the visual tokens the decoder attends to least, once, early inside the LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.pruning.layers import check_reference_layers, scaled_layer
from workbench.pruning.method import ModelFacts, PruningMethod, SelectionContext, SignalNeed, check_choice
from workbench.pruning.plan import KeepPlan, Stage
from workbench.pruning.ranking import top_k
from workbench.pruning.registry import register_method

FASTV_ROWS = ("last", "text")


@register_method("fastv")
@dataclass(frozen=True)
class FastV(PruningMethod):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764).

    Before decoder layer K (K=2 on LLaVA-1.5-7B, placed on this decoder with ``scaled_layer``)
    the visual tokens are ranked by the attention they receive in layer K-1 -- the attention map
    the reference reads from the previous layer's output (``layer_outputs[1]`` at ``idx == K``) --
    averaged over heads, and the top ``n_keep`` survive. Surviving tokens keep their original
    position ids (the reference sets ``position_ids = keep_indexs``).

    The reference code (pkunlp-icler/FastV, ``src/transformers/src/transformers/models/llama/
    modeling_llama.py``, the ``fast_v_inplace`` branch) ranks by the attention row of the LAST
    token only (``last_layer_attention_avg[-1]``); the paper describes the attention averaged
    over the tokens. We follow the code by default (``rows="last"``); ``rows="text"`` is the
    variant that averages the rows of every text token after the image.

    Nothing is pruned before layer K, so layer K-1's attention on the live sequence equals the
    unpruned forward's: the ranking is read from the recording and applied as a planned stage.
    """

    scored_by: ClassVar[str] = "text_attention"

    reference: ClassVar[str] = (
        "FastV, 'An Image is Worth 1/2 Tokens After Layer 2' (arXiv 2403.06764); code pkunlp-icler/FastV, "
        "src/transformers/src/transformers/models/llama/modeling_llama.py (fast_v_inplace). Ranks visual "
        "tokens by layer K-1's head-mean attention and drops the rest before layer K (K=2, scaled), original "
        "position ids kept. Code uses the last token's attention row, the paper an average over tokens: we "
        "follow the code (rows='last'); rows='text' averages every text row after the image.")

    layer: int = 2  # K on the 32-layer reference decoder
    rows: str = "last"

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, (int, np.integer)) or self.layer < 1:
            raise ValueError(f"fastv: layer K must be an int >= 1 (the reference uses 2), got {self.layer!r}")
        check_choice("fastv", "rows", self.rows, FASTV_ROWS)
        check_reference_layers("fastv", "layer", int(self.layer))

    def prune_layer(self, model: ModelFacts) -> int:
        """K on this decoder; the ranking attention is layer K-1's."""
        return scaled_layer(self.layer, model.decoder_layers)

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        return (SignalNeed("attention", "llm", self.prune_layer(model) - 1, self.rows),)

    def select(self, context: SelectionContext) -> KeepPlan:
        (need,) = self.needs(context.require_model())
        attention = context.signal(need)  # [R, N] head means
        scores = attention.mean(axis=0)
        kept = top_k(scores, context.n_keep)
        stage = Stage(self.prune_layer(context.model), tuple(kept), tuple(scores), position="original")
        return self.plan(context, [stage])
