"""Explore: the model's answer, one recorded signal at one layer drawn over the image, a per-head
grid on demand, and per-layer line plots of scalar summaries."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from dashboards import state
from dashboards.views.common import show_heatmap, value_range, verdict


@dataclass(frozen=True)
class View:
    signal: str
    stack: str
    rows: str  # a row kind, "tokens" or "answer"
    per_head: bool = False  # a head axis can be recorded
    fixed_layer: int | None = None  # saliency: the stack's input (-1)


VIEWS = {
    "attention from the last token": View("attention", "llm", "last", per_head=True),
    "attention from the text tokens": View("attention", "llm", "text", per_head=True),
    "attention from the last token without RoPE, per head over the image (FEATHER's score)":
        View("attention_norope_visual", "llm", "last", per_head=True),
    "attention from [CLS] (vision tower)": View("attention", "tower", "cls", per_head=True),
    "information flow (contribution to the last token)": View("contribution", "llm", "last", per_head=True),
    "sink tokens (VAR sink score)": View("visual_sink_score", "llm", "tokens"),
    "saliency (gradient x input of the answer)": View("grad_x_input", "llm", "answer", fixed_layer=-1),
    "token transitions (1 - cosine across the layer)": View("transition_direction", "llm", "tokens"),
    "token transitions (change of norm)": View("transition_magnitude", "llm", "tokens"),
}
MAIN_SIGNALS = ("attention", "attention_mass", "attention_norope_visual", "contribution", "sink_share",
                "visual_sink_score", "transition_direction", "transition_magnitude")
MAIN_ROWS = ("cls", "last", "text")


def main_recording(model: str, subject):
    return state.recording(model, subject.key, MAIN_SIGNALS, MAIN_ROWS, False, None, subject)


def token_values(rec, view: View, layer: int, head: int | None = None) -> np.ndarray | None:
    """[N] values of ``view`` at ``layer`` (mean over its query rows). Tower signals are recorded
    per tower view (crop, tile, frame) over its patches and folded onto the layout's tokens by the
    layout's tower map (the mean of the patches each token owns); None when the map cannot place
    them."""
    from workbench.tower_map import tower_to_layout

    def rows_mean(v: int) -> np.ndarray:
        value = rec.get(view.signal, layer, view.rows, view.stack, head=head, view=v).double().numpy()
        return value.reshape(-1, value.shape[-1]).mean(0)

    if view.stack != "tower":
        return rows_mean(0)
    try:
        values = tower_to_layout(rec.layout, [rows_mean(v) for v in range(max(len(rec.layout.tower_owner), 1))])
    except (KeyError, ValueError):
        return None
    return None if np.isnan(values).all() else values


def layer_summaries(rec) -> dict[str, list[float]]:
    """Per-LLM-layer scalars read from the recording: where the last token's attention goes, the
    sink share and the mean transition of the visual tokens."""
    layers = rec.layers("attention_mass", "llm")
    out: dict[str, list[float]] = {"layer": layers}
    from probes.capture import KEY_CATEGORIES

    for c, category in enumerate(KEY_CATEGORIES):
        out[f"last token -> {category}"] = [float(rec.get("attention_mass", k, "last")[0, c]) for k in layers]
    out["sink share (mean over queries)"] = [float(rec.get("sink_share", k, "tokens").mean()) for k in layers]
    out["visual transition (mean 1 - cos)"] = [float(rec.get("transition_direction", k, "tokens").mean())
                                              for k in layers]
    return out


def render(model: str, subject) -> None:
    st.header("Explore")
    with st.spinner("answering ..."):
        answer = state.answer(model, subject.key, subject)
    st.markdown(f"**Question:** {subject.question}  \n**Answer:** {verdict(answer, subject.is_correct(answer))}"
                + (f"  \n**Gold:** {subject.gold}" if subject.gold is not None else ""))
    facts = state.model_facts(model)
    names = [n for n in VIEWS if facts.has_cls_token or VIEWS[n].rows != "cls"]
    choice = st.selectbox("signal", names, key="explore_signal")
    view = VIEWS[choice]
    with st.spinner("recording ..."):
        if view.fixed_layer is None:
            rec = main_recording(model, subject)
        else:
            rec = state.recording(model, subject.key, (view.signal,), ("last",), False, None, subject)
    if view.fixed_layer is None:
        count = facts.vision_layers if view.stack == "tower" else facts.decoder_layers
        layer = st.slider(f"{'vision-tower' if view.stack == 'tower' else 'decoder'} layer", 0, count - 1,
                          min(1, count - 1), key=f"explore_layer_{view.stack}") if count > 1 else 0
    else:
        layer = view.fixed_layer
        st.caption("saliency is taken at the decoder's input embeddings (one backward pass of the answer score)")
    values = token_values(rec, view, layer)
    left, right = st.columns([3, 2])
    with left:
        if values is None:
            st.info("this model's layout has no map from the tower's patches to its visual tokens, so this "
                    "tower signal cannot be drawn on the image")
        else:
            where = "input" if layer < 0 else f"layer {layer}"
            show_heatmap(subject, rec.layout, values, f"{choice}, {where} — {value_range(values)}")
    with right:
        st.caption(f"{rec.layout.n_tokens} visual tokens in {len(rec.layout.groups)} group(s): "
                   + ", ".join(f"{g.name} ({g.rows}x{g.cols})" for g in rec.layout.groups))
        summaries = layer_summaries(main_recording(model, subject))
        figure = go.Figure()
        for name, ys in summaries.items():
            if name != "layer":
                figure.add_trace(go.Scatter(x=summaries["layer"], y=ys, mode="lines+markers", name=name))
        figure.update_layout(height=320, margin=dict(l=10, r=10, t=30, b=10), title="per decoder layer",
                             xaxis_title="layer", legend=dict(font=dict(size=9)))
        st.plotly_chart(figure, width="stretch")
    if view.per_head and values is not None and st.checkbox("per-head grid", key="explore_heads"):
        with st.spinner("recording per head ..."):
            rec_heads = state.recording(model, subject.key, (view.signal,), (view.rows,), True, (layer,), subject)
        heads = rec_heads.tensors[next(k for k in rec_heads.keys(view.signal, view.stack) if k.layer == layer
                                       and k.rows == view.rows)].shape[0]
        columns = st.columns(min(heads, 4))
        for h in range(heads):
            with columns[h % len(columns)]:
                show_heatmap(subject, rec_heads.layout, token_values(rec_heads, view, layer, head=h), f"head {h}",
                             width=160)
