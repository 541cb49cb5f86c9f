"""CLIP's two sides of an instruction-relevance score, from a local CLIP checkpoint (CDPruner's code).

CDPruner's code (``clip_encoder.py``, ``load_text_tower`` and ``forward``) loads the text tower and the
``visual_projection`` of the CLIP checkpoint its vision tower came from, and scores each patch against
the question in CLIP's joint space:

- image side: ``visual_projection(post_layernorm(f))`` of the tower's patch features ``f`` at the
  projector's feed layer (``hidden_states[-2]``, [CLS] left out), in float32;
- text side: the question (the evaluation script's answer-format sentence removed) tokenised whole,
  zero-padded to a multiple of the text tower's ``max_position_embeddings`` and cut into segments of
  that length, each segment's ``text_embeds`` (the projected pooled output).

The models here carry no CLIP text tower, so the checkpoint is a folder the user gives (saved with
transformers' ``CLIPModel.save_pretrained``, its tokenizer beside it), loaded offline once per process.
The code's ``post_layernorm`` is its tower's own, which is that checkpoint's on LLaVA (the tower is the
frozen CLIP); here it is the checkpoint's.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from workbench.errors import UserError

# What CDPruner's evaluation script strips from the question before embedding it (model_vqa_loader.py line 110).
ANSWER_SENTENCE = "\nAnswer the question using a single word or phrase."


class ClipCheckpointError(UserError, ValueError):
    """The CLIP checkpoint a method was given cannot be used."""


def check_checkpoint(method: str, path: str) -> None:
    """One line unless ``path`` is a folder from which a CLIP model and its tokenizer load: checked
    when the method is made, before any model runs (the load is kept for the runs)."""
    if not isinstance(path, str) or not (Path(path).expanduser() / "config.json").is_file():
        raise ClipCheckpointError(f"{method}: clip={path!r} is no CLIP checkpoint folder (one saved with "
                                  "transformers' CLIPModel.save_pretrained, with its tokenizer)")
    load_clip(path)


@functools.lru_cache(maxsize=2)
def load_clip(path: str):
    """(CLIPModel in float32, eval mode; its tokenizer), loaded offline from ``path``."""
    from transformers import CLIPModel, CLIPTokenizerFast

    folder = str(Path(path).expanduser())
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
        tokenizer = CLIPTokenizerFast.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        reason = " ".join(str(e).split())[:200]
        raise ClipCheckpointError(f"clip={path!r}: cannot load a CLIP model and tokenizer from it ({reason})") from None
    return model, tokenizer


def clip_question(question: str) -> str:
    """The text the code embeds: the question with the answer-format sentence removed."""
    return question.replace(ANSWER_SENTENCE, "")


@torch.no_grad()
def text_embeds(path: str, question: str) -> np.ndarray:
    """[segments, D_clip]: ``text_embeds`` of the question's 77-token (``max_position_embeddings``) segments."""
    model, tokenizer = load_clip(path)
    inputs = tokenizer(text=clip_question(question), return_tensors="pt")
    width = model.config.text_config.max_position_embeddings
    length = inputs["input_ids"].shape[1]
    padding = width * ((length - 1) // width + 1) - length
    segments = {k: torch.cat([v, v.new_zeros((v.shape[0], padding))], dim=1).reshape(-1, width)
                for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    pooled = model.text_model(**segments).pooler_output
    return model.text_projection(pooled).double().numpy()


@torch.no_grad()
def image_embeds(path: str, features) -> np.ndarray:
    """[P, D_clip]: ``visual_projection(post_layernorm(features))`` of [P, D_tower] feed-layer patch features."""
    model, _ = load_clip(path)
    features = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    width = model.config.vision_config.hidden_size
    if features.shape[-1] != width:
        raise ClipCheckpointError(f"clip={path!r}: its vision width is {width}, the tower's features have "
                                  f"{features.shape[-1]}; give the CLIP checkpoint the model's tower came from")
    return model.visual_projection(model.vision_model.post_layernorm(features)).double().numpy()
