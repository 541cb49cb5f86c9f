"""Layer hyper-parameters given for the reference model, placed on a decoder of another depth.

The published in-LLM methods fix their layers for LLaVA-1.5-7B's 32-layer decoder (FastV's K=2,
PyramidDrop's 8/16/24, SparseVLM's 2/6/15, FEATHER's 8/16). On another decoder a layer keeps its
relative depth: k -> round(k * depth / 32), at least 1 (the decoder's first layer always sees
every token, as in the references) and at most depth - 1.
"""

from __future__ import annotations

REFERENCE_DEPTH = 32  # LLaVA-1.5-7B (Vicuna-7B)


def scaled_layer(layer: int, depth: int, reference_depth: int = REFERENCE_DEPTH) -> int:
    if depth < 2:
        raise ValueError(f"in-LLM pruning needs a decoder of at least 2 layers, this one has {depth}")
    if depth == reference_depth:
        return min(max(int(layer), 1), depth - 1)
    return min(max(int(round(layer * depth / reference_depth)), 1), depth - 1)


def scaled_layers(layers, depth: int, reference_depth: int = REFERENCE_DEPTH) -> tuple[int, ...]:
    """Each layer scaled, duplicates folded (a shallow decoder can merge two reference stages)."""
    return tuple(sorted({scaled_layer(k, depth, reference_depth) for k in layers}))


def check_reference_layers(method: str, name: str, layers) -> None:
    """Refuse layer hyper-parameters past the reference decoder: ``scaled_layer`` would silently
    clamp them to the last layer, so fastv:layer=99 would run as some other experiment."""
    layers = (layers,) if isinstance(layers, int) else tuple(layers)
    beyond = [k for k in layers if k >= REFERENCE_DEPTH]
    if beyond:
        raise ValueError(f"{method}: {name} must be below {REFERENCE_DEPTH} (layers of the {REFERENCE_DEPTH}-layer "
                         f"reference decoder, placed on this one by relative depth), got {beyond[0]}")
