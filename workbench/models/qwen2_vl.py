"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

Dynamic resolution: the processor resizes the whole image (aspect kept as far as rounding allows)
to multiples of ``patch_size * spatial_merge_size`` (``smart_resize``), and the tower's merger turns
each 2x2 block of patches into one token. One grid per image, row-major, no [CLS], no separators
(``<|vision_start|>``/``<|vision_end|>`` sit outside the placeholder run). The resized size is read
back from ``image_grid_thw`` rather than recomputed, so it is the processor's own.

Qwen2.5-VL's window attention reorders patches inside the tower but restores the order before the
merger, so the layout is the same. Not handled: video, several images in one sequence.

Tower map: one tower view, all ``grid_h * grid_w`` patches. The processor already orders patches so
that each merge block of ``merge**2`` is contiguous and the blocks are in token order, so in
Qwen2-VL patch p feeds token ``p // merge**2``. Qwen2.5-VL's tower layers (what a recording holds)
see the blocks permuted by window (``get_vision_window_index``): recorded patch p belongs to block
``window_index[p // merge**2]``, which is that token (the merger's output is put back in order).
"""

from __future__ import annotations

import numpy as np
import torch

from workbench.layout import TokenGroup, VisualLayout, grid_cells
from workbench.models.base import ModelAdapter, RopeFreeQK
from workbench.models.geometry import resize_to
from workbench.models.registry import register


@register
class Qwen2VLAdapter(ModelAdapter):
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    family = "qwen2_vl"
    mrope = True

    def language_model(self):
        return self.model.model.language_model

    def vision_tower(self):
        return self.model.model.visual

    def vision_layers(self):
        return self.vision_tower().blocks

    def vision_attention(self, layer: int):
        return self.vision_layers()[layer].attn

    def rope_free_qk(self, stack: str, layer: int) -> RopeFreeQK | None:
        if stack == "llm":
            return super().rope_free_qk(stack, layer)
        attention = self.vision_attention(layer)

        def split(outputs):  # one fused projection: [S, 3 * H * d] -> q, k as [S, H, d]
            fused = outputs[0].unflatten(-1, (3, attention.num_heads, -1))
            return fused[:, 0], fused[:, 1]

        return RopeFreeQK((attention.qkv,), split)  # the tower's 2-D rotary embedding comes after it

    @property
    def has_cls_token(self) -> bool:
        return False

    @property
    def projector_feed_layer(self) -> int:
        return len(self.vision_layers())  # the merger reads the last block's output

    def layout(self, inputs, image_sizes):
        width, height = image_sizes[0]
        if "image_grid_thw" not in inputs:
            raise ValueError("inputs carry no image_grid_thw: were they made by the Qwen processor with an image?")
        frames, grid_h, grid_w = (int(v) for v in inputs["image_grid_thw"][0])
        vision = self.model.config.vision_config
        patch, merge = vision.patch_size, vision.spatial_merge_size
        rows, cols = grid_h // merge, grid_w // merge
        positions = self.image_token_positions(inputs).numpy()
        if frames != 1 or len(positions) != rows * cols:
            raise ValueError(f"{len(positions)} image tokens in the prompt for a {frames}x{rows}x{cols} grid "
                             "(one still image per sequence is supported)")
        block = np.arange(grid_h * grid_w) // (merge * merge)  # merge block of each patch, processor order
        window_size = getattr(self.vision_tower(), "window_size", None)
        if window_size is not None:  # Qwen2.5-VL: the tower's layers see the blocks in window order
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(torch.tensor([[frames, grid_h, grid_w]]), merge, window_size,
                                                      patch)
            block = window_index.cpu().numpy()[block]
        view = resize_to(width, height, grid_w * patch, grid_h * patch)
        token = patch * merge
        return VisualLayout(
            positions=positions, group=np.zeros(rows * cols, dtype=np.int64), cell=grid_cells(rows, cols),
            boxes=view.patch_boxes(rows, cols, token, token, width, height),
            groups=(TokenGroup("image 0", 0, rows, cols),), image_sizes=(image_sizes[0],),
            sequence_length=int(inputs["input_ids"].shape[1]), tower_owner=(block.astype(np.int64),),
        )
