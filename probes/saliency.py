"""How much the answer depends on each visual token: gradients and occlusion.

These need passes beyond the one traced forward, so they work on a *replay* of the decoder: the
inputs the model itself hands its language model (embeddings with the visual features merged in,
the attention mask, and position ids such as Qwen2-VL's M-RoPE ones) for the prompt followed by
the answer, captured once and then run again as often as needed. The answer's score is the sum of
its tokens' log-probabilities given everything before them.

* ``grad_x_input``: ``sum_d g_pd x_pd`` on the visual embeddings at the decoder's input (exact
  autograd). In a pre-norm decoder the first layer sees each token only through a scale-invariant
  norm, so this measures only what later layers do with the token's scale; read it with that in
  mind.
* ``attention_x_gradient``: per layer, ``sum_i A_hij dL/dA_hij`` over every query row i, per key j,
  with ``dL/dA_hij = g_hi . v_hj`` (g: gradient of the score w.r.t. head h's attention output at
  row i). Exact, from q/k/v captured at the attention call and autograd; no [S, S] graph is kept.
  Summed over heads unless per-head values are asked for (the parts add up).
* ``occlusion``: what a visual token (or a k x k group of the grid) adds to the answer's score:
  score with it minus score without it. Removal is done by masking it from every attention call,
  which equals deleting it from the sequence with every other token keeping its position id
  (nothing else reads a token's hidden state). Batched. Positive means the token supported the
  answer, the same sign convention as the gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from probes.capture import DEFAULT_CHUNK_BYTES, CallCollector
from probes.interception import listening
from probes.registry import Probe, SignalSpec, register_probe


class _Stop(Exception):
    pass


@dataclass(frozen=True)
class ScoringInputs:
    """Decoder inputs for prompt + answer, as the model built them, and where the answer sits."""

    embeds: torch.Tensor  # [1, S, D]
    attention_mask: torch.Tensor  # [1, S]
    position_ids: torch.Tensor | None  # as the model passed them (None: the decoder's default)
    answer_ids: torch.Tensor  # [T]
    visual: torch.Tensor  # [N] positions of the visual tokens

    @property
    def length(self) -> int:
        return self.embeds.shape[1]

    @property
    def predicting(self) -> torch.Tensor:
        """Positions whose next-token prediction is an answer token."""
        return torch.arange(self.length - len(self.answer_ids) - 1, self.length - 1)


def with_answer(inputs: Mapping[str, torch.Tensor], answer_ids: torch.Tensor) -> dict:
    """The model inputs with the answer tokens appended: ``input_ids`` gets the ids,
    ``attention_mask`` ones, and any other per-token [1, S] tensor (token types) zeros."""
    ids = inputs["input_ids"]
    out = dict(inputs)
    answer = answer_ids.to(ids.device, ids.dtype)[None]
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == ids.shape:
            extra = answer if name == "input_ids" else (torch.ones_like(answer) if name == "attention_mask"
                                                        else torch.zeros_like(answer))
            out[name] = torch.cat([value, extra.to(value.dtype)], dim=1)
    return out


@torch.no_grad()
def decoder_call(model: torch.nn.Module, language_model: torch.nn.Module, inputs: Mapping) -> dict:
    """The keyword arguments the model passes its language model, captured and the forward stopped."""
    captured: dict = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)
        raise _Stop

    handle = language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if captured.get("inputs_embeds") is None:
        raise RuntimeError("the language model was not called with inputs_embeds")
    return captured


def scoring_inputs(model, language_model, inputs: Mapping, answer_ids: torch.Tensor,
                   visual_positions) -> ScoringInputs:
    call = decoder_call(model, language_model, with_answer(inputs, answer_ids))
    embeds = call["inputs_embeds"]
    mask = call.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return ScoringInputs(embeds.detach(), mask, call.get("position_ids"), answer_ids.cpu(),
                         torch.as_tensor(visual_positions, dtype=torch.long))


def _batched_positions(position_ids: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    if position_ids is None:
        return None
    # [1, S] -> [B, S]; M-RoPE's [k, 1, S] -> [k, B, S]
    return position_ids.expand(batch, -1) if position_ids.dim() == 2 else position_ids.expand(-1, batch, -1)


def answer_logprob(language_model, head, scoring: ScoringInputs, embeds: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Score [B] of the answer given the prompt, for a batch of (embeds, mask) variants."""
    embeds = scoring.embeds if embeds is None else embeds
    mask = scoring.attention_mask.expand(embeds.shape[0], -1) if attention_mask is None else attention_mask
    out = language_model(inputs_embeds=embeds, attention_mask=mask,
                         position_ids=_batched_positions(scoring.position_ids, embeds.shape[0]), use_cache=False)
    hidden = out.last_hidden_state[:, scoring.predicting.to(embeds.device)]
    logprobs = torch.log_softmax(head(hidden).float(), dim=-1)
    targets = scoring.answer_ids.to(embeds.device)[None, :, None].expand(embeds.shape[0], -1, -1)
    return logprobs.gather(-1, targets)[..., 0].sum(-1)


def gradient_x_input(language_model, head, scoring: ScoringInputs) -> torch.Tensor:
    """Gradient x input [N] of the answer score on the visual embeddings."""
    embeds = scoring.embeds.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        score = answer_logprob(language_model, head, scoring, embeds)
        (grad,) = torch.autograd.grad(score.sum(), embeds)
    visual = scoring.visual.to(embeds.device)
    return (grad[0, visual] * embeds.detach()[0, visual]).float().sum(-1)


def attention_x_gradient(language_model, head, scoring: ScoringInputs, modules: Sequence[torch.nn.Module],
                         chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[torch.Tensor]:
    """Per attention module of ``language_model`` (layer, in order): ``sum_i A_hij dL/dA_hij`` on
    the visual keys, [H, N]. The calls and their outputs come from the workbench's attention
    listener; the gradient is taken with respect to those outputs."""
    collector = CallCollector(modules, outputs=True)
    embeds = scoring.embeds.detach()
    with torch.enable_grad(), listening(collector):
        hidden = language_model(inputs_embeds=embeds, attention_mask=scoring.attention_mask,
                                position_ids=scoring.position_ids, use_cache=False).last_hidden_state
        readings = [collector.take(module) for module in modules]
        calls = [reading.call() for reading in readings]
        outputs = [reading.outputs[0][0] for reading in readings]
        logits = head(hidden[:, scoring.predicting.to(hidden.device)]).float()
        targets = scoring.answer_ids.to(hidden.device)[None, :, None]
        score = torch.log_softmax(logits, -1).gather(-1, targets).sum()
        grads = torch.autograd.grad(score, outputs)
    visual = scoring.visual
    results = []
    for call, grad in zip(calls, grads):
        g = grad[0].transpose(0, 1).float()  # [S, H, dv] -> [H, S, dv]
        total = torch.zeros(call.heads, call.n_keys, device=g.device)
        for part, probs in call.row_blocks(chunk_bytes):
            seen = probs.shape[-1]
            total[:, :seen] += (probs * (g[:, part] @ call.value[:, :seen].float().transpose(-1, -2))).sum(1)
        results.append(total[:, visual.to(total.device)])
    return results


def grid_groups(cells: np.ndarray, groups: np.ndarray, k: int) -> list[np.ndarray]:
    """Visual-token indices of each k x k block of each grid (k = 1: one token each)."""
    keys = np.stack([groups, cells[:, 0] // k, cells[:, 1] // k], axis=1)
    _, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = sorted(range(inverse.max() + 1), key=lambda g: int(np.flatnonzero(inverse == g)[0]))
    return [np.flatnonzero(inverse == g) for g in order]


@torch.no_grad()
def occlusion(language_model, head, scoring: ScoringInputs, groups: Sequence[np.ndarray],
              batch_size: int = 16) -> torch.Tensor:
    """Score with minus score without [G], for each group of visual tokens masked out."""
    full = answer_logprob(language_model, head, scoring)[0]
    deltas = []
    for start in range(0, len(groups), batch_size):
        batch = groups[start:start + batch_size]
        mask = scoring.attention_mask.expand(len(batch), -1).clone()
        for row, members in enumerate(batch):
            mask[row, scoring.visual[torch.as_tensor(members, dtype=torch.long)].to(mask.device)] = 0
        embeds = scoring.embeds.expand(len(batch), -1, -1)
        deltas.append(full - answer_logprob(language_model, head, scoring, embeds, mask))
    return torch.cat(deltas).float()


@register_probe("saliency")
class SaliencyProbe(Probe):
    """Declares the saliency signals; the recorder runs the functions above in their own passes."""

    signals = (
        SignalSpec("grad_x_input", ("llm",), "answer", "visual", "none",
                   "gradient x input of the answer score on the visual embeddings", extra_pass=True),
        SignalSpec("attention_x_gradient", ("llm",), "answer", "visual", "sum",
                   "sum over query rows of attention x its gradient, per visual key", extra_pass=True),
        SignalSpec("occlusion", ("llm",), "answer", "visual", "none",
                   "answer score with minus without the token's k x k group (masked out)", extra_pass=True),
    )
