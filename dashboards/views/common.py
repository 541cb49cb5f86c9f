"""Small helpers the pages share: drawing an overlay at display size and labelling answers."""

from __future__ import annotations

import numpy as np
import streamlit as st

from dashboards import overlay


def show_heatmap(subject, layout, values, caption: str, width: int = 384, cmap: str = "magma") -> None:
    scale = overlay.display_scale(subject.image.size, width)
    image = overlay.draw_panels(lambda groups: overlay.heatmap(subject.image, layout, values, scale, cmap=cmap,
                                                               groups=groups), layout)
    st.image(image, caption=caption)


def show_kept(subject, layout, kept, caption: str, merges=(), evidence=None, width: int = 384) -> None:
    scale = overlay.display_scale(subject.image.size, width)
    image = overlay.draw_panels(lambda groups: overlay.kept_overlay(subject.image, layout, kept, scale, merges,
                                                                    evidence, groups=groups), layout)
    st.image(image, caption=caption)


def verdict(answer: str, correct: bool | None) -> str:
    if correct is None:
        return f"**{answer or '(empty)'}**"
    return f"**{answer or '(empty)'}** {':green[correct]' if correct else ':red[wrong]'}"


def value_range(values) -> str:
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    if not finite.size:
        return "no values"
    return f"min {finite.min():.3g} · max {finite.max():.3g} (colour: dark = low, bright = high)"


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
            found.add(path.parent.relative_to(root).as_posix() or ".")
    return sorted(found)


def pick_results_table(key: str):
    """A sweep/report folder inside the results folder, picked or typed, and its table.
    Returns (folder, table) or None with the reason shown; paths leaving the folder are refused."""
    from dashboards import state

    root = state.results_root()
    found = sweep_folders(root)
    typed = st.text_input("sweep or report folder (relative to the results folder)",
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
