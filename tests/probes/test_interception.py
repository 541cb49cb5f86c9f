"""The one way into a model: the registered attention function sees every attention call of every
family and changes nothing it computes."""

import copy

import pytest
import torch

from probes.interception import PREFIX, install, listening
from tests.tiny_models import QUESTION, TINY_FAMILIES, TINY_SPECS, noise_image, tiny_adapter


class Listener:
    def __init__(self):
        self.calls, self.outputs = [], []

    def called(self, module, query, key, value, attention_mask, kwargs):
        self.calls.append(module)

    def returned(self, module, output, weights):
        self.outputs.append(module)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_attention_module_is_seen_and_nothing_changes(family):
    adapter = tiny_adapter(family)
    prepared = adapter.prepare(noise_image(TINY_SPECS[family].image_size), QUESTION)
    assert adapter.model.config._attn_implementation == PREFIX + "sdpa"
    plain = copy.deepcopy(adapter.model)
    plain.set_attn_implementation("sdpa")  # the model's own kernel with nothing in between
    listener = Listener()
    with torch.no_grad():
        reference = plain(**prepared.inputs).logits
        with listening(listener):
            listened = adapter.model(**prepared.inputs).logits
        unlistened = adapter.model(**prepared.inputs).logits
    assert torch.equal(listened, reference) and torch.equal(unlistened, reference)
    modules = [adapter.decoder_attention(i) for i in range(len(adapter.decoder_layers()))]
    modules += [adapter.vision_attention(i) for i in range(len(adapter.vision_layers()))]
    seen = {id(m) for m in listener.calls}
    assert all(id(m) in seen for m in modules)
    assert [id(m) for m in listener.calls] == [id(m) for m in listener.outputs]


def test_install_is_idempotent_and_keeps_the_base_kernel():
    adapter = tiny_adapter("llava")
    model = copy.deepcopy(adapter.model)
    model.set_attn_implementation("eager")
    install(model)
    install(model)
    assert model.config._attn_implementation == PREFIX + "eager"
    assert model.config.text_config._attn_implementation == PREFIX + "eager"
