"""Tiny, randomly initialised models of every supported family, for tests.

Each is the REAL ``transformers`` model class with a few-layer, 32-wide config, a processor built
from the real (PIL-backend) image processor and processor classes, and a word-level tokenizer over
the scene vocabulary extended with the family's special tokens and a chat template shaped like the
real one. Nothing is downloaded. Builds are seeded and cached per family for the test session, so
a test that changes weights must put them back.

``TINY_SPECS[family].image_size`` is a non-square image size that sends the family's processor down
its cropping / padding / tiling paths; ``.blur_px`` says how far (x, y, original pixels) resampling
can carry a painted edge into each kind of view (see ``view_kind``), for tests that paint a box and
look at which tokens change. PIL's filters reach ``support * max(1, scale)`` source pixels (bicubic
support 2, Lanczos 3; scale = source pixels per output pixel).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable
from unittest import mock

import numpy as np
import torch
from PIL import Image

from workbench.models.base import ModelAdapter
from workbench.models.registry import adapter_for
from workbench.shapes_model.build import CHAT_TEMPLATE as LLAVA_CHAT_TEMPLATE
from workbench.shapes_model.tokenizer import build_tokenizer

TINY_FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm")

HIDDEN, LAYERS, HEADS = 32, 2, 2
TILE, PATCH = 32, 8  # tower input side and patch side, in pixels
MEAN, STD = [0.5] * 3, [0.5] * 3
ROLE_WORDS = ("user", "assistant", "system")
QUESTION = "what colour is the object ?"


@dataclass(frozen=True)
class TinySpec:
    build: Callable[[], tuple[torch.nn.Module, object]]
    image_size: tuple[int, int]  # (width, height) of the test image, non-square
    blur_px: dict[str, tuple[float, float]] = field(default_factory=dict)  # view kind -> (x, y) reach, original px


def view_kind(group_name: str) -> str:
    """The kind of view a token group is: "image 0" -> "image", "image 0 / tile 1,2" -> "tile",
    "image 0 / base" -> "base"."""
    return group_name.split(" / ")[-1].split(" ")[0]


# --- shared pieces ---------------------------------------------------------------------------------
def _tokenizer(named: dict[str, str], markers: tuple[str, ...] = ()):
    """The scene tokenizer with the family's named special tokens, unnamed markers, and "\\n" as a
    token of its own (the word-level pre-tokenizer would drop it, real tokenizers keep it)."""
    tok = build_tokenizer(special_tokens=named, extra_words=ROLE_WORDS)
    tok.add_tokens(list(markers), special_tokens=True)
    tok.add_tokens(["\n"])
    return tok


def _ids(tok, *tokens: str) -> list[int]:
    ids = tok.convert_tokens_to_ids(list(tokens))
    if tok.unk_token_id in ids:
        raise ValueError(f"unknown token among {tokens}")
    return ids


def _chat_template(user: str, image: str, end: str, assistant: str, start: str = "") -> str:
    """A chat template shaped like the families' own: ``start``, then per message a role prefix, the
    parts (``image`` for an image) and ``end``; the generation prompt is the assistant prefix."""
    return (
        start + "{% for message in messages %}"
        "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
        "{% else %}{% set parts = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}" + user + "{% else %}" + assistant + "{% endif %}"
        "{% for part in parts %}{% if part['type'] == 'image' %}" + image + "{% else %}{{ part['text'] }}{% endif %}"
        "{% endfor %}" + end + "{% endfor %}"
        "{% if add_generation_prompt %}" + assistant + "{% endif %}"
    )


def _text_kwargs(tok) -> dict:
    return dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=1024,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def _llama(tok):
    from transformers import LlamaConfig

    return LlamaConfig(**_text_kwargs(tok))


def _vision_kwargs(tile: int = TILE, patch: int = PATCH) -> dict:
    return dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, image_size=tile, patch_size=patch)


def _clip():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**_vision_kwargs(), projection_dim=HIDDEN)


@contextlib.contextmanager
def _no_video_processor():
    """Lets a video-capable processor be built without torchvision.

    ``ProcessorMixin`` type-checks the ``video_processor`` slot against ``VideoProcessorMixin``, which
    transformers only exports when torchvision is installed (it is not: the workbench handles still
    images, through the PIL image processors), so that one check is skipped while the processor is
    built; the slot gets None, or a video processor that can be built without torchvision."""
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class

    def lenient(self, name, argument):
        return None if name == "video_processor" else check(self, name, argument)

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lenient):
        yield


# --- families --------------------------------------------------------------------------------------
def _llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _tokenizer({"image_token": "<image>"})
    ip = CLIPImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                               image_mean=MEAN, image_std=STD)
    processor = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    config = LlavaConfig(vision_config=_clip(), text_config=_llama(tok), image_token_id=_ids(tok, "<image>")[0],
                         vision_feature_select_strategy="default", image_seq_length=(TILE // PATCH) ** 2)
    return LlavaForConditionalGeneration(config), processor


# AnyRes resolutions: the real LLaVA-NeXT list scaled from 336 px tiles to TILE.
NEXT_PINPOINTS = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE], [3 * TILE, TILE], [TILE, 3 * TILE]]


def _llava_next():
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = _tokenizer({"image_token": "<image>"})
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                    image_grid_pinpoints=NEXT_PINPOINTS, image_mean=MEAN, image_std=STD)
    processor = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_CHAT_TEMPLATE)
    config = LlavaNextConfig(vision_config=_clip(), text_config=_llama(tok), image_token_index=_ids(tok, "<image>")[0],
                             image_grid_pinpoints=NEXT_PINPOINTS, vision_feature_select_strategy="default",
                             image_seq_length=(TILE // PATCH) ** 2)
    return LlavaNextForConditionalGeneration(config), processor


# OneVision's pinpoints are every 1..6 x 1..6 tiles; up to 3 x 3 here. anyres_max_2 (real: 9) makes
# the model pool the high-res grid of the test image, so that path is exercised.
ONEVISION_PINPOINTS = [[r * TILE, c * TILE] for r in (1, 2, 3) for c in (1, 2, 3)]
ONEVISION_ASPECT = "anyres_max_2"


def _llava_onevision():
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor,
                              Qwen2Config, SiglipVisionConfig)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = _tokenizer({"image_token": "<image>", "video_token": "<video>"}, ("<|im_start|>", "<|im_end|>"))
    ip = LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=ONEVISION_PINPOINTS,
                                         image_mean=MEAN, image_std=STD)
    template = _chat_template("<|im_start|>user\n", "<image>\n", "<|im_end|>\n", "<|im_start|>assistant\n")
    with _no_video_processor():
        processor = LlavaOnevisionProcessor(
            image_processor=ip, tokenizer=tok, video_processor=None, num_image_tokens=(TILE // PATCH) ** 2,
            vision_feature_select_strategy="full", chat_template=template, vision_aspect_ratio=ONEVISION_ASPECT)
    image_id, video_id = _ids(tok, "<image>", "<video>")
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**_vision_kwargs(), vision_use_head=False),
        text_config=Qwen2Config(**_text_kwargs(tok)), image_token_index=image_id, video_token_index=video_id,
        image_grid_pinpoints=ONEVISION_PINPOINTS, vision_aspect_ratio=ONEVISION_ASPECT,
        vision_feature_select_strategy="full",
    )
    return LlavaOnevisionForConditionalGeneration(config), processor


QWEN_MARKERS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
QWEN_TEMPLATE = _chat_template("<|im_start|>user\n", "<|vision_start|><|image_pad|><|vision_end|>", "<|im_end|>\n",
                               "<|im_start|>assistant\n")
# Qwen's rotary sections split head_dim/2 between time, height and width (real: 16, 24, 24 of 64).
QWEN_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}


def _qwen_parts(processor_cls):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _tokenizer({"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}, QWEN_MARKERS)
    # min/max pixels: between 2x2 and 8x8 merged tokens of 16 px.
    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": 32 * 32, "longest_edge": 128 * 128}, patch_size=PATCH,
                                  merge_size=2, temporal_patch_size=2, image_mean=MEAN, image_std=STD)
    with _no_video_processor():
        processor = processor_cls(image_processor=ip, tokenizer=tok, video_processor=None, chat_template=QWEN_TEMPLATE)
    image_id, video_id, start_id, end_id = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                "<|vision_end|>")
    ids = dict(image_token_id=image_id, video_token_id=video_id, vision_start_token_id=start_id,
               vision_end_token_id=end_id)
    return tok, processor, ids


def _qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

    tok, processor, ids = _qwen_parts(Qwen2VLProcessor)
    vision = Qwen2VLVisionConfig(depth=LAYERS, embed_dim=HIDDEN, hidden_size=HIDDEN, num_heads=HEADS, mlp_ratio=2,
                                 patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2)
    text = Qwen2VLTextConfig(**_text_kwargs(tok), rope_parameters=QWEN_ROPE)
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=text, **ids)), processor


def _qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (Qwen2_5_VLTextConfig,
                                                                         Qwen2_5_VLVisionConfig)

    tok, processor, ids = _qwen_parts(Qwen2_5_VLProcessor)
    # 32 px windows = 2x2 merged tokens, so window attention (layer 0) reorders patches; layer 1 is full.
    vision = Qwen2_5_VLVisionConfig(depth=LAYERS, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_heads=HEADS,
                                    patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2, window_size=32,
                                    out_hidden_size=HIDDEN, fullatt_block_indexes=[1])
    text = Qwen2_5_VLTextConfig(**_text_kwargs(tok), rope_parameters=QWEN_ROPE)
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
    return Qwen2_5_VLForConditionalGeneration(config), processor


IDEFICS_MARKERS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>") + tuple(
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
# 64 px frames of 16 px patches, pixel-shuffled 2x2: 32 px tokens, 4 per frame. Tokens this large
# keep Lanczos (support 3) from reaching across a token in the paint test.
IDEFICS_TILE, IDEFICS_PATCH, IDEFICS_SCALE = 64, 16, 2


def _idefics_processor_parts(image_processor_cls):
    tok = _tokenizer({"image_token": "<image>"}, IDEFICS_MARKERS)
    # Real: longest edge 4 x 364 then 364 px tiles; here 2 x 64 then 64.
    ip = image_processor_cls(size={"longest_edge": 2 * IDEFICS_TILE}, max_image_size={"longest_edge": IDEFICS_TILE},
                             do_image_splitting=True, image_mean=MEAN, image_std=STD)
    return tok, ip, (IDEFICS_TILE // IDEFICS_PATCH // IDEFICS_SCALE) ** 2


def _idefics_model(config_cls, vision_config_cls, model_cls, tok):
    vision = vision_config_cls(**_vision_kwargs(IDEFICS_TILE, IDEFICS_PATCH))
    config = config_cls(vision_config=vision, text_config=_llama(tok), image_token_id=_ids(tok, "<image>")[0],
                        scale_factor=IDEFICS_SCALE)
    return model_cls(config)


def _idefics3():
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok, ip, seq_len = _idefics_processor_parts(Idefics3ImageProcessorPil)
    template = _chat_template("User:", "<image>", "<end_of_utterance>\n", "Assistant:", start="<s>")
    processor = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=seq_len, chat_template=template)
    return _idefics_model(Idefics3Config, Idefics3VisionConfig, Idefics3ForConditionalGeneration, tok), processor


def _smolvlm():
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
    from transformers.models.smolvlm import processing_smolvlm
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    tok, ip, seq_len = _idefics_processor_parts(SmolVLMImageProcessorPil)
    template = _chat_template("User:", "<image>", "<end_of_utterance>\n", "Assistant:", start="<|im_start|>")
    tok.add_tokens(["<|im_start|>"], special_tokens=True)
    # SmolVLMProcessor refuses to build without `num2words`, which only its video prompts use (to
    # spell out frame counts); images never reach it, so a stand-in is enough here.
    stand_in = processing_smolvlm.num2words or object()
    with _no_video_processor(), mock.patch.object(processing_smolvlm, "num2words", stand_in):
        # Its chat template reads the video processor's defaults, so it gets a real one.
        processor = SmolVLMProcessor(image_processor=ip, tokenizer=tok, video_processor=SmolVLMVideoProcessor(),
                                     image_seq_len=seq_len, chat_template=template)
    return _idefics_model(SmolVLMConfig, SmolVLMVisionConfig, SmolVLMForConditionalGeneration, tok), processor


BICUBIC, LANCZOS = 2, 3  # PIL filter support, in pixels at unit scale


def _reach(support: int, scale_x: float, scale_y: float) -> tuple[float, float]:
    """How far (x, y, original pixels) one resize by ``scale`` original px per output px can carry a
    painted edge, plus half a pixel."""
    return support * max(1.0, scale_x) + 0.5, support * max(1.0, scale_y) + 0.5


TINY_SPECS: dict[str, TinySpec] = {
    # 72x48 -> shortest edge 32 -> 48x32 -> centre crop 32x32 (8 px off each side).
    "llava": TinySpec(_llava, (72, 48), {"image": _reach(BICUBIC, 1.5, 1.5)}),
    # 90x60 -> best fit 64x64: resized to 64x43 (rounded up), padded 10 + 11 rows; unpadding drops
    # token rows 0 and 7 of 8. Base view: stretched to 32x32.
    "llava_next": TinySpec(_llava_next, (90, 60), {"base": _reach(BICUBIC, 90 / 32, 60 / 32),
                                                   "tiles": _reach(BICUBIC, 90 / 64, 60 / 43)}),
    # 80x60 -> best fit 96x64: resized up to 86x64, padded 5 + 5 columns; unpadding keeps columns
    # 1-10 of 12; anyres_max_2 pools the 8x10 grid to 5x6, with overlapping supports.
    "llava_onevision": TinySpec(_llava_onevision, (80, 60), {"base": _reach(BICUBIC, 80 / 32, 60 / 32),
                                                             "tiles": _reach(BICUBIC, 80 / 86, 60 / 64)}),
    # 90x60 -> 96x64 (rounded to 16 px), 6x4 tokens.
    "qwen2_vl": TinySpec(_qwen2_vl, (90, 60), {"image": _reach(BICUBIC, 90 / 96, 60 / 64)}),
    # 110x60 -> 112x64, 7x4 tokens: 2x2-token windows that do not divide the grid.
    "qwen2_5_vl": TinySpec(_qwen2_5_vl, (110, 60), {"image": _reach(BICUBIC, 110 / 112, 60 / 64)}),
    # 128x96 -> longest edge 128 (unchanged) -> stretched to 128x128 (rows only), cut into 2x2 tiles;
    # the global view is that 128x128 shrunk to 64x64, a second Lanczos pass on top of the first in y.
    "idefics3": TinySpec(_idefics3, (128, 96), {"tile": _reach(LANCZOS, 1, 1), "global": (
        _reach(LANCZOS, 2, 2)[0], _reach(LANCZOS, 1, 1)[1] + _reach(LANCZOS, 2, 2)[1] * 96 / 128)}),
}
TINY_SPECS["smolvlm"] = TinySpec(_smolvlm, TINY_SPECS["idefics3"].image_size, TINY_SPECS["idefics3"].blur_px)


@functools.lru_cache(maxsize=None)
def tiny_adapter(family: str) -> ModelAdapter:
    """The adapter around a tiny random model of ``family`` (one of ``TINY_FAMILIES``), built once per
    session. Callers that change its weights must restore them."""
    if family not in TINY_SPECS:
        raise KeyError(f"unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    torch.manual_seed(0)
    model, processor = TINY_SPECS[family].build()
    return adapter_for(model, processor, name=f"tiny-{family}")


def noise_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A seeded random RGB image of ``size`` (width, height): every pixel differs from a painted colour."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 200, (size[1], size[0], 3), dtype=np.uint8))


def save_tiny(family: str, folder) -> str:
    """Saves the tiny ``family`` model and processor into ``folder`` with ``save_pretrained``, as a
    checkpoint folder that ``--model`` can point at; returns the folder as a string.

    ``ProcessorMixin.save_pretrained`` cannot skip an absent part, so a processor built with no
    video processor (see ``_no_video_processor``) is saved as one without that part: its
    ``processor_config.json`` then says ``"video_processor": null``, and loading it through
    ``AutoProcessor`` fails as a hub checkpoint's does without torchvision."""
    adapter = tiny_adapter(family)
    adapter.model.save_pretrained(folder)
    processor = adapter.processor
    present = [name for name in type(processor).get_attributes() if getattr(processor, name) is not None]
    with mock.patch.object(type(processor), "get_attributes", classmethod(lambda cls: present)):
        processor.save_pretrained(folder)
    return str(folder)
