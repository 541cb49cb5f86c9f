"""The training losses of the shipped model, computed with only the work they need.

The answer loss reads the last decoder layer only at the positions that predict an answer token
(about 12 of 212 per sequence), and the auxiliary loss reads the projected visual tokens. So the
last layer computes keys and values at every position but its queries, attention output and MLP
only at those positions. The losses and gradients are those of the model's full forward (a test
checks both); a training step costs 0.77-0.84x a full-forward one (``benchmarks/bench_train_step.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import rotate_half

IGNORE = -100  # label of the positions that carry no loss


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, Q] positions whose next token is an answer token, in order and padded with 0,
    [B, Q] which of them are real)."""
    predicts_answer = labels[:, 1:] != IGNORE
    counts = predicts_answer.sum(1)
    width = int(counts.max())
    positions = torch.argsort((~predicts_answer).int(), dim=1, stable=True)[:, :width]
    return positions, torch.arange(width)[None] < counts[:, None]


def _take(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


def _last_layer_at(layer, hidden: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> torch.Tensor:
    """The output of a Llama decoder ``layer`` at ``positions`` only, attending causally to every
    position of ``hidden``."""
    attn = layer.self_attn
    batch, length, _ = hidden.shape

    def by_head(x):
        return x.view(batch, x.shape[1], -1, attn.head_dim).transpose(1, 2)

    normed = layer.input_layernorm(hidden)
    keys, values = by_head(attn.k_proj(normed)), by_head(attn.v_proj(normed))
    keys = keys * cos[:, None] + rotate_half(keys) * sin[:, None]
    queries = by_head(attn.q_proj(_take(normed, positions)))
    cos_q, sin_q = (_take(t.expand(batch, -1, -1), positions)[:, None] for t in (cos, sin))
    queries = queries * cos_q + rotate_half(queries) * sin_q
    keys, values = (x.repeat_interleave(attn.num_key_value_groups, dim=1) for x in (keys, values))
    # Right padding: a real query never reaches a padded key under the causal mask alone.
    causal = torch.arange(length)[None, None] <= positions[:, :, None]
    mixed = F.scaled_dot_product_attention(queries, keys, values, attn_mask=causal[:, None], scale=attn.scaling)
    out = _take(hidden, positions) + attn.o_proj(mixed.transpose(1, 2).reshape(batch, positions.shape[1], -1))
    return out + layer.mlp(layer.post_attention_layernorm(out))


def full_forward_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``training_losses`` computes, through the model's own forward: the reference it is
    checked and benchmarked against."""
    out = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask)
    answer = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=IGNORE)
    visual = torch.cat(list(out.image_outputs.pooler_output))  # one [N, D] tensor per image
    return answer, visual.view(len(batch.input_ids), -1, visual.shape[-1])


def training_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over the answer tokens, [B, N, D] projected visual tokens) of a
    ``LlavaForConditionalGeneration`` with a Llama decoder on a right-padded ``batch``
    (``input_ids``, ``pixel_values``, ``labels``)."""
    input_ids, labels = batch.input_ids, batch.labels
    inner = model.model
    decoder = inner.language_model
    visual = torch.cat(inner.get_image_features(pixel_values=batch.pixel_values).pooler_output)
    is_image = (input_ids == model.config.image_token_id)[..., None]
    hidden = inner.get_input_embeddings()(input_ids).masked_scatter(is_image, visual)
    position_ids = torch.arange(input_ids.shape[1])[None]
    cos, sin = decoder.rotary_emb(hidden, position_ids=position_ids)
    for layer in decoder.layers[:-1]:  # no mask: the causal one alone is right, as padding is on the right
        hidden = layer(hidden, attention_mask=None, position_embeddings=(cos, sin), position_ids=position_ids)
    positions, real = answer_positions(labels)
    out = _last_layer_at(decoder.layers[-1], hidden, positions, cos, sin)
    logits = model.lm_head(decoder.norm(out))
    targets = labels[:, 1:].gather(1, positions)
    return F.cross_entropy(logits[real], targets[real]), visual.view(len(input_ids), -1, visual.shape[-1])
