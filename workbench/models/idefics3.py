"""Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration``).

The processor resizes the longest edge to ``size["longest_edge"]``, then both sides up to multiples
of the tile size M (``max_image_size``), and, if that is more than one tile, cuts it into M x M
tiles (row-major) followed by a global view (the whole image stretched to M x M). Each frame's
patch grid is pixel-shuffled: every ``scale_factor`` x ``scale_factor`` block of patches becomes one
token, row-major. In the prompt each tile's tokens follow ``<fake_token_around_image><row_r_col_c>``,
rows of tiles end with "\\n", and the global view sits between ``<fake_token_around_image><global-img>``
and ``<fake_token_around_image>``: those markers are separators, not visual tokens.

Tower map: the tower runs on the frames in the same order (tower view f = frame f), each a row-major
grid of g x g patches (no [CLS]); the pixel shuffle sends patch (r, c) of frame f to token
``f * side**2 + (r // s) * side + c // s`` (s = ``scale_factor``, side = g / s).

Not handled: several images in one sequence, video, ``do_resize=False``.
"""

from __future__ import annotations

import math

import numpy as np
from transformers.models.idefics3.image_processing_pil_idefics3 import MAX_IMAGE_SIZE
from transformers.models.idefics3.image_processing_pil_idefics3 import (
    _resize_output_size_rescale_to_max_len as _rescale_to_max_len,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import (
    _resize_output_size_scale_below_upper_bound as _scale_below_upper_bound,
)

from workbench.layout import TokenGroup, VisualLayout, grid_cells
from workbench.models.base import ModelAdapter
from workbench.models.geometry import resize_to
from workbench.models.registry import register


@register
class Idefics3Adapter(ModelAdapter):
    architectures = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    family = "idefics3"

    def language_model(self):
        return self.model.model.text_model

    def vision_tower(self):
        return self.model.model.vision_model

    @property
    def has_cls_token(self) -> bool:
        return False

    @property
    def projector_feed_layer(self) -> int:
        return len(self.vision_layers())  # the connector reads the last layer (after the final norm)

    def processor_inputs(self, images, prompts):
        # One image per prompt, nested: SmolVLM's processor reads a flat list as all images of the
        # first prompt.
        return self.processor(images=[[image] for image in images], text=prompts, return_tensors="pt", padding=True)

    def _tiling(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of tiles the processor cuts, 0 x 0 when it sends the image as one frame.

        Mirrors ``resize`` + ``resize_for_vision_encoder`` + ``split_images`` of the PIL processor
        (its ``get_number_of_image_patches`` rounds the short side differently for some sizes)."""
        ip = self.processor.image_processor
        if not ip.do_resize:
            raise ValueError("image processors with do_resize=False are not supported")
        if not ip.do_image_splitting:
            return 0, 0
        h, w = _rescale_to_max_len(height, width, max_len=ip.size["longest_edge"])
        h, w = _scale_below_upper_bound(h, w, max_len=MAX_IMAGE_SIZE)
        tile = ip.max_image_size["longest_edge"]
        aspect = w / h
        if w >= h:
            w = math.ceil(w / tile) * tile
            h = math.ceil(int(w / aspect) / tile) * tile
        else:
            h = math.ceil(h / tile) * tile
            w = math.ceil(int(h * aspect) / tile) * tile
        return (h // tile, w // tile) if h > tile or w > tile else (0, 0)

    def layout(self, inputs, image_sizes):
        width, height = image_sizes[0]
        config = self.model.config
        tile, patch = config.vision_config.image_size, config.vision_config.patch_size
        ip_tile = self.processor.image_processor.max_image_size["longest_edge"]
        if ip_tile != tile:
            raise ValueError(f"the processor cuts {ip_tile}px tiles for a {tile}px tower")
        token = patch * config.scale_factor  # pixels per token side in a frame
        side = tile // token
        rows, cols = self._tiling(width, height)

        # Frames in sequence order: tiles (row-major) of the image resized to rows*M x cols*M, then
        # the global view (the image resized to M x M).
        frames = [(f"tile {r},{c}", resize_to(width, height, cols * tile, rows * tile), c * tile, r * tile)
                  for r in range(rows) for c in range(cols)]
        frames.append(("global", resize_to(width, height, tile, tile), 0, 0))
        n = side * side
        positions = self.image_token_positions(inputs).numpy()
        if len(positions) != n * len(frames):
            raise ValueError(f"{len(positions)} image tokens in the prompt, expected {len(frames)} frames of "
                             f"{n} ({rows}x{cols} tiles + global; one image per sequence is supported)")
        boxes = [view.patch_boxes(side, side, token, token, width, height, x0, y0) for _, view, x0, y0 in frames]
        return VisualLayout(
            positions=positions, group=np.repeat(np.arange(len(frames)), n),
            cell=np.tile(grid_cells(side, side), (len(frames), 1)), boxes=np.concatenate(boxes),
            groups=tuple(TokenGroup(f"image 0 / {name}", 0, side, side) for name, *_ in frames),
            image_sizes=(image_sizes[0],), sequence_length=int(inputs["input_ids"].shape[1]),
            separators=self._markers(inputs, positions),
            tower_owner=self._tower_owner(tile // patch, config.scale_factor, side, len(frames)),
        )

    @staticmethod
    def _tower_owner(patches: int, scale: int, side: int, n_frames: int) -> tuple[np.ndarray, ...]:
        """Per frame (tower view), the token each of its ``patches`` x ``patches`` patches feeds."""
        r, c = np.meshgrid(np.arange(patches), np.arange(patches), indexing="ij")
        local = ((r // scale) * side + c // scale).ravel().astype(np.int64)
        return tuple(f * side * side + local for f in range(n_frames))

    def _markers(self, inputs, positions: np.ndarray) -> np.ndarray:
        """Sequence indices of the image span (from the first <fake_token_around_image> before the
        first image token to the one after the last) that are not image tokens."""
        ids = inputs["input_ids"][0].cpu().numpy()
        fake = self.tokenizer.convert_tokens_to_ids(self.processor.fake_image_token)
        fakes = np.flatnonzero(ids == fake)
        before, after = fakes[fakes < positions[0]], fakes[fakes > positions[-1]]
        if not len(before) or not len(after):
            raise ValueError("no <fake_token_around_image> around the image tokens")
        span = np.arange(before[-1], after[0] + 1)
        return np.setdiff1d(span, positions)
