"""LLaVA-1.5 (``LlavaForConditionalGeneration``), and the shipped model, which is one.

One image becomes one square grid of patches: CLIP resizes the shortest edge and centre-crops, the
tower's [CLS] output is dropped (``vision_feature_select_strategy="default"``) or kept ("full").
Tower map: one view, tower patch i (after the [CLS]) is visual token i.
"""

from __future__ import annotations

import numpy as np

from workbench.layout import TokenGroup, VisualLayout, grid_cells
from workbench.models.base import ModelAdapter
from workbench.models.geometry import resize_and_crop
from workbench.models.registry import register
from workbench.tower_map import identity_owner


@register
class LlavaAdapter(ModelAdapter):
    architectures = ("LlavaForConditionalGeneration",)
    family = "llava"

    def language_model(self):
        return self.model.model.language_model

    def vision_tower(self):
        return self.model.model.vision_tower

    @property
    def has_cls_token(self) -> bool:
        return type(self.vision_tower()).__name__.startswith("CLIP")

    @property
    def projector_feed_layer(self) -> int:
        layer = self.model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"multi-layer vision_feature_layer {layer} is not supported")
        return layer % (len(self.vision_layers()) + 1)

    def projector(self):
        return self.model.model.multi_modal_projector

    def layout(self, inputs, image_sizes):
        width, height = image_sizes[0]
        view, out_w, out_h = resize_and_crop(self.processor.image_processor, width, height)
        patch = self.model.config.vision_config.patch_size
        rows, cols = out_h // patch, out_w // patch
        positions = self.image_token_positions(inputs)
        separators = np.zeros(0, dtype=np.int64)
        if self.model.config.vision_feature_select_strategy == "full" and self.has_cls_token:
            separators, positions = positions[:1].numpy(), positions[1:]  # the [CLS] output comes first
        if len(positions) != rows * cols:
            raise ValueError(f"{len(positions)} image tokens in the prompt, expected {rows}x{cols} "
                             "(one image per sequence is supported)")
        return VisualLayout(
            positions=positions.numpy(), group=np.zeros(rows * cols, dtype=np.int64), cell=grid_cells(rows, cols),
            boxes=view.patch_boxes(rows, cols, patch, patch, width, height),
            groups=(TokenGroup("image 0", 0, rows, cols),), image_sizes=(image_sizes[0],),
            sequence_length=int(inputs["input_ids"].shape[1]), separators=separators,
            tower_owner=identity_owner(rows * cols),
        )
