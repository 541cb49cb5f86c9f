"""A LLaVA-1.5-shaped model for the benchmarks, with random weights (cost does not depend on them).

A Llama decoder with hidden 4096, 32 heads, intermediate 11008, fed 576 visual tokens (a 336 px CLIP
grid of 14 px patches) and ~50 text tokens, cut to ``layers`` decoder layers so it fits a CPU; the
vision tower is a 1-layer, 64-wide CLIP (its cost is not the question here).
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from workbench.models.registry import adapter_for
from workbench.shapes_model.build import CHAT_TEMPLATE
from workbench.shapes_model.tokenizer import build_tokenizer

IMAGE, PATCH = 336, 14
QUESTION = ("is there a red circle above the blue square and a green triangle left of the small yellow star ? "
            "what colour is the large shape at the top left and what shape is right of the purple circle ? "
            "how many shapes are there")


def build(layers: int = 2):
    tokenizer = build_tokenizer()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, image_size=IMAGE, patch_size=PATCH),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=11008,
                                num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_seq_length=(IMAGE // PATCH) ** 2,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    adapter = adapter_for(LlavaForConditionalGeneration(config).eval(), processor, name=f"llava-1.5-shaped-{layers}-layers")
    return adapter, adapter.prepare(Image.new("RGB", (400, 300), (120, 60, 200)), QUESTION)
