"""How methods are told apart in every figure: grouped by what scores their tokens, one colour and
one marker each.

Each group (``workbench.pruning.method.SCORE_SOURCES``) owns a band of hues, so a reader sees the
family before the name: the LLM's attention from text rows in reds and oranges, attention among
visual tokens or from [CLS] in blues and violets, feature similarity in greens, the layout alone
(baselines) in browns; the unpruned model is black. Inside a band the members are spread evenly
and alternate dark and light, and markers cycle beside the colours, so 20+ methods stay
distinct. A method's variant ("fastv(layer=3)") takes its method's group. The dashboard and the
report both draw from here.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Iterable

UNPRUNED = "unpruned"
GROUP_LABELS = {
    "text_attention": "LLM attention from text",
    "visual_attention": "visual / [CLS] attention",
    "similarity": "feature similarity",
    "layout": "layout only (baselines)",
    "other": "other",
}
# (first hue, last hue) in degrees, per group
HUE_BANDS = {"text_attention": (350, 50), "visual_attention": (185, 290), "similarity": (85, 160),
             "layout": (25, 65), "other": (300, 330)}
MARKERS = ("circle", "square", "diamond", "triangle-up", "triangle-down", "cross", "x", "star")
MATPLOTLIB_MARKERS = {"circle": "o", "square": "s", "diamond": "D", "triangle-up": "^", "triangle-down": "v",
                      "cross": "P", "x": "X", "star": "*"}


@dataclass(frozen=True)
class MethodStyle:
    method: str
    group: str  # a SCORE_SOURCES key, "other", or "unpruned"
    colour: str  # "#rrggbb"
    marker: str  # a plotly marker symbol (``MATPLOTLIB_MARKERS`` translates it)

    @property
    def group_label(self) -> str:
        return GROUP_LABELS.get(self.group, self.group)

    @property
    def mpl_marker(self) -> str:
        return MATPLOTLIB_MARKERS[self.marker]


def scored_by(label: str) -> str:
    """The group of a table label (a variant included): its method's ``scored_by``, "unpruned",
    or "other" for controls and methods this version lacks."""
    from workbench.errors import UserError
    from workbench.pruning.registry import method_class
    from workbench.sweep import MethodSpec

    if label == UNPRUNED:
        return UNPRUNED
    try:
        return method_class(MethodSpec.parse(label).name).scored_by or "other"
    except (UserError, ValueError, KeyError):
        return "other"


def _hex(rgb) -> str:
    return "#" + "".join(f"{round(max(0.0, min(1.0, c)) * 255):02x}" for c in rgb)


def styles(labels: Iterable[str]) -> dict[str, MethodStyle]:
    """A style for each label; the same label set always gets the same styles."""
    labels = sorted(set(labels))
    by_group: dict[str, list[str]] = {}
    for label in labels:
        by_group.setdefault(scored_by(label), []).append(label)
    out = {}
    for group, members in by_group.items():
        if group == UNPRUNED:
            out[UNPRUNED] = MethodStyle(UNPRUNED, UNPRUNED, "#000000", "circle")
            continue
        first, last = HUE_BANDS.get(group, HUE_BANDS["other"])
        span = (last - first) % 360
        for i, label in enumerate(members):
            hue = (first + span * (i / max(len(members) - 1, 1))) % 360
            light = 0.38 if i % 2 == 0 else 0.58
            saturation = 0.35 if group == "layout" else 0.8
            out[label] = MethodStyle(label, group, _hex(colorsys.hls_to_rgb(hue / 360, light, saturation)),
                                     MARKERS[i % len(MARKERS)])
    return out


def ordered(labels: Iterable[str]) -> list[str]:
    """Labels grouped by what scores their tokens (unpruned first, baselines last), then by name."""
    order = {g: i for i, g in enumerate((UNPRUNED, "text_attention", "visual_attention", "similarity", "layout"))}
    return sorted(set(labels), key=lambda m: (order.get(scored_by(m), len(order)), m))
