"""Architecture and processor of the shipped model, built from the real ``transformers`` classes.

``LlavaForConditionalGeneration`` with a CLIP vision tower (a [CLS] token + 12x12 patches) and a
Llama decoder, so the LLaVA adapter, the [CLS]-based pruning methods and the in-LLM methods all
apply to it unchanged.
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from workbench.shapes_model.tokenizer import build_tokenizer

IMAGE_SIZE = 96
PATCH_SIZE = 8
NUM_VISUAL_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
MLP_WIDTH = 512  # intermediate size of the tower's and the decoder's MLPs

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in parts %}{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} {% endif %}{% endfor %}"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for part in parts %}{{ part['text'] }} {% endfor %}</s> "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_processor() -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def build_config(vocab_size: int, image_token_id: int, pad_token_id: int, bos_token_id: int, eos_token_id: int,
                 decoder_layers: int = 4, mlp_width: int = MLP_WIDTH) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=mlp_width, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=128,
    )
    # initializer_range 0.05: at the default 0.02 a decoder this small, trained from scratch,
    # sits at the question-type prior for thousands of steps. 8 heads of 16 dims: with 4 heads of 32
    # and 3 layers the same recipe stalled near 0.81 on relation and position questions.
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=mlp_width, num_hidden_layers=decoder_layers,
        num_attention_heads=8, num_key_value_heads=8, head_dim=16, max_position_embeddings=512,
        initializer_range=0.05,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, tie_word_embeddings=False,
    )
    # vision_feature_layer=-1: the default -2 would leave the last vision layer untrained.
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=NUM_VISUAL_TOKENS,
        tie_word_embeddings=False,
    )


def build_model(processor: LlavaProcessor, seed: int = 0, attention: str = "sdpa",
                **architecture) -> LlavaForConditionalGeneration:
    """A freshly initialised model; ``architecture`` overrides ``build_config``'s keywords
    (``decoder_layers``, ``mlp_width``)."""
    import torch

    tok = processor.tokenizer
    config = build_config(len(tok), tok.convert_tokens_to_ids(tok.image_token), tok.pad_token_id,
                          tok.bos_token_id, tok.eos_token_id, **architecture)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attention)
    return model
