"""The token features that similarity- and diversity-based methods read: hidden states and keys.

DivPrune, DART, ToDRE, MMTok and VisionZip's contextual merging compare visual tokens with one
another (or with the text) in some feature space; SparseVLM rates text tokens against visual ones.
These signals record those spaces as they are, one row per token and one column per dimension:

``visual_states`` / ``visual_states_out``: the residual stream of each visual token entering /
leaving the layer ([N, D]; on the LLM's layer 0, ``visual_states`` are the projected visual
embeddings); ``text_states``: the same entering the layer for the text after the image ([T, D]);
``visual_states_normed`` / ``text_states_normed``: those states after the decoder's final norm, as
the LM head would read them (DART's code compares tokens there);
``visual_keys`` / ``text_keys``: the layer's attention keys of each visual / text token ([N, H*d],
heads side by side, RoPE applied as the model applies it, GQA heads repeated).
"""

from __future__ import annotations

from probes.capture import LayerCapture
from probes.registry import Observation, Probe, SignalSpec, register_probe

FEATURE_ROWS = "tokens"  # the row label every feature signal is stored under


@register_probe("states")
class StatesProbe(Probe):
    signals = (
        SignalSpec("visual_states", ("tower", "llm"), "feature", "hidden", "none",
                   "residual stream of each visual token entering the layer"),
        SignalSpec("visual_states_out", ("tower", "llm"), "feature", "hidden", "none",
                   "residual stream of each visual token leaving the layer"),
        SignalSpec("text_states", ("llm",), "text_feature", "hidden", "none",
                   "residual stream of each text token after the image, entering the layer"),
        SignalSpec("visual_states_normed", ("llm",), "feature", "hidden", "none",
                   "residual stream of each visual token entering the layer, after the decoder's final norm"),
        SignalSpec("text_states_normed", ("llm",), "text_feature", "hidden", "none",
                   "residual stream of each text token after the image entering the layer, after the final norm"),
    )
    needs = frozenset({"hidden_in", "hidden_out"})

    def captures(self) -> frozenset[str]:
        normed = {"visual_states_normed", "text_states_normed"} & self.wanted
        return self.needs | ({"final_norm"} if normed else set())

    def observe(self, state: LayerCapture):
        if not state.recorded or state.hidden_in is None:
            return
        visual = state.roles.visual.to(state.hidden_in.device)
        if "visual_states" in self.wanted:
            yield Observation("visual_states", FEATURE_ROWS, state.hidden_in[visual])
        if "visual_states_out" in self.wanted and state.hidden_out is not None:
            yield Observation("visual_states_out", FEATURE_ROWS, state.hidden_out[visual])
        text = state.roles.text.to(visual.device)
        if "text_states" in self.wanted and len(text):
            yield Observation("text_states", FEATURE_ROWS, state.hidden_in[text])
        if state.final_norm is not None:
            if "visual_states_normed" in self.wanted:
                yield Observation("visual_states_normed", FEATURE_ROWS, state.final_norm(state.hidden_in[visual]))
            if "text_states_normed" in self.wanted and len(text):
                yield Observation("text_states_normed", FEATURE_ROWS, state.final_norm(state.hidden_in[text]))


@register_probe("keys")
class KeysProbe(Probe):
    signals = (
        SignalSpec("visual_keys", ("tower", "llm"), "feature", "keys", "none",
                   "attention keys of each visual token, heads side by side"),
        SignalSpec("text_keys", ("llm",), "text_feature", "keys", "none",
                   "attention keys of each text token after the image, heads side by side"),
    )
    needs = frozenset({"call"})

    def observe(self, state: LayerCapture):
        if not state.recorded or state.call is None:
            return
        for name, rows in (("visual_keys", state.roles.visual), ("text_keys", state.roles.text)):
            if name in self.wanted and len(rows):
                key = state.call.key[:, rows.to(state.call.key.device)]  # [H, R, d]
                yield Observation(name, FEATURE_ROWS, key.permute(1, 0, 2).flatten(1))
