"""Every tower patch's feature through the projector: what a LLaVA-style code feeds the LLM before it packs.

The LLaVA codes run ``mm_projector`` on every patch of every view (the base image and each AnyRes crop,
the crops' padding patches included) before they stitch, unpad and add newlines, and some select on
those projected features (CDPruner's similarity kernel). The model's own LLM input holds them only for
the patches its packing keeps, so ``projected_patches`` ([P_v, D_llm] per tower view, the tower's
patch order, [CLS] left out) is not read from a layer: the recorder takes it from the sample's cached
tower pass (``ModelAdapter.tower_patches``, the same projected rows a plan's ``padded_patch`` enters
the LLM with) and stores it under the tower layer that feeds the projector (``ModelAdapter.projector_feed_tower_layer``).
"""

from __future__ import annotations

import torch

from probes.registry import Probe, SignalSpec, register_probe

PROJECTED_PATCHES = "projected_patches"


@torch.no_grad()
def projected_patches(adapter, prepared) -> list[torch.Tensor]:
    """Per tower view, its [P_v, D_llm] patch features at the feed layer through the projector, from the
    sample's own unpruned tower pass (computed once per prepared input); views of fewer patches than
    the widest are cut to their own count by the layout's tower map. No view for a model whose projector is
    not known to act patch by patch (the adapter names none): nothing is recorded there."""
    try:
        adapter.projector()
    except NotImplementedError:
        return []
    patches = adapter.tower_patches(prepared)
    sizes = [len(owner) for owner in prepared.layout.tower_owner] or [patches.shape[1]] * patches.shape[0]
    return [patches[view, :size] for view, size in enumerate(sizes)]


@register_probe("projected")
class ProjectedProbe(Probe):
    signals = (
        SignalSpec(PROJECTED_PATCHES, ("tower",), "feature", "llm_hidden", "none",
                   "each tower patch's feed-layer feature through the projector, padding patches included"),
    )
    needs = frozenset()  # it observes no layer: the recorder takes the signal from the cached tower pass
