"""The logit lens: what each decoder layer's residual stream at the last position would predict.

After every decoder layer the hidden state of the last prompt token (the one that predicts the
first answer token) is put through the decoder's final norm and the LM head, as if the model
stopped there (nostalgebraist's logit lens; the LLM Transparency Tool's per-layer view). For a
chosen token this gives its rank (0 = the top prediction) and probability after each layer. The
last layer's row is the model's own next-token distribution, so its rank-0 token is the greedy
answer's first token.

One extra forward of the unpruned model, read through forward hooks on the decoder layers; the
adapter names the layers, the norm and the head, so nothing here knows a model family.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class LogitLens:
    """Per decoder layer (after it): ``rank`` and ``probability`` of ``token_id``, and the top token."""

    token_id: int
    layers: tuple[int, ...]
    rank: np.ndarray  # [L] int: how many vocabulary entries score higher
    probability: np.ndarray  # [L] float
    top_token: tuple[int, ...]  # [L] the layer's rank-0 token id


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def logit_lens(adapter, prepared, token_id: int) -> LogitLens:
    """The logit lens of ``prepared`` (``ModelAdapter.prepare``) for ``token_id`` at the last position."""
    layers = list(adapter.decoder_layers())
    states: dict[int, torch.Tensor] = {}

    def keep(index):
        def hook(module, args, output):
            states[index] = _hidden(output)[0, -1].detach()
        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        adapter.model(**prepared.inputs)
    finally:
        for handle in handles:
            handle.remove()
    stacked = torch.stack([states[i] for i in range(len(layers))])  # [L, D]
    logits = adapter.output_head()(adapter.final_norm()(stacked)).float()  # [L, V]
    probs = torch.softmax(logits, dim=-1)
    target = logits[:, token_id : token_id + 1]
    return LogitLens(int(token_id), tuple(range(len(layers))), (logits > target).sum(-1).cpu().numpy(),
                     probs[:, token_id].cpu().numpy(), tuple(int(t) for t in logits.argmax(-1).tolist()))
