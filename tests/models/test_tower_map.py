"""The tower -> layout map (``VisualLayout.tower_owner``) of every family, and folding with it.

Validity: every view's map covers exactly the patches the tower sends on (its recorded tower
entries have that many keys), indices are in range and every visual token owns at least one patch.
Causality: adding a vector to the projector's input at the patches the map gives one token (a
forward pre-hook on the LLaVA projector, Qwen's merger, Idefics3's connector: their input is in the
tower's recorded patch order) changes that token's LLM input embedding and no other (OneVision's
pooled tokens: that token and only grid neighbours that share its patches), and perturbing the
patches mapped to -1 changes nothing.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from tests.tiny_models import QUESTION, TINY_FAMILIES, TINY_SPECS, noise_image, tiny_adapter
from workbench.layout import TokenGroup, VisualLayout, grid_boxes, grid_cells
from workbench.recording import CaptureRequest, Recording
from workbench.tower_map import (identity_owner, tower_features, tower_features_to_layout, tower_scores,
                                 tower_to_layout)

SHIPPED = "shipped"
FAMILIES = TINY_FAMILIES + (SHIPPED,)
MERGE = {"qwen2_vl": 4, "qwen2_5_vl": 4, "idefics3": 4, "smolvlm": 4}  # patches per token where fixed


@functools.lru_cache(maxsize=None)
def sample(family: str):
    if family == SHIPPED:
        from workbench.models.loading import load
        from workbench.samples import read_dataset

        adapter = load()
        s = read_dataset("data/eval/samples.jsonl", limit=1)[0]
        return adapter, adapter.prepare(s.load_image(), s.question)
    adapter = tiny_adapter(family)
    return adapter, adapter.prepare(noise_image(TINY_SPECS[family].image_size), QUESTION)


def feed_module(adapter) -> torch.nn.Module:
    """The module whose input is the tower's patch features in the recorded order."""
    inner = adapter.model.model
    for name in ("multi_modal_projector", "connector"):
        if hasattr(inner, name):
            return getattr(inner, name)
    return adapter.vision_tower().merger


@torch.no_grad()
def embeddings_with(adapter, prepared, masks=None, seen=None) -> torch.Tensor:
    """LLM input embeddings [L, D], with a fixed random vector added to the projector's input where
    ``masks[v]`` (per view); not a constant, which a LayerNorm (Qwen's merger) would remove."""
    def hook(module, args):
        x = args[0].clone()
        views = x if x.dim() == 3 else x[None]  # Qwen's merger gets a flat [patches, D]
        if seen is not None:
            seen.append(tuple(views.shape[:2]))
        if masks is not None:
            push = 3.0 * torch.randn(views.shape[-1], generator=torch.Generator().manual_seed(0))
            for v, m in enumerate(masks):
                views[v, torch.as_tensor(m)] += push.to(views)
        return (x,) + tuple(args[1:])

    handle = feed_module(adapter).register_forward_pre_hook(hook)
    try:
        return adapter.llm_input_embeddings(prepared.inputs)[0].float()
    finally:
        handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_map_is_a_valid_assignment(family):
    adapter, prepared = sample(family)
    layout = prepared.layout
    owner = layout.tower_owner
    assert owner, "the adapter left the tower map empty"
    flat = np.concatenate(owner)
    assert flat.dtype == np.int64 and flat.min() >= -1 and flat.max() < layout.n_tokens
    counts = np.bincount(flat[flat >= 0], minlength=layout.n_tokens)
    assert (counts >= 1).all(), f"tokens owning no patch: {np.flatnonzero(counts == 0)}"
    if family in MERGE:
        assert (counts == MERGE[family]).all() and (flat >= 0).all()
    if family in ("llava", SHIPPED):  # one view, patch i is token i
        assert len(owner) == 1
        np.testing.assert_array_equal(owner[0], np.arange(layout.n_tokens))
    # The map covers what the projector reads: as many views, as many patches per view.
    seen = []
    embeddings_with(adapter, prepared, seen=seen)
    assert seen == [(len(owner), len(owner[0]))] and len({len(o) for o in owner}) == 1


@pytest.mark.parametrize("size", [(64, 64), (37, 91), (150, 40), (65, 64), (33, 100)])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_map_covers_every_token_at_other_sizes(family, size):
    adapter = tiny_adapter(family)
    prepared = adapter.prepare(noise_image(size), QUESTION)
    owner = prepared.layout.tower_owner
    flat = np.concatenate(owner)
    assert (np.bincount(flat[flat >= 0], minlength=prepared.layout.n_tokens) >= 1).all()
    seen = []
    embeddings_with(adapter, prepared, seen=seen)
    assert seen == [(len(owner), len(owner[0]))] and len({len(o) for o in owner}) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_tower_views_match_the_map(family):
    from workbench.recorder import record

    adapter, prepared = sample(family)
    owner = prepared.layout.tower_owner
    last = len(adapter.vision_layers()) - 1
    recording = record(adapter, prepared, CaptureRequest(signals=("attention",), tower_layers=(last,),
                                                         rows=("mean",), stacks=("tower",)))
    views = sorted({k.view for k in recording.keys("attention", "tower")})
    assert views == list(range(len(owner)))
    for v, o in enumerate(owner):
        assert tuple(recording.get("attention", last, "mean", "tower", view=v).shape) == (1, len(o))
    scores = tower_scores(recording, prepared.layout, "attention", last, "mean")
    assert scores.shape == (prepared.layout.n_tokens,) and np.isfinite(scores).all()


def _tokens_to_check(family: str, layout: VisualLayout) -> list[int]:
    if family == SHIPPED:
        return [0, 5, 13, 70, 143]
    return list(range(layout.n_tokens))


@pytest.mark.parametrize("family", FAMILIES)
def test_perturbing_a_tokens_patches_changes_exactly_that_token(family):
    adapter, prepared = sample(family)
    layout = prepared.layout
    owner = layout.tower_owner
    base = embeddings_with(adapter, prepared)
    others = np.setdiff1d(np.arange(base.shape[0]), layout.positions)
    pooled = family == "llava_onevision"
    for t in _tokens_to_check(family, layout):
        moved = embeddings_with(adapter, prepared, [o == t for o in owner])
        delta = (moved - base).abs().amax(-1)
        assert float(delta[others].max()) == 0.0, f"token {t}: a non-visual position changed"
        changed = set(np.flatnonzero(delta[torch.as_tensor(layout.positions)].numpy() > 1e-6).tolist())
        assert t in changed, f"{family}: perturbing token {t}'s patches left it unchanged"
        if pooled and layout.group[t] == 1:  # bilinear pooling: neighbours sharing its patches may move too
            near = (layout.group == 1) & (np.abs(layout.cell - layout.cell[t]).max(1) <= 1)
            assert changed <= set(np.flatnonzero(near).tolist()), (t, changed)
        else:
            assert changed == {t}, f"{family}: perturbing token {t}'s patches changed tokens {sorted(changed)}"
    unfed = [o == -1 for o in owner]
    if any(m.any() for m in unfed):
        moved = embeddings_with(adapter, prepared, unfed)
        assert float((moved - base).abs().max()) == 0.0, "patches mapped to -1 reached the LLM"


def test_qwen2_5_map_follows_the_window_order():
    # Its tower layers see merge blocks permuted by window: the map is not the plain p // 4.
    _, prepared = sample("qwen2_5_vl")
    owner = prepared.layout.tower_owner[0]
    assert not np.array_equal(owner, np.arange(len(owner)) // 4)
    np.testing.assert_array_equal(np.sort(owner), np.arange(len(owner)) // 4)


# --- folding ---------------------------------------------------------------------------------------

def _layout(owner) -> VisualLayout:
    return VisualLayout(positions=np.arange(2, 6), group=np.zeros(4, dtype=np.int64), cell=grid_cells(2, 2),
                        boxes=grid_boxes(2, 2, 0, 0, 20, 20), groups=(TokenGroup("image 0", 0, 2, 2),),
                        image_sizes=((20, 20),), sequence_length=8, tower_owner=owner)


def test_folding_reduces_each_tokens_patches():
    layout = _layout((np.array([0, 0, 1, -1]), np.array([2, 2, 2, 0])))
    values = [np.array([1.0, 3.0, 5.0, 100.0]), np.array([1.0, 2.0, 6.0, 7.0])]
    np.testing.assert_allclose(tower_to_layout(layout, values, "mean"), [11 / 3, 5, 3, np.nan])
    np.testing.assert_allclose(tower_to_layout(layout, values, "sum"), [11, 5, 9, np.nan])
    np.testing.assert_allclose(tower_to_layout(layout, values, "max"), [7, 5, 6, np.nan])
    features = [np.stack([v, -v], 1) for v in values]
    np.testing.assert_allclose(tower_features_to_layout(layout, features)[:3], [[11 / 3, -11 / 3], [5, -5], [3, -3]])
    assert np.isnan(tower_features_to_layout(layout, features)[3]).all()
    with pytest.raises(ValueError, match="do not match the layout's tower map"):
        tower_to_layout(layout, [np.zeros(4)])
    with pytest.raises(ValueError, match="reduce must be one of"):
        tower_to_layout(layout, values, "median")
    with pytest.raises(ValueError, match="token indices in -1..3"):
        _layout((np.array([0, 4]),))


def test_a_layout_without_a_map_is_the_identity_for_one_view_of_n_patches_only():
    layout = _layout(())
    np.testing.assert_array_equal(tower_to_layout(layout, [np.arange(4.0)]), np.arange(4.0))
    with pytest.raises(ValueError, match="no map from tower patches to layout tokens"):
        tower_to_layout(layout, [np.arange(16.0)])
    assert len(identity_owner(4)) == 1


# --- recordings ------------------------------------------------------------------------------------

def test_recording_round_trip_keeps_the_map(tmp_path):
    from workbench.recorder import record

    adapter, prepared = sample("llava_next")
    request = CaptureRequest(signals=("attention", "visual_keys"), tower_layers=(1,), rows=("cls",), stacks=("tower",))
    recording = record(adapter, prepared, request)
    loaded = Recording.load(recording.save(tmp_path / "rec"))
    assert len(loaded.layout.tower_owner) == len(prepared.layout.tower_owner) == 5
    for a, b in zip(loaded.layout.tower_owner, prepared.layout.tower_owner):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.int64
    np.testing.assert_allclose(tower_scores(loaded, loaded.layout, "attention", 1, "cls"),
                               tower_scores(recording, prepared.layout, "attention", 1, "cls"))
    assert tower_features(loaded, loaded.layout, "visual_keys", 1).shape[0] == prepared.layout.n_tokens

    # A recording written before the field (no "tower_views" in its manifest) loads with no map.
    manifest_path = tmp_path / "rec" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["layout"]["tower_views"]
    manifest_path.write_text(json.dumps(manifest))
    old = Recording.load(tmp_path / "rec")
    assert old.layout.tower_owner == ()
    with pytest.raises(ValueError, match="no map from tower patches to layout tokens"):
        tower_scores(old, old.layout, "attention", 1, "cls")
