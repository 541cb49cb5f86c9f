"""Methods are grouped and coloured by what scores their tokens, distinct for every registered method."""

import colorsys
import itertools

from analyses.method_style import HUE_BANDS, ordered, scored_by, styles
from workbench.pruning.registry import available_methods, method_class


def rgb(colour: str):
    return tuple(int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))


def test_every_method_gets_its_own_colour_and_marker_pair_even_past_twenty():
    labels = available_methods() + ["unpruned", "random(seed=1)", "fastv(layer=3)"]
    assert len(labels) > 20
    style = styles(labels)
    pairs = {(s.colour, s.marker) for s in style.values()}
    assert len(pairs) == len(labels)
    # no two colours closer than a visible step (L1 over RGB in 0..255)
    closest = min(sum(abs(a - b) for a, b in zip(rgb(style[x].colour), rgb(style[y].colour))) * 255
                  for x, y in itertools.combinations(labels, 2))
    assert closest >= 20


def test_colours_follow_the_group_hue_band():
    style = styles(available_methods())
    for method in available_methods():
        group = method_class(method).scored_by
        hue = colorsys.rgb_to_hls(*rgb(style[method].colour))[0] * 360
        first, last = HUE_BANDS[group]
        assert (hue - first + 1) % 360 <= (last - first) % 360 + 2, (method, group, hue)  # 1 degree of rounding
    assert styles(["unpruned"])["unpruned"].colour == "#000000"


def test_variants_join_their_method_and_order_is_by_group():
    assert scored_by("fastv(layer=3)") == scored_by("fastv") == "text_attention"
    assert scored_by("control:blank_image") == "other" and scored_by("unpruned") == "unpruned"
    order = ordered(["uniform_grid", "divprune", "fastervlm", "fastv", "unpruned"])
    assert order == ["unpruned", "fastv", "fastervlm", "divprune", "uniform_grid"]
