"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's AnyRes with a SigLIP
tower (no [CLS]) and one more rule for single images: when the unpadded high-res grid holds more
than about ``max_num_patches`` tiles' worth of patches (``vision_aspect_ratio="anyres_max_N"``), the
model shrinks it with bilinear interpolation before the newlines are added. A pooled token mixes
up to 2x2 neighbouring patches, so its box is the union of the patches it draws on.

Tower map: as LLaVA-NeXT's, except on a pooled grid, where a patch can feed two neighbouring tokens
per axis: it is owned by the token it has the largest bilinear weight in (ties to the earlier), so
every pooled token owns the patches nearest its sample point (``bilinear_owner``).

Not handled: several images in one sequence (the processor then skips the tiles entirely) and video.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

from workbench.models.llava_next import HighResGrid, LlavaNextAdapter
from workbench.models.registry import register


def bilinear_support(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, 2]: the input range each output of a 1-D ``interpolate(mode="bilinear")`` resize draws
    on (non-zero weight). Bilinear is separable, so rows and columns are done apart, each by
    resizing an identity matrix with torch itself to get its exact weights."""
    support = (_bilinear_weights(n_in, n_out) > 1e-6).T  # exact grid alignment can leave float noise as a weight
    first = support.argmax(1)
    last = n_in - support[:, ::-1].argmax(1)
    return np.stack([first, last], 1)


def _bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_in, n_out]: the weight of input k in output j of a 1-D ``interpolate(mode="bilinear")``."""
    eye = torch.eye(n_in)[None, :, :, None]  # channel k is the one-hot of input k along the height
    return torch.nn.functional.interpolate(eye, size=(n_out, 1), mode="bilinear")[0, :, :, 0].numpy()


def bilinear_owner(n_in: int, n_out: int) -> np.ndarray:
    """[n_in]: the output each input of a 1-D bilinear resize weighs most in (ties to the earlier).
    Bilinear is separable, so a patch's 2-D owner is (row owner, column owner)."""
    return _bilinear_weights(n_in, n_out).argmax(1)


@register
class LlavaOnevisionAdapter(LlavaNextAdapter):
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    family = "llava_onevision"
    multi_view = True
    _unpad = staticmethod(unpad_image)

    def _axis_owner(self, n_in: int, n_out: int) -> np.ndarray:
        return np.arange(n_in) if n_in == n_out else bilinear_owner(n_in, n_out)

    def _pool(self, grid: HighResGrid, side: int) -> HighResGrid:
        aspect = self.model.config.vision_aspect_ratio
        if not aspect.startswith("anyres_max_"):
            raise ValueError(f"unsupported vision_aspect_ratio {aspect!r}")
        # Mirrors LlavaOnevisionModel.pack_image_features, including its int(x // ratio) sizes.
        max_num_patches = int(aspect.removeprefix("anyres_max_"))
        n_rows, n_cols = len(grid.rows), len(grid.cols)
        ratio = math.sqrt(n_rows * n_cols / (max_num_patches * side**2))
        if ratio <= 1.1:
            return grid
        rows = bilinear_support(n_rows, int(n_rows // ratio))
        cols = bilinear_support(n_cols, int(n_cols // ratio))
        # Support indices are into the kept (unpadded) rows/cols, which are contiguous.
        return HighResGrid(grid.rows[0, 0] + rows, grid.cols[0, 0] + cols)
