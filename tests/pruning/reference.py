"""An independent, cache-free reference for the executor: the decoder layers called by hand on a
sequence whose rows were physically removed, with explicit positions and a plain causal mask."""

from __future__ import annotations

import numpy as np
import torch

from workbench.pruning.plan import KeepPlan


def _cut(states, positions, kinds, stage):
    """Merge, then drop the stage's rows (non-visual rows, kind < 0, always stay), then insert each
    appended token after its row (the last visual row with ``after=None``), with that row's position."""
    before = states
    states = states.clone()
    row = {int(k): i for i, k in enumerate(kinds) if k >= 0}
    for merge in stage.merges:
        parts = [states[:, row[merge.target]]] + [states[:, row[s]] for s in merge.sources]
        states[:, row[merge.target]] = sum(w * p for w, p in zip(merge.weights, parts))
    moved = [a.token for a in stage.appends]
    keep = [i for i, k in enumerate(kinds) if k < 0 or (k in stage.kept and k not in moved)]
    pieces = [(i, states[:, i], positions[..., i], int(kinds[i])) for i in keep]
    for order, append in enumerate(stage.appends):
        after = int(np.flatnonzero(kinds >= 0)[-1]) if append.after is None else row[append.after]
        made = sum(w * before[:, row[t]] for w, t in zip(append.weights, append.members))
        pieces.append((after + 0.5 + order / (2 * len(stage.appends) + 1), made, positions[..., after], append.token))
    pieces.sort(key=lambda piece: piece[0])
    states = torch.stack([p[1] for p in pieces], 1)
    kinds = np.array([p[3] for p in pieces])
    if stage.position == "reindex":
        positions = torch.arange(len(pieces)).unsqueeze(0)
    else:
        positions = torch.stack([p[2] for p in pieces], -1)
    return states, positions, kinds


@torch.no_grad()
def reference_logits(adapter, prepared, plan: KeepPlan, appended: list[int] = ()) -> torch.Tensor:
    """Logits [len(appended) + 1, V]: at the prompt's last token and at each appended token, for
    the prompt followed by ``appended`` token ids, pruned as ``plan`` says, without any cache.
    Appended tokens continue the positions after the prompt's last one."""
    inputs = adapter.llm_inputs(prepared.inputs)
    layout = prepared.layout
    embeds, positions = inputs.inputs_embeds, inputs.position_ids
    kinds = np.full(embeds.shape[1], -1)
    kinds[layout.positions] = np.arange(layout.n_tokens)
    if appended:
        extra = adapter.token_embeddings()(torch.tensor([list(appended)]))
        embeds = torch.cat([embeds, extra], 1)
        positions = torch.cat([positions, positions[..., -1:] + 1 + torch.arange(len(appended))], -1)
        kinds = np.concatenate([kinds, np.full(len(appended), -1)])
    stages = {s.where: s for s in plan.stages}
    if "pre_llm" in stages:
        embeds, positions, kinds = _cut(embeds, positions, kinds, stages["pre_llm"])
    rotary, states = adapter.decoder_rotary(), embeds
    for index, layer in enumerate(adapter.decoder_layers()):
        if index in stages:
            states, positions, kinds = _cut(states, positions, kinds, stages[index])
        states = layer(states, attention_mask=None, position_embeddings=rotary(states, positions),
                       position_ids=positions if positions.dim() == 2 else None)
    states = adapter.language_model().norm(states)
    return adapter.output_head()(states)[0, -(len(appended) + 1):]


class HeadCalls:
    """Records every logits tensor the LM head produces (prefill first, then each decode step)."""

    def __init__(self, adapter):
        self.outputs = []
        self.handle = adapter.output_head().register_forward_hook(lambda m, a, out: self.outputs.append(out[0, -1]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class LayerIO:
    """The first (prefill) input and output of every decoder layer, as the layer itself saw them
    (after the executor's pre-hooks)."""

    def __init__(self, adapter):
        self.inputs, self.outputs, self.handles = {}, {}, []
        for i, layer in enumerate(adapter.decoder_layers()):
            self.handles.append(layer.register_forward_hook(self._grab(i), with_kwargs=True))

    def _grab(self, index):
        def hook(module, args, kwargs, output):
            if index not in self.inputs:
                self.inputs[index] = (args[0] if args else kwargs["hidden_states"]).clone()
                self.outputs[index] = (output[0] if isinstance(output, tuple) else output).clone()
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
