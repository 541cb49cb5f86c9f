"""Prefill FLOPs of the decoder for a given number of tokens per layer (what pruning saves).

Per layer with n tokens, hidden size d, query width d_q = heads x head_dim, key/value width d_kv
and MLP width m (gated, three matrices, as Llama and Qwen2 use):
projections 2n(d d_q + 2 d d_kv + d_q d), attention scores and mix 4 n^2 d_q, MLP 6 n d m.
This is FastV's 4nd^2 + 2n^2d + 2ndm counted with multiply-adds as two FLOPs, GQA and gating
made explicit. Embeddings, norms, the softmax and the output head are left out (the same for
every plan, and small).

The n of a layer is the rows it computes (``Execution.tokens_per_layer``), not the tokens it attends
to: a token a masking stage dropped (``Stage.dropped == "masked"``, AIM's code) is still a row
whose projections and MLP are computed, and dense attention still multiplies its query and its
(hidden) key, so it costs what a kept token costs. Separators a pre-LLM stage leaves out of the
LLM input (``Stage.separators == "dropped"``, HiRED's code) are no rows of any layer, so they cost
nothing. A tower [CLS] a plan passes to the LLM (``cls_token``, VisionZip's and VisionDrop's code) is
a row of every layer it reaches, so it costs what a patch costs; a padded patch (``padded_patch``,
VisPruner's code on LLaVA-NeXT) likewise.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    query_width: int
    kv_width: int
    mlp: int

    @staticmethod
    def of(config) -> "DecoderShape":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return DecoderShape(config.hidden_size, heads * head_dim, kv_heads * head_dim, config.intermediate_size)

    def layer_flops(self, n: int) -> float:
        d, dq, dkv, m = self.hidden, self.query_width, self.kv_width, self.mlp
        return 2.0 * n * (d * dq + 2 * d * dkv + dq * d) + 4.0 * n * n * dq + 6.0 * n * d * m


def prefill_flops(shape: DecoderShape, tokens_per_layer) -> float:
    return float(sum(shape.layer_flops(int(n)) for n in tokens_per_layer))
