"""CDPruner with a CLIP checkpoint (``cdpruner:clip=PATH``): the official code's instruction relevance.

Official code: Theia-4869/CDPruner (HEAD)
- llava/model/multimodal_encoder/clip_encoder.py lines 39-48 (``load_text_tower``): the tokenizer, the
  ``CLIPTextModelWithProjection`` and the ``visual_projection`` of the CLIP checkpoint the tower came from;
- lines 80-89: the question tokenised whole, zero-padded (ids and mask) to a multiple of
  ``max_position_embeddings`` and cut into segments of that length, each segment's ``text_embeds``;
- lines 94-95: ``visual_projection(post_layernorm(hidden_states[-2] patches).float())``, the tower's own
  ``post_layernorm``;
- llava/eval/model_vqa_loader.py line 110: the question with "\\nAnswer the question using a single word
  or phrase." removed;
- llava/model/llava_arch.py lines 156-160: relevance from those two, then the kernel and greedy MAP as in
  test_cdpruner_anyres.py (whose ``official_index_masks`` takes the embeddings).
A tiny random CLIP checkpoint whose vision side is the tiny model's own tower (as LLaVA's tower is its
CLIP checkpoint's) and whose text segments are 16 tokens long (so the question spans two) is saved to a
temporary folder with a byte-level tokenizer; the reference loads it with the classes the code uses.
"""

from __future__ import annotations

import pytest
import torch

from tests.pruning.parity.anyres import SIZES, llava_next_case
from tests.pruning.parity.common import eager_model, jaccard, n_keep, workbench_plan
from tests.pruning.parity.test_cdpruner_anyres import feed_patches, official_index_masks, official_llm_sequence
from tests.pruning.parity.test_vispruner_anyres import per_view_count, workbench_names
from tests.tiny_models import QUESTION, TINY_SPECS, noise_image, tiny_adapter
from workbench.pruning.methods.cdpruner import CDPruner
from workbench.pruning.registry import InvalidMethodParameters, create_method

ANSWER_SENTENCE = "\nAnswer the question using a single word or phrase."
ASKED = QUESTION + ANSWER_SENTENCE
BUDGETS = (0.125, 0.25, 0.5)


def tower(adapter):
    """The eager copy's CLIP vision transformer (embeddings, encoder, ``post_layernorm``)."""
    model = eager_model(adapter)
    tower = model.vision_tower if hasattr(model, "vision_tower") else model.model.vision_tower
    return getattr(tower, "vision_model", tower)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny CLIP checkpoint (model + tokenizer) whose vision model is the tiny LLaVA towers' (the same
    seeded weights in both tiny families)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer

    vision = tower(tiny_adapter("llava")).config
    text = CLIPTextConfig(vocab_size=520, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=16, eos_token_id=1, bos_token_id=0,
                          pad_token_id=1)
    torch.manual_seed(1)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict() | {"projection_dim": 12},
                                 vision_config=vision.to_dict() | {"projection_dim": 12}, projection_dim=12))
    model.vision_model.load_state_dict(tower(tiny_adapter("llava")).state_dict())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    return str(folder)


@torch.no_grad()
def official_text_embeds(folder: str, question: str) -> torch.Tensor:
    """[segments, C]: clip_encoder.py lines 80-89 on the question of model_vqa_loader.py line 110."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizerFast

    tokenizer = CLIPTokenizerFast.from_pretrained(folder)
    text_tower = CLIPTextModelWithProjection.from_pretrained(folder)
    width = text_tower.config.max_position_embeddings
    text_inputs = tokenizer(text=question.replace(ANSWER_SENTENCE, ""), return_tensors="pt")
    length = text_inputs["input_ids"].shape[1]
    assert length > width  # the question spans two segments
    text_segment = (length - 1) // width + 1
    text_padding = width * text_segment - length
    text_inputs = {k: torch.cat([v, v.new_zeros((v.shape[0], text_padding))], dim=1).reshape(-1, width)
                   for k, v in text_inputs.items()}
    return text_tower(**text_inputs).text_embeds.double()


@torch.no_grad()
def official_image_embeds(folder: str, adapter, prepared) -> torch.Tensor:
    """[B, N, C]: lines 94-95, the model tower's own ``post_layernorm``, the checkpoint's ``visual_projection``."""
    from transformers import CLIPVisionModelWithProjection

    projection = CLIPVisionModelWithProjection.from_pretrained(folder).visual_projection
    embeds = tower(adapter).post_layernorm(feed_patches(adapter, prepared))
    return projection(embeds.float()).double()


def official_masks(folder, adapter, prepared, count, gains=None):
    return official_index_masks(adapter, prepared, count, official_image_embeds(folder, adapter, prepared),
                                official_text_embeds(folder, prepared.question), gains)


def test_single_view_equals_the_official_rule_with_clip(clip_folder):
    adapter = tiny_adapter("llava")
    prepared = adapter.prepare(noise_image(TINY_SPECS["llava"].image_size), ASKED)
    for budget in BUDGETS:
        k, gains = n_keep(prepared, budget), []
        masks = official_masks(clip_folder, adapter, prepared, k, gains)
        (stage,) = workbench_plan(CDPruner(clip=clip_folder), adapter, prepared, budget).stages
        expected = torch.nonzero(masks[0]).flatten().tolist()            # line 176: image_features[index_masks]
        assert jaccard(stage.kept, expected) == 1.0 and len(stage.kept) == k, budget
        picked = [int(j) for j in torch.nonzero(masks[0]).flatten()]
        order = [float(g[0]) for g in gains]  # each pick's conditional gain, as Stage.scores holds it
        assert sorted(stage.score_array[picked]) == pytest.approx(sorted(order), rel=1e-4, abs=1e-9)
    # the stand-in picks otherwise here: the CLIP path is what runs
    assert workbench_plan(CDPruner(), adapter, prepared, 0.25).final_kept != \
        workbench_plan(CDPruner(clip=clip_folder), adapter, prepared, 0.25).final_kept


@pytest.mark.parametrize("size", SIZES)
def test_multi_crop_equals_the_official_rule_with_clip(clip_folder, size):
    adapter, _ = llava_next_case(size)
    prepared = adapter.prepare(noise_image(size), ASKED)
    for budget in BUDGETS:
        count = per_view_count(prepared, budget)
        masks = official_masks(clip_folder, adapter, prepared, count)
        names = workbench_names(adapter, prepared, official_llm_sequence(adapter, prepared, count, masks))
        (stage,) = workbench_plan(CDPruner(clip=clip_folder), adapter, prepared, budget).stages
        assert len(stage.kept) == len(names) and jaccard(stage.kept, names) == 1.0, (size, budget)


def test_a_missing_checkpoint_is_one_clear_line(tmp_path):
    missing = str(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"^cdpruner: clip='.*nothing' is no CLIP checkpoint folder \(one saved with "
                                         r"transformers' CLIPModel.save_pretrained, with its tokenizer\)$"):
        CDPruner(clip=missing)
    with pytest.raises(InvalidMethodParameters, match="is no CLIP checkpoint folder"):
        create_method("cdpruner", clip=missing)


def test_a_folder_that_does_not_load_is_one_clear_line_when_the_method_is_made(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # a config, no weights, no tokenizer
    with pytest.raises(InvalidMethodParameters, match=r"clip='.*broken': cannot load a CLIP model and tokenizer"):
        create_method("cdpruner", clip=str(broken))


def test_a_checkpoint_of_another_width_is_one_clear_line(clip_folder, tmp_path):
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_folder)
    config = model.config
    config.vision_config.hidden_size = 16
    config.vision_config.intermediate_size = 32
    other = tmp_path / "other"
    CLIPModel(config).save_pretrained(other)
    CLIPTokenizer.from_pretrained(clip_folder).save_pretrained(other)
    adapter = tiny_adapter("llava")
    prepared = adapter.prepare(noise_image(TINY_SPECS["llava"].image_size), ASKED)
    with pytest.raises(ValueError, match=r"its vision width is 16, the tower's features have 32; give the CLIP "
                                         "checkpoint the model's tower came from"):
        workbench_plan(CDPruner(clip=str(other)), adapter, prepared, 0.5)
