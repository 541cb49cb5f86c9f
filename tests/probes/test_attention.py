"""Recomputed attention equals eager attention probabilities, for every row kind, per head and
head mean, in the LLM and the vision tower: on the shipped architecture (reference: eager with
``output_attentions=True``) and on a tiny model of every family."""

from __future__ import annotations

import pytest
import torch

from probes.capture import ROW_KINDS, CallCollector, TokenRoles, row_positions
from probes.interception import install, listening
from tests.probes.conftest import eager_twin, eval_sample
from tests.tiny_models import QUESTION, TINY_FAMILIES, TINY_SPECS, noise_image, tiny_adapter
from workbench.recorder import record
from workbench.recording import CaptureRequest, EntryKey

ALL_ROWS = tuple(ROW_KINDS)
TOL = 1e-5


def expected(probs: torch.Tensor, roles: TokenRoles, stack: str, kind: str) -> torch.Tensor:
    """Eager probabilities [H, S, S] -> what the recording should hold for ``kind``: [H, R, N]."""
    visual = roles.visual
    if ROW_KINDS[kind].aggregate:
        return probs[:, roles.valid].mean(1, keepdim=True)[..., visual]
    return probs[:, row_positions(kind, roles, stack)][..., visual]


def check(recording, references: dict, roles_of, stack: str, head_mean_recording=None) -> int:
    """Compare every recorded row kind of ``stack`` with the eager references {(layer, view): [H, S, S]}."""
    checked = 0
    for (layer, view), probs in references.items():
        roles = roles_of(probs.shape[-1])
        for kind in ALL_ROWS:
            positions = row_positions(kind, roles, stack)
            if positions is None or not len(positions):
                continue
            want = expected(probs.float(), roles, stack, kind)
            got = recording.tensors[EntryKey("attention", stack, layer, kind, view)]
            torch.testing.assert_close(got, want, atol=TOL, rtol=0)
            torch.testing.assert_close(recording.get("attention", layer, kind, stack, view=view), want.mean(0),
                                       atol=TOL, rtol=0)
            if head_mean_recording is not None:
                torch.testing.assert_close(head_mean_recording.get("attention", layer, kind, stack, view=view),
                                           want.mean(0), atol=TOL, rtol=0)
            checked += 1
    return checked


@pytest.fixture(params=["untrained", "trained"])
def shipped_model(request, shipped):
    """The shipped architecture untrained, and the trained shipped model (it is in the repository,
    so a missing one fails here rather than skipping)."""
    if request.param == "untrained":
        return shipped
    from workbench.models.loading import load

    adapter = load("shapes-vlm")
    sample = eval_sample()
    return adapter, adapter.prepare(sample.load_image(), sample.question)


def test_shipped_architecture_matches_eager_output_attentions(shipped_model):
    adapter, prepared = shipped_model
    request = CaptureRequest(signals=("attention",), rows=ALL_ROWS, per_head=True)
    per_head = record(adapter, prepared, request)
    head_mean = record(adapter, prepared, CaptureRequest(signals=("attention",), rows=ALL_ROWS))
    eager = eager_twin(adapter.model)
    with torch.no_grad():
        llm = eager(**prepared.inputs, output_attentions=True).attentions
        tower = eager.model.vision_tower(prepared.inputs["pixel_values"], output_attentions=True).attentions
    length = prepared.inputs["input_ids"].shape[1]
    llm_roles = lambda n: TokenRoles.for_llm(prepared.layout.positions, length)  # noqa: E731
    tower_roles = lambda n: TokenRoles.for_tower(n, True)  # noqa: E731
    # every layer, for each row kind the stack has (the tower has no text rows)
    assert len(llm) == len(adapter.decoder_layers()) and len(tower) == len(adapter.vision_layers())
    assert check(per_head, {(i, 0): a[0] for i, a in enumerate(llm)}, llm_roles, "llm", head_mean) == len(llm) * 4
    assert check(per_head, {(i, 0): a[0] for i, a in enumerate(tower)}, tower_roles, "tower", head_mean) == len(tower) * 3


def eager_tower_attention(adapter, prepared) -> dict:
    """{(layer, view): [H, S, S]} as the eager attention function returned them in the tower
    (blocks of a block-wise tower joined block-diagonally)."""
    eager = eager_twin(adapter.model)
    install(eager)  # the eager kernel behind the workbench's listener, which hands over its weights
    paths = {id(m): name for name, m in adapter.model.named_modules()}
    twins = [eager.get_submodule(paths[id(adapter.vision_attention(i))]) for i in range(len(adapter.vision_layers()))]
    collector = CallCollector(twins, outputs=True)
    with torch.no_grad(), listening(collector):
        eager(**prepared.inputs)
    weights = {i: [weights for _, weights in collector.take(twin).outputs] for i, twin in enumerate(twins)}
    out = {}
    for i, blocks in weights.items():
        for view in range(blocks[0].shape[0]):
            size = sum(b.shape[-1] for b in blocks)
            full = torch.zeros(blocks[0].shape[1], size, size)
            start = 0
            for b in blocks:
                n = b.shape[-1]
                full[:, start:start + n, start:start + n] = b[view]
                start += n
            out[(i, view)] = full
    return out


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_matches_eager(family):
    adapter = tiny_adapter(family)
    prepared = adapter.prepare(noise_image(TINY_SPECS[family].image_size), QUESTION)
    recording = record(adapter, prepared, CaptureRequest(signals=("attention",), rows=ALL_ROWS, per_head=True))
    with torch.no_grad():
        llm = eager_twin(adapter.model)(**prepared.inputs, output_attentions=True).attentions
    length = prepared.inputs["input_ids"].shape[1]
    mask = prepared.inputs["attention_mask"][0]
    llm_roles = lambda n: TokenRoles.for_llm(prepared.layout.positions, length, mask)  # noqa: E731
    tower_roles = lambda n: TokenRoles.for_tower(n, adapter.has_cls_token)  # noqa: E731
    assert check(recording, {(i, 0): a[0] for i, a in enumerate(llm)}, llm_roles, "llm") == len(llm) * 4
    assert check(recording, eager_tower_attention(adapter, prepared), tower_roles, "tower") > 0
