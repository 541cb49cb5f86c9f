"""Explore: the model's answer, one recorded signal at one layer drawn over the image beside the
original, the chosen signal per layer, a patch's attention to and from the text per layer (click a
patch), every layer x head for one query row, and the logit lens of the answer token."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from dashboards import state
from workbench import overlay
from dashboards.views.common import heatmap_image, show_original, value_range, verdict


@dataclass(frozen=True)
class View:
    signal: str
    stack: str
    rows: str  # a row kind, "tokens" or "answer"
    per_head: bool = False  # a head axis can be recorded
    fixed_layer: int | None = None  # saliency: the stack's input (-1)
    signed: bool = False  # values of both signs: drawn on a diverging map with 0 at white


VIEWS = {
    "attention from the last token": View("attention", "llm", "last", per_head=True),
    "attention from the text tokens": View("attention", "llm", "text", per_head=True),
    "attention from the last token without RoPE, per head over the image (FEATHER's score)":
        View("attention_norope_visual", "llm", "last", per_head=True),
    "attention from [CLS] (vision tower)": View("attention", "tower", "cls", per_head=True),
    "information flow (contribution to the last token)": View("contribution", "llm", "last", per_head=True),
    "sink tokens (VAR sink score)": View("visual_sink_score", "llm", "tokens"),
    "saliency (gradient x input of the answer)": View("grad_x_input", "llm", "answer", fixed_layer=-1, signed=True),
    "token transitions (1 - cosine across the layer)": View("transition_direction", "llm", "tokens"),
    "token transitions (change of norm)": View("transition_magnitude", "llm", "tokens", signed=True),
}
MAIN_SIGNALS = ("attention", "attention_mass", "attention_norope_visual", "contribution", "sink_share",
                "visual_sink_score", "transition_direction", "transition_magnitude")
MAIN_ROWS = ("cls", "last", "text")
PATCH_SIGNALS = ("attention", "attention_mass")
PATCH_ROWS = ("text", "visual")  # text -> patch (per text token) and patch -> every key category


def main_recording(model: str, subject):
    return state.recording(model, subject.key, MAIN_SIGNALS, MAIN_ROWS, False, None, subject)


def token_values(rec, view: View, layer: int, head: int | None = None, row: int | None = None) -> np.ndarray | None:
    """[N] values of ``view`` at ``layer``: the mean over its query rows, or query row ``row``.
    Tower signals are recorded per tower view (crop, tile, frame) over its patches and folded onto
    the layout's tokens by the layout's tower map (the mean of the patches each token owns); None
    when the map cannot place them."""
    from workbench.tower_map import tower_to_layout

    def rows_of(v: int) -> np.ndarray:
        value = rec.get(view.signal, layer, view.rows, view.stack, head=head, view=v).double().numpy()
        value = value.reshape(-1, value.shape[-1])
        return value.mean(0) if row is None else value[min(row, len(value) - 1)]

    if view.stack != "tower":
        return rows_of(0)
    try:
        values = tower_to_layout(rec.layout, [rows_of(v) for v in range(max(len(rec.layout.tower_owner), 1))])
    except (KeyError, ValueError):
        return None
    return None if np.isnan(values).all() else values


def is_signed(view: View, values) -> bool:
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    return view.signed or bool(finite.size and finite.min() < 0 < finite.max())


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


def signal_by_layer(rec, view: View, layers, patch: int | None, evidence) -> dict[str, list[float]]:
    """The chosen signal per layer: its maximum and mean over the visual tokens, its mean over the
    evidence tokens (when the sample has them) and its value at the chosen patch."""
    out: dict[str, list[float]] = {"max over tokens": [], "mean over tokens": []}
    if evidence is not None and np.asarray(evidence).any():
        out["mean over the evidence"] = []
    if patch is not None:
        out[f"patch {patch}"] = []
    for layer in layers:
        values = token_values(rec, view, layer)
        values = np.full(rec.layout.n_tokens, np.nan) if values is None else values
        out["max over tokens"].append(float(np.nanmax(values)) if np.isfinite(values).any() else None)
        out["mean over tokens"].append(float(np.nanmean(values)) if np.isfinite(values).any() else None)
        if "mean over the evidence" in out:
            out["mean over the evidence"].append(float(np.nanmean(values[np.asarray(evidence, dtype=bool)])))
        if patch is not None:
            out[f"patch {patch}"].append(float(values[patch]))
    return out


def line_figure(series: dict[str, list], layers, title: str, current: int | None = None, height: int = 300,
                yaxis: str = "") -> go.Figure:
    figure = go.Figure()
    for name, ys in series.items():
        figure.add_trace(go.Scatter(x=list(layers), y=ys, mode="lines+markers", name=name))
    if current is not None:
        figure.add_vline(x=current, line_dash="dot", line_color="grey")
    figure.update_layout(height=height, margin=dict(l=10, r=10, t=40, b=10), title=title, yaxis_title=yaxis,
                         xaxis=dict(title="layer", tickmode="linear", dtick=1),  # layers are whole numbers
                         legend=dict(font=dict(size=10), orientation="h", y=-0.25))
    return figure


# --- a patch's attention to and from the text ---------------------------------------------------------

def text_tokens(model: str, subject, n_rows: int) -> list[str]:
    """The text tokens after the image (the "text" query rows), as strings; indices if they do not match."""
    prepared = state.prepared(model, subject)
    ids = prepared.inputs["input_ids"][0].tolist()
    after = ids[int(prepared.layout.positions.max()) + 1:]
    tokenizer = state.load_model(model).adapter.tokenizer
    words = [tokenizer.decode([t]).strip() or "·" for t in after]
    if len(words) != n_rows:
        return [f"text {i}" for i in range(n_rows)]
    return [f"{i}:{w}" for i, w in enumerate(words)]


def patch_attention(rec, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per decoder layer: [L, T] attention from each text token to ``patch``, and [L, 4] the
    patch's own attention mass on the visual, text, system and sink keys."""
    layers = rec.layers("attention", "llm")
    to_patch = np.stack([rec.get("attention", k, "text").double().numpy()[:, patch] for k in layers])
    from_patch = np.stack([rec.get("attention_mass", k, "visual").double().numpy()[patch] for k in layers])
    return to_patch, from_patch


def picked_patch(layout, values) -> int:
    """The chosen patch: the one clicked on the map (the chart's selection, synced into the patch
    number box), else the one typed, else the map's maximum."""
    if "explore_patch" not in st.session_state:
        finite = values is not None and np.isfinite(values).any()
        st.session_state["explore_patch"] = int(np.nanargmax(values)) if finite else 0
    event = st.session_state.get("explore_map")
    points = (event or {}).get("selection", {}).get("points", []) if isinstance(event, dict) else \
        getattr(getattr(event, "selection", None), "points", []) or []
    for point in points:
        index = point.get("customdata")
        index = index[0] if isinstance(index, (list, tuple)) else index
        if index is not None and st.session_state.get("explore_clicked") != index:
            st.session_state["explore_clicked"] = index
            st.session_state["explore_patch"] = int(index)
    st.session_state["explore_patch"] = min(int(st.session_state["explore_patch"]), layout.n_tokens - 1)
    return st.session_state["explore_patch"]


def clickable_map(image, layout, scale: float, patch: int | None) -> go.Figure:
    """The drawn map as a plotly image with one invisible marker per token: a click selects it."""
    boxes = np.asarray(layout.boxes, dtype=float) * scale
    x, y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    figure = go.Figure(go.Image(z=np.asarray(image), hoverinfo="skip"))
    figure.add_trace(go.Scatter(x=x, y=y, mode="markers", customdata=np.arange(layout.n_tokens),
                                marker=dict(size=max(6, float(np.median(boxes[:, 2] - boxes[:, 0]))), opacity=0.01,
                                            symbol="square"),
                                hovertemplate="patch %{customdata}<extra></extra>", showlegend=False))
    if patch is not None:
        x0, y0, x1, y1 = boxes[patch]
        figure.add_shape(type="rect", x0=x0, y0=y0, x1=x1, y1=y1, line=dict(color="#00e5ff", width=3))
    figure.update_layout(height=image.height + 20, width=image.width + 20, margin=dict(l=0, r=0, t=0, b=0),
                         xaxis=dict(visible=False), yaxis=dict(visible=False), clickmode="event+select",
                         hovermode="closest")
    return figure


def render_patch(model: str, subject, layout, values, view: View, evidence) -> None:
    st.subheader("a patch's attention to and from the text, per layer")
    st.caption("click a patch on the map (or type its number) to see how the text tokens attend to it and how "
               "much it attends to the text, in every decoder layer")
    left, right = st.columns([2, 3])
    with left:
        patch = int(st.number_input("patch (visual token number)", 0, layout.n_tokens - 1, key="explore_patch"))
        scale = overlay.display_scale(subject.image.size, 320)
        drawn = (overlay.heatmap(subject.image, layout, values, scale, alpha=0.75, grey=True,
                                 colour_scale=overlay.value_scale(values, signed=is_signed(view, values)))
                 if values is not None and not overlay.is_no_signal(values)
                 else overlay.scaled(subject.image, scale))
        drawn = overlay.outline(drawn, layout, evidence, scale) if evidence is not None else drawn
        st.plotly_chart(clickable_map(drawn, layout, scale, patch), key="explore_map", on_select="rerun",
                        selection_mode="points", width="content", config={"displayModeBar": False})
    rec = state.recording(model, subject.key, PATCH_SIGNALS, PATCH_ROWS, False, None, subject)
    to_patch, from_patch = patch_attention(rec, patch)
    layers = rec.layers("attention", "llm")
    words = text_tokens(model, subject, to_patch.shape[1])
    from probes.capture import KEY_CATEGORIES

    with right:
        heat = go.Figure(go.Heatmap(z=to_patch.tolist(), x=words, y=[f"L{k}" for k in layers], colorscale="Magma",
                                    colorbar=dict(title="attention"), zmin=0,
                                    hovertemplate="%{x} -> patch, %{y}: %{z:.4f}<extra></extra>"))
        heat.update_layout(title=f"text token -> patch {patch} (each text row's attention on it)", height=260,
                           margin=dict(l=10, r=10, t=40, b=10), xaxis=dict(tickangle=-40, type="category"),
                           yaxis=dict(type="category", autorange="reversed"))
        st.plotly_chart(heat, key="explore_to_patch")
        bars = go.Figure([go.Bar(x=[f"L{k}" for k in layers], y=from_patch[:, c].tolist(), name=name)
                          for c, name in enumerate(KEY_CATEGORIES)])
        bars.update_layout(barmode="group", title=f"patch {patch} -> keys: its attention mass per layer", height=260,
                           margin=dict(l=10, r=10, t=40, b=10), yaxis_title="attention mass",
                           legend=dict(orientation="h", y=-0.2))
        st.plotly_chart(bars, key="explore_from_patch")
        if np.allclose(from_patch[:, 1], 0):
            st.caption("its attention on the text is 0 in every layer: in a causal decoder a patch sees only the "
                       "tokens before it (the system prompt and earlier patches), and the question comes after the image")


# --- every layer x head for one query row ------------------------------------------------------------

def head_grid(subject, rec, view: View, layers, heads: int, row: int | None, shared: bool, evidence):
    """One image: a row per layer, a column per head, each map at its own or one shared scale."""
    maps = {(k, h): token_values(rec, view, k, head=h, row=row) for k in layers for h in range(heads)}
    finite = [v for v in maps.values() if v is not None]
    common = overlay.value_scale(None, signed=any(is_signed(view, v) for v in finite), over=finite) if shared else None
    tiles, width = [], 118
    for k in layers:
        row_tiles = []
        for h in range(heads):
            values = maps[(k, h)]
            if values is None:
                continue
            image, _ = heatmap_image(subject, rec.layout, values, width, is_signed(view, values), common, evidence)
            labelled = overlay.captioned(image, f"layer {k} · head {h}")
            row_tiles.append(labelled)
        if row_tiles:
            tiles.append(overlay.side_by_side(row_tiles, gap=4))
    return overlay.stacked(tiles, gap=6) if tiles else None


def render_heads(model: str, subject, view: View, evidence) -> None:
    st.subheader("every layer x head for one query row")
    facts = state.model_facts(model)
    count = facts.vision_layers if view.stack == "tower" else facts.decoder_layers
    options = ["mean of the rows"]
    rows = None
    if view.rows == "text":
        rec_rows = main_recording(model, subject)
        n_rows = rec_rows.get(view.signal, 0, "text").shape[0]
        options += text_tokens(model, subject, n_rows)
    choice = st.selectbox("query row", options, key="explore_head_row") if len(options) > 1 else options[0]
    if choice != options[0]:
        rows = options.index(choice) - 1
    shared = st.checkbox("one colour scale for every layer and head", value=True, key="explore_heads_shared")
    with st.spinner("recording every layer per head ..."):
        rec = state.recording(model, subject.key, (view.signal,), (view.rows,), True, None, subject)
    heads = rec.tensors[next(k for k in rec.keys(view.signal, view.stack) if k.rows == view.rows)].shape[0]
    grid = head_grid(subject, rec, view, list(range(count)), heads, rows, shared, evidence)
    if grid is not None:
        st.image(grid, caption=f"{view.signal} ({view.stack}), query row: {choice}; "
                               + ("one scale for all maps" if shared else "each map at its own scale"))


# --- the logit lens -------------------------------------------------------------------------------

def render_logit_lens(model: str, subject) -> None:
    st.subheader("the answer token through the logit lens")
    answer = state.answer_ids(model, subject.key, subject)
    if not answer:
        st.info("the model's answer is empty: there is no answer token to follow")
        return
    tokenizer = state.load_model(model).adapter.tokenizer
    lens = state.logit_lens(model, subject.key, answer[0], subject)
    word = tokenizer.decode([answer[0]]).strip()
    st.caption(f"after each decoder layer, the last position's state put through the final norm and the LM head: "
               f"the rank (0 = top) and probability of the answer's first token **{word}**; the last layer is the "
               "model's own prediction")
    left, right = st.columns(2)
    left.plotly_chart(line_figure({"rank": lens.rank.tolist()}, lens.layers, f"rank of '{word}' per layer",
                                  yaxis="rank (0 = top)", height=260), key="explore_lens_rank")
    right.plotly_chart(line_figure({"probability": lens.probability.tolist()}, lens.layers,
                                   f"probability of '{word}' per layer", yaxis="probability", height=260),
                       key="explore_lens_prob")
    st.dataframe({"layer": list(lens.layers), "rank": lens.rank.tolist(),
                  "probability": [round(float(p), 4) for p in lens.probability],
                  "top token": [tokenizer.decode([t]).strip() for t in lens.top_token]}, hide_index=True)


# --- the page -------------------------------------------------------------------------------------

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
    evidence = state.evidence_tokens(rec.layout, subject)
    outline = evidence is not None and st.checkbox("outline the evidence tokens", value=True, key="explore_evidence")
    values = token_values(rec, view, layer)
    original, drawn, plot = st.columns([2, 2, 3])
    with original:
        show_original(subject, 300, "original image" + ("; evidence outlined on the map" if outline else ""))
    with drawn:
        if values is None:
            st.info("this model's layout has no map from the tower's patches to its visual tokens, so this "
                    "tower signal cannot be drawn on the image")
        else:
            where = "input" if layer < 0 else f"layer {layer}"
            signed = is_signed(view, values)
            image, signal = heatmap_image(subject, rec.layout, values, 300, signed, None,
                                          evidence if outline else None)
            st.image(image, caption=f"{choice}, {where} — {value_range(values)}"
                     + (" (signed: blue < 0 < red)" if signal and signed else "")
                     + ("" if signal else " — no signal"))
    patch = picked_patch(rec.layout, values)
    with plot:
        if view.fixed_layer is None:
            layers = rec.layers(view.signal, view.stack)
            series = signal_by_layer(rec, view, layers, patch, evidence)
            st.plotly_chart(line_figure(series, layers, f"{view.signal} per {view.stack} layer", current=layer),
                            key="explore_by_layer")
        else:
            st.caption(f"{rec.layout.n_tokens} visual tokens; saliency has one value per token (no layers)")
        with st.expander("where the last token's attention goes, per decoder layer"):
            summaries = layer_summaries(main_recording(model, subject))
            layers = summaries.pop("layer")
            st.plotly_chart(line_figure(summaries, layers, "per decoder layer"), key="explore_summaries")
    render_patch(model, subject, rec.layout, values, view, evidence if outline else None)
    if view.per_head and values is not None and st.checkbox("every layer x head", key="explore_heads"):
        render_heads(model, subject, view, evidence if outline else None)
    if st.checkbox("logit lens of the answer token", value=True, key="explore_lens"):
        render_logit_lens(model, subject)
