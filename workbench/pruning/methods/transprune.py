"""TransPrune (Li et al. 2025): token transition variation plus instruction-guided attention, in stages.

Per accumulating decoder layer and per token, each sublayer (attention, then FFN) contributes
``||out|| / ||in|| * softmax_seq(1 - cos(in, out))`` with ``in`` the sublayer's (normalised) input
and ``out`` its output, the softmax running over the whole sequence; the two are added and summed
over the accumulating layers (token transition variation, TTV). Before a pruning layer the visual
tokens are ranked by ``TTV / sum TTV + IGA / sum IGA``, IGA being that layer's attention from the
instruction tokens to the visual tokens (head mean, mean over the instruction rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from workbench.pruning.layers import check_reference_layers, scaled_layer
from workbench.pruning.method import ModelFacts, PruningMethod, SelectionContext, check_choice
from workbench.pruning.plan import POSITION_POLICIES, KeepPlan, Stage
from workbench.pruning.ranking import top_k
from workbench.pruning.registry import register_method

EPS = 1e-8  # the code's guard in both normalisations
BUDGET_MODES = ("fixed", "final")


def transition_weight(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """[S, D] x [S, D] -> [S]: ``||after|| / ||before|| * softmax_S(1 - cos(before, after))``
    (``compute_transf_weight`` of the reference)."""
    before, after = before.float(), after.float()
    ratio = after.norm(dim=-1) / before.norm(dim=-1)
    turn = 1 - torch.nn.functional.cosine_similarity(before, after, dim=-1)
    return ratio * torch.softmax(turn, dim=0)


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


@register_method("transprune")
@dataclass(frozen=True)
class TransPrune(PruningMethod):
    """TransPrune: progressive in-LLM pruning by token transition variation + instruction attention.

    Reference: "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model" (Li et
    al., arXiv 2507.20630, CVPR 2026); code github.com/liaolea/TransPrune,
    ``llava/model/modeling_llama_transprune.py`` (``LlamaDecoderLayer_TransPrune.compute_transf_weight``,
    ``LlamaModel.transprune_forward``, ``transprune_rank_drop``); defaults from
    ``scripts/transprune/v1_5_test/*.sh``: accumulating layers [7..12], pruning layers [7, 9, 12],
    ratios [0.875, 0.625, 0.125] of the image tokens.

    What the code does, and we follow (the probes' ``transition_magnitude``/``transition_direction``
    describe the residual stream across a whole layer, which is NOT what the code measures):
    * TTV of layer ``l`` (for every ``l + 1`` in the accumulating list, i.e. layers 6..11): per
      sublayer ``||out|| / ||in|| * exp(1 - cos) / sum_seq exp(1 - cos)`` with ``in`` = input_layernorm
      output / post_attention_layernorm output and ``out`` = attention output / MLP output (before
      the residual add), attention + FFN terms added, summed over the layers so far;
    * a stage after layer ``p - 1`` for each ``p`` in the pruning list = before decoder layer ``p``,
      with IGA from layer ``p``'s own q/k (input norm + RoPE) on the live sequence: rows = every
      token after the image up to the end of the prompt (our "text" rows), head mean, visual keys,
      mean over rows; score = ``TTV/(sum+1e-8) + IGA/(sum+1e-8)`` (``ttv_weight`` 1; the code's
      comment "a=0.5" is this equal weighting); top-k; positions renumbered contiguously
      (``position="reindex"``).
    Both parts depend on the already pruned sequence (the softmax runs over it, later layers see
    fewer tokens), so the method works on the live state: ``layer_callback`` computes IGA with
    ``LayerState.attention(text_rows)`` and captures each accumulating layer's sublayer inputs and
    outputs with one-shot forward hooks on that layer's attention and MLP during the pruned prefill;
    nothing is read from the recording.

    Schedule: before layer ``scaled_layer(p)`` keep ``int(N * ratio)`` (at most the previous stage).
    ``budget_mode="fixed"`` (default, the code: ``keep_length = int(N * image_token_ratio_list[s+1])``,
    transprune_rank_drop) ignores the budget, so the last stage keeps ``int(N * 0.125)``;
    ``budget_mode="final"`` (ours) makes the last stage keep ``n_keep`` (the budget plays the code's
    final 0.125) and the earlier ones at least the budget. Accumulating layers ``scaled_layer(a) - 1``;
    layers folding together keep the later stage. On
    the shipped 4-layer decoder: TTV of layers 0-1, stages before layer 1 (keeping 62.5 % of the
    visual tokens) and layer 2 (keeping 12.5 %, or the budget under ``budget_mode="final"``).
    Needs a decoder layer with an ``mlp`` submodule (Llama/Qwen2 style). On M-RoPE models (Qwen2-VL)
    the stages keep the original positions (the executor cannot renumber 3-axis positions).
    """

    scored_by: ClassVar[str] = "text_attention"
    hooks_layers: ClassVar[bool] = True  # its transitions are measured on the layers it watches

    reference: ClassVar[str] = (
        "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model (arXiv "
        "2507.20630); github.com/liaolea/TransPrune llava/model/modeling_llama_transprune.py "
        "(compute_transf_weight, transprune_rank_drop). Code followed: TTV = sum over sublayers of "
        "norm ratio x softmax_seq(1-cos) on sublayer in/out (not the residual stream), accumulated over "
        "layers 6-11; score = TTV/sum + IGA/sum (instruction rows), stages before layers 7, 9, 12, "
        "reindexed positions. Live pruned state (callback + hooks). Default budget_mode='fixed' keeps the code's "
        "int(N*ratio) per stage (final 0.125 N; the budget is ignored); variant budget_mode='final' keeps the budget "
        "at the last stage."
    )

    accumulate_layers: tuple[int, ...] = (7, 8, 9, 10, 11, 12)
    prune_layers: tuple[int, ...] = (7, 9, 12)
    ratios: tuple[float, ...] = (0.875, 0.625, 0.125)
    ttv_weight: float = 1.0
    position: str = "reindex"
    budget_mode: str = "fixed"

    def __post_init__(self):
        for name in ("accumulate_layers", "prune_layers", "ratios"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("accumulate_layers", "prune_layers"):
            layers = getattr(self, name)
            if not layers or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in layers):
                raise ValueError(f"transprune: {name} must be a non-empty tuple of layer numbers >= 1, got {layers}")
            if list(layers) != sorted(set(layers)):
                raise ValueError(f"transprune: {name} must be strictly increasing, got {layers}")
            check_reference_layers("transprune", name, layers)
        if len(self.ratios) != len(self.prune_layers) or not all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r <= 1 for r in self.ratios):
            raise ValueError("transprune: ratios must hold one fraction in (0, 1] per pruning layer, "
                             f"got {self.ratios}")
        if any(b > a for a, b in zip(self.ratios, self.ratios[1:])):
            raise ValueError(f"transprune: ratios must not increase, got {self.ratios}")
        if not isinstance(self.ttv_weight, (int, float)) or isinstance(self.ttv_weight, bool) or self.ttv_weight < 0:
            raise ValueError(f"transprune: ttv_weight must be a non-negative number, got {self.ttv_weight!r}")
        check_choice("transprune", "position", self.position, POSITION_POLICIES)
        check_choice("transprune", "budget_mode", self.budget_mode, BUDGET_MODES)

    def applicability(self, model: ModelFacts) -> str | None:
        if model.decoder_layers < 2:
            return "it prunes inside the LLM and needs a decoder of at least 2 layers"
        return None

    # --- schedule --------------------------------------------------------------------------------
    def schedule(self, context: SelectionContext) -> list[tuple[int, int]]:
        """[(layer k, tokens kept from layer k on)] on this decoder."""
        depth = context.require_model().decoder_layers
        folded: dict[int, float] = {}
        for layer, ratio in zip(self.prune_layers, self.ratios):
            folded[scaled_layer(layer, depth)] = ratio  # the later stage wins
        stages, alive = [], context.n_visual
        layers = sorted(folded)
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1
            if self.budget_mode == "fixed":
                count = int(context.n_visual * folded[layer])
            else:
                count = context.n_keep if last else max(int(context.n_visual * folded[layer]), context.n_keep)
            alive = min(count, alive)
            stages.append((layer, alive))
        return stages

    def accumulating(self, model: ModelFacts) -> tuple[int, ...]:
        """Decoder layers whose transitions count (the code's list holds ``layer + 1``)."""
        return tuple(sorted({scaled_layer(a, model.decoder_layers) - 1 for a in self.accumulate_layers}))

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        return tuple(count for _, count in self.schedule(context))

    # --- selection -------------------------------------------------------------------------------
    def select(self, context: SelectionContext) -> KeepPlan:
        self.check_applies(context.require_model())
        return self.plan(context, [])  # every stage is chosen on the live state (layer_callback)

    def layer_callback(self, context: SelectionContext):
        stages = dict(self.schedule(context))
        accumulating = set(self.accumulating(context.require_model()))
        n_visual, weight, position = context.n_visual, float(self.ttv_weight), self.position
        ttv: dict[int, float] = {}

        def rank(state, count: int) -> Stage:
            rows, ids = state.visual_rows, np.asarray(state.visual_indices, dtype=np.int64)
            if len(state.text_rows) == 0:
                raise ValueError("transprune: no instruction tokens after the image to guide the attention")
            probs = state.attention(state.text_rows)  # [H, T, S]
            iga = probs.mean(0)[:, rows.to(probs.device)].mean(0).double().cpu().numpy()
            iga = iga / (iga.sum() + EPS)
            variation = np.array([ttv.get(int(i), 0.0) for i in ids])
            variation = variation / (variation.sum() + EPS)
            score = weight * variation + iga
            scores = np.full(n_visual, np.nan)
            scores[ids] = score
            kept = ids[top_k(score, count)]
            # M-RoPE (3-axis) positions cannot be renumbered by the executor: keep them there.
            policy = position if state.position_ids.dim() == 2 else "original"
            return Stage(state.layer, tuple(sorted(int(i) for i in kept)), tuple(scores), (), policy)

        def watch(state, stage: Stage | None) -> None:
            """One-shot hooks that add this layer's transitions, on the sequence it will run on."""
            rows = np.asarray(state.visual_rows, dtype=np.int64)
            ids = np.asarray(state.visual_indices, dtype=np.int64)
            if stage is not None:
                survive = np.isin(ids, stage.kept)
                dropped = np.sort(rows[~survive])
                rows, ids = rows[survive] - np.searchsorted(dropped, rows[survive]), ids[survive]
            mlp = getattr(state.module, "mlp", None)
            if mlp is None:
                raise ValueError(f"transprune: decoder layer {state.layer} has no 'mlp' submodule to measure")
            handles = []

            def add(before, after):
                values = transition_weight(before[0], after[0])[torch.as_tensor(rows, device=before.device)]
                for i, v in zip(ids, values.double().cpu().numpy()):
                    ttv[int(i)] = ttv.get(int(i), 0.0) + float(v)

            def on_attention(module, args, kwargs, output):
                handles[0].remove()
                add(args[0] if args else kwargs["hidden_states"], _first(output))

            def on_mlp(module, args, output):
                handles[1].remove()
                add(args[0], _first(output))

            handles.append(state.attention_module.register_forward_hook(on_attention, with_kwargs=True))
            handles.append(mlp.register_forward_hook(on_mlp))

        def callback(layer, state):
            stage = rank(state, stages[layer]) if layer in stages else None
            if layer in accumulating:
                watch(state, stage)
            return stage

        return callback
