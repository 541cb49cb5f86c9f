"""Small helpers the pages share: drawing an overlay at display size and labelling answers."""

from __future__ import annotations

import numpy as np
import streamlit as st

from workbench import overlay


def heatmap_image(subject, layout, values, width: int = 384, signed: bool = False,
                  colour_scale: overlay.Scale | None = None, evidence=None):
    """A signal drawn over the image (greyscale under it, so its colours are the map's alone) with
    its colour bar, evidence tokens outlined; a map with every value equal is drawn as "no signal"
    instead of a uniform wash. Returns (image, whether it showed a signal)."""
    scale = overlay.display_scale(subject.image.size, width)
    values = np.asarray(values, dtype=float)
    if overlay.is_no_signal(values):
        finite = values[np.isfinite(values)]
        text = (f"no signal: every value is {finite[0]:.3g}" if finite.size else "no signal: no value recorded")
        return overlay.draw_panels(lambda groups: overlay.no_signal(subject.image, scale, text), layout), False
    colour_scale = colour_scale or overlay.value_scale(values, signed=signed)

    def one(groups):
        drawn = overlay.heatmap(subject.image, layout, values, scale, alpha=0.75, groups=groups,
                                colour_scale=colour_scale, grey=True)
        return drawn if evidence is None else overlay.outline(drawn, layout, evidence, scale, groups=groups)

    image = overlay.draw_panels(one, layout)
    note = "0 = white" if colour_scale.signed else ""
    return overlay.stacked([image, overlay.colour_bar(colour_scale, image.width, note=note)]), True


def show_heatmap(subject, layout, values, caption: str, width: int = 384, signed: bool = False,
                 colour_scale: overlay.Scale | None = None, evidence=None) -> bool:
    image, signal = heatmap_image(subject, layout, values, width, signed, colour_scale, evidence)
    st.image(image, caption=caption if signal else f"{caption} — no signal")
    return signal


def kept_image(subject, layout, kept, merges=(), evidence=None, width: int = 384, key: bool = True):
    scale = overlay.display_scale(subject.image.size, width)
    image = overlay.draw_panels(lambda groups: overlay.kept_overlay(subject.image, layout, kept, scale, merges,
                                                                    evidence, groups=groups), layout)
    if not key:
        return image
    entries = ["kept", "dropped"] + (["merged"] if merges else []) + (
        ["evidence", "lost"] if evidence is not None and np.asarray(evidence).any() else [])
    return overlay.stacked([image, overlay.kept_key(image.width, entries)])


def show_kept(subject, layout, kept, caption: str, merges=(), evidence=None, width: int = 384) -> None:
    st.image(kept_image(subject, layout, kept, merges, evidence, width), caption=caption)


def show_original(subject, width: int = 384, caption: str = "original image") -> None:
    scale = overlay.display_scale(subject.image.size, width)
    st.image(subject.image.resize((max(1, round(subject.image.width * scale)),
                                   max(1, round(subject.image.height * scale)))), caption=caption)


def verdict(answer: str, correct: bool | None) -> str:
    if correct is None:
        return f"**{answer or '(empty)'}**"
    return f"**{answer or '(empty)'}** {':green[correct]' if correct else ':red[wrong]'}"


def value_range(values) -> str:
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    if not finite.size:
        return "no values"
    return f"min {finite.min():.3g} · max {finite.max():.3g}"


def sweep_folders(root) -> list[str]:
    """Sweep (``sweep.json``) and report (``results.parquet``) folders under the results folder,
    relative to it ("." for the folder itself), at most three levels down."""
    from pathlib import Path

    root = Path(root)
    if not root.is_dir():
        return []
    found = set()
    for pattern in ("sweep.json", "*/sweep.json", "*/*/sweep.json", "*/*/*/sweep.json",
                    "results.parquet", "*/results.parquet", "*/*/results.parquet", "*/*/*/results.parquet"):
        for path in root.glob(pattern):
            folder = path.parent
            if folder.name == "sweep" and folder.parent != root.parent and (folder.parent / "index.html").exists():
                folder = folder.parent  # a report's own sweep: offer the report folder
            found.add(folder.relative_to(root).as_posix() or ".")
    return sorted(found)


def pick_results_table(key: str):
    """A sweep/report folder inside the results folder, picked or typed, and its table.
    Returns (folder, table) or None with the reason shown; paths leaving the folder are refused."""
    from dashboards import state

    root = state.results_root()
    found = sweep_folders(root)
    typed = st.text_input("sweep or report folder (relative to the results folder; a report folder's sweep/ is read)",
                          found[0] if found else "", key=f"{key}_folder",
                          help=f"results folder: {root}" + (f"; found: {', '.join(found)}" if found else ""))
    if not typed.strip():
        st.info(f"no sweep folder found in the results folder {root}; run `workbench sweep --out {root}/NAME` "
                "or start the dashboard with --results FOLDER")
        return None
    try:
        folder = state.inside_results(typed, root)
    except ValueError as e:
        st.error(f"refused: {e}")
        return None
    try:
        table = state.results_table(str(folder))
    except Exception as e:
        st.error(f"cannot read {typed!r}: {e}")
        return None
    if table.height == 0:
        st.warning(f"{typed!r} holds no rows yet")
        return None
    return folder, table
