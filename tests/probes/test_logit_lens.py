"""The logit lens: each decoder layer's last-position state read through the final norm and LM head."""

import numpy as np
import pytest
import torch

from probes.logit_lens import logit_lens
from tests.tiny_models import QUESTION, TINY_SPECS, noise_image, tiny_adapter


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_the_last_layer_is_the_models_own_prediction(family):
    adapter = tiny_adapter(family)
    prepared = adapter.prepare(noise_image(TINY_SPECS[family].image_size), QUESTION)
    with torch.no_grad():
        logits = adapter.model(**prepared.inputs).logits[0, -1].float()
    top = int(logits.argmax())
    lens = logit_lens(adapter, prepared, top)
    assert lens.layers == tuple(range(len(adapter.decoder_layers())))
    assert lens.rank[-1] == 0 and lens.top_token[-1] == top
    assert np.isclose(lens.probability[-1], torch.softmax(logits, -1)[top].item(), atol=1e-5)
    # another token: its rank at the last layer is how many tokens the model scores above it
    other = int(logits.argsort()[len(logits) // 2])
    assert logit_lens(adapter, prepared, other).rank[-1] == int((logits > logits[other]).sum())
    assert np.all((lens.probability >= 0) & (lens.probability <= 1))
