"""The recorded tower ``attention_logits`` equal ``q.k * scale`` of the eager model's own q/k projections
(caught by plain forward hooks), for every row kind, per head and head mean: on the shipped model and on
the tiny CLIP- and SigLIP-towered families (towers without a rotary embedding, where q_proj's output is
what the kernel multiplies)."""

from __future__ import annotations

import pytest
import torch

from probes.capture import ROW_KINDS, TokenRoles, row_positions
from tests.probes.conftest import eager_twin
from tests.tiny_models import QUESTION, TINY_SPECS, noise_image, tiny_adapter
from workbench.recorder import record
from workbench.recording import CaptureRequest, EntryKey

TOL = 1e-5
RTOL = 1e-6  # float32 matmuls of different batch shapes round logits of size ~30 apart by a few ulps
ROWS = ("cls", "visual", "mean")


@torch.no_grad()
def eager_logits(adapter, prepared) -> dict:
    """{(layer, view): [H, S, S]} of ``(q_proj(h) reshaped to heads) @ k^T * scale`` on the eager twin."""
    twin = eager_twin(adapter.model)
    tower = twin.vision_tower if hasattr(twin, "vision_tower") else twin.model.vision_tower
    paths = {id(m): name for name, m in adapter.model.named_modules()}
    modules = [twin.get_submodule(paths[id(adapter.vision_attention(i))]) for i in range(len(adapter.vision_layers()))]
    caught, handles = {}, []
    for i, module in enumerate(modules):
        for part in ("q_proj", "k_proj"):
            handles.append(getattr(module, part).register_forward_hook(
                lambda m, a, out, key=(i, part): caught.setdefault(key, out.detach().clone())))
    try:
        tower(prepared.inputs["pixel_values"].flatten(0, -4))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for i, module in enumerate(modules):
        q, k = caught[(i, "q_proj")], caught[(i, "k_proj")]
        heads = module.num_heads
        q = q.view(*q.shape[:2], heads, -1).transpose(1, 2)
        k = k.view(*k.shape[:2], heads, -1).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)).float() * module.scale
        for view in range(logits.shape[0]):
            out[(i, view)] = logits[view]
    return out


def check(adapter, prepared) -> int:
    per_head = record(adapter, prepared, CaptureRequest(signals=("attention_logits",), rows=ROWS, per_head=True,
                                                        stacks=("tower",)))
    head_mean = record(adapter, prepared, CaptureRequest(signals=("attention_logits",), rows=ROWS, stacks=("tower",)))
    checked = 0
    for (layer, view), logits in eager_logits(adapter, prepared).items():
        roles = TokenRoles.for_tower(logits.shape[-1], adapter.has_cls_token)
        for kind in ROWS:
            positions = row_positions(kind, roles, "tower")
            if positions is None or not len(positions):
                continue
            want = logits[:, positions][..., roles.visual]
            if ROW_KINDS[kind].aggregate:
                want = want.mean(1, keepdim=True)
            got = per_head.tensors[EntryKey("attention_logits", "tower", layer, kind, view)]
            torch.testing.assert_close(got, want, atol=TOL, rtol=RTOL)
            torch.testing.assert_close(head_mean.get("attention_logits", layer, kind, "tower", view=view),
                                       want.mean(0), atol=TOL, rtol=RTOL)
            checked += 1
    return checked


def test_shipped_model_logits_equal_eager_q_k_scale():
    from workbench.models.loading import load
    from workbench.samples import read_dataset

    adapter = load("shapes-vlm")
    sample = read_dataset("data/eval/samples.jsonl", limit=1)[0]
    prepared = adapter.prepare(sample.load_image(), sample.question)
    assert check(adapter, prepared) == len(adapter.vision_layers()) * 3


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_tiny_towers_logits_equal_eager_q_k_scale(family):
    adapter = tiny_adapter(family)
    prepared = adapter.prepare(noise_image(TINY_SPECS[family].image_size), QUESTION)
    views = prepared.inputs["pixel_values"].flatten(0, -4).shape[0]
    rows = 3 if adapter.has_cls_token else 2
    assert check(adapter, prepared) == len(adapter.vision_layers()) * views * rows


def test_logits_are_not_recorded_in_the_llm():
    adapter = tiny_adapter("llava")
    prepared = adapter.prepare(noise_image(TINY_SPECS["llava"].image_size), QUESTION)
    recording = record(adapter, prepared, CaptureRequest(signals=("attention_logits",), rows=("cls", "last")))
    assert {key.stack for key in recording.tensors} == {"tower"}
