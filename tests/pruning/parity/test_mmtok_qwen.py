"""MMTok parity on Qwen2.5-VL (and Qwen2-VL, the same family here): the official Qwen path against
``MMTok().select`` on tiny random models.

Official code: Ironieser/MMTok (HEAD)
- mmtok/qwen/qwen2_5_vl_mmtok.py lines 124-142 (``extract_question_from_messages``): the user
  message's text parts joined by spaces, stripped, ``<image>`` removed, stripped again; lines 96-99:
  that is the question the model's forward reads. Lines 41-48: alpha 0.5, softmax_tv_temperature
  0.01, softmax_vv_temperature 0.2; line 57: the embedding table is ``qwen_model.get_input_embeddings()``.
- mmtok/core/mmtok_core.py lines 194-198 (``apply_selection_preprocess_qwen``): the text is
  ``f"Question: {question_text}"``, filtered only if ``clean_text`` is set, which nothing sets;
  lines 71-85 (``_encode_text_with_token_pooling``): ``tokenizer(text.split(), is_split_into_words=True)``,
  the embedding rows of the ids, a leading BOS dropped; lines 145-146: every token when N <= target.
- mmtok/qwen/qwen2_5_VLmodel_mmtok.py line 155: ``target = int(retain_ratio * N)``; lines 96 and
  159-161: x = the merger's output (the decoder's input at the image positions).
- mmtok/qwen/modeling_qwen2_5_vl_mmtok.py lines 65-73: x_clip = the last tower block's output (the
  merger's input, window order), ``reshape(seq_len // 4, 4, -1).mean(dim=1)`` then put back in token
  order by ``argsort(window_index)``.
- mmtok/core/semantic_selector.py lines 103-146: the selection (``official_mmtok`` in test_mmtok.py).
Qwen2-VL has no entry point in the code; its tower has no window order (the merge blocks are already
in token order), otherwise the reference is the same.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.pruning.parity.common import eager_forward, eager_model, jaccard, visual_positions, workbench_plan
from tests.pruning.parity.test_mmtok import official_mmtok
from tests.tiny_models import QUESTION, TINY_SPECS, noise_image, tiny_adapter
from workbench.pruning.methods.mmtok import MMTok

FAMILIES = ("qwen2_5_vl", "qwen2_vl")
QUESTIONS = (QUESTION, "<image>what shape is left of the ball ?\nAnswer the question using a single word or phrase.")
BUDGETS = (0.125, 0.25, 0.5, 0.7, 5)


def official_question(question: str) -> str:
    """qwen2_5_vl_mmtok.py 124-142 on the message the workbench's prompt is built from."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    parts = [item["text"] for m in messages if m["role"] == "user" for item in m["content"]
             if item.get("type") == "text" and item.get("text")]
    return " ".join(parts).strip().replace("<image>", "").strip()


@torch.no_grad()
def official_text(adapter, question: str) -> torch.Tensor:
    """mmtok_core.py 194-198 and 71-85: "Question: ..." unfiltered, pre-split words, BOS dropped."""
    tokenizer = adapter.tokenizer
    text = f"Question: {official_question(question)}"
    ids = tokenizer(text.split(), is_split_into_words=True, return_tensors="pt", padding=True,
                    truncation=True)["input_ids"]
    embedded = eager_model(adapter).get_input_embeddings()(ids)[0]
    start = 1 if ids.shape[1] > 1 and ids[0, 0].item() == tokenizer.bos_token_id else 0
    return embedded[start:].double()


@torch.no_grad()
def official_vision(adapter, prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """(x: the merger's output at the image positions, x_clip: modeling_qwen2_5_vl_mmtok.py 65-73)."""
    model = eager_model(adapter)
    visual = model.model.visual
    caught = {}
    handle = visual.merger.register_forward_pre_hook(lambda m, args: caught.setdefault("blocks", args[0].clone()))
    try:
        embeds = eager_forward(adapter, prepared).hidden_states[0][0].double()
        if "blocks" not in caught:  # the eager forward is cached: run the tower for the hook
            model.model.get_image_features(prepared.inputs["pixel_values"], prepared.inputs["image_grid_thw"])
    finally:
        handle.remove()
    blocks = caught["blocks"].double()
    pooled = blocks.reshape(blocks.shape[0] // 4, 4, -1).mean(dim=1)
    if getattr(visual, "window_size", None) is not None:  # Qwen2.5-VL: back from window order
        from transformers.vision_utils import get_vision_window_index

        config = visual.config
        window_index, _ = get_vision_window_index(prepared.inputs["image_grid_thw"], config.spatial_merge_size,
                                                  config.window_size, config.patch_size)
        pooled = pooled[torch.argsort(window_index)]
    return embeds[torch.as_tensor(visual_positions(prepared))], pooled


def official_count(budget, n: int) -> int:
    """qwen2_5_VLmodel_mmtok.py 155 for a ratio; a count as given; all when N <= target (core 145-146)."""
    return min(int(budget * n) if isinstance(budget, float) else budget, n)


@functools.lru_cache(maxsize=None)
def cases() -> tuple:
    """(family, adapter, prepared) per family and question, kept alive (the eager forwards are cached by id)."""
    return tuple((family, tiny_adapter(family), tiny_adapter(family).prepare(
        noise_image(TINY_SPECS[family].image_size, seed), question))
        for family in FAMILIES for seed, question in enumerate(QUESTIONS))


@pytest.mark.parametrize("family", FAMILIES)
def test_default_equals_the_official_qwen_path(family):
    for name, adapter, prepared in cases():
        if name != family:
            continue
        x, x_clip = official_vision(adapter, prepared)
        z = official_text(adapter, prepared.question)
        for budget in BUDGETS:
            (stage,) = workbench_plan(MMTok(), adapter, prepared, budget).stages
            kept = official_mmtok(z, x, x_clip, official_count(budget, len(x)), tv_temp=0.01)
            assert jaccard(stage.kept, kept) == 1.0, (family, prepared.question, budget)


def test_each_part_of_the_qwen_path_matters():
    """The LLaVA path's text, its temperature and the workbench's count each keep another set than the
    code at some budget here, so the test above fails when any of them is the default on Qwen."""
    variants = {"keywords": MMTok(text="keywords"), "tv 0.02": MMTok(tv_temperature=0.02),
                "count": MMTok(count="budget")}
    differs = {name: False for name in variants}
    for _, adapter, prepared in cases():
        x, x_clip = official_vision(adapter, prepared)
        z = official_text(adapter, prepared.question)
        for budget in BUDGETS:
            kept = official_mmtok(z, x, x_clip, official_count(budget, len(x)), tv_temp=0.01)
            for name, method in variants.items():
                (stage,) = workbench_plan(method, adapter, prepared, budget).stages
                differs[name] |= jaccard(stage.kept, kept) < 1.0 or len(stage.kept) != len(kept)
    assert differs == {name: True for name in variants}


def test_the_old_behaviour_is_the_llava_path_by_name():
    """``text=keywords,tv_temperature=0.02,count=budget`` on Qwen is the LLaVA path's rule there."""
    from tests.pruning.parity.test_mmtok import official_text as llava_text
    from workbench.pruning.method import SelectionContext

    old = MMTok(text="keywords", tv_temperature=0.02, count="budget")
    for _, adapter, prepared in cases():
        x, x_clip = official_vision(adapter, prepared)
        z = llava_text(adapter, prepared.question)
        for budget in BUDGETS:
            (stage,) = workbench_plan(old, adapter, prepared, budget).stages
            k = SelectionContext(prepared.layout, budget).n_keep
            assert jaccard(stage.kept, official_mmtok(z, x, x_clip, k, tv_temp=0.02)) == 1.0
            assert len(stage.kept) == k
