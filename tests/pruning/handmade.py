"""Hand-built inputs for the methods' faithfulness tests: small layouts and recordings whose
entries are set by hand, so a test can compute the reference rule's kept set on paper."""

from __future__ import annotations

import numpy as np
import torch

from workbench.layout import TokenGroup, VisualLayout, grid_boxes, grid_cells
from workbench.pruning.method import ModelFacts, SelectionContext, SignalNeed
from workbench.recording import CaptureRequest, Identity, Recording

# A LLaVA-1.5-7B-like model: 32 decoder layers, a 24-layer CLIP tower with [CLS] feeding from -2.
LLAVA_FACTS = ModelFacts("llava", decoder_layers=32, vision_layers=24, has_cls_token=True,
                         projector_feed_layer=23)
NO_CLS_FACTS = ModelFacts("qwen2_vl", decoder_layers=28, vision_layers=32, has_cls_token=False,
                          projector_feed_layer=32)


def grid_layout(*shapes: tuple[int, int], prefix: int = 3, suffix: int = 5) -> VisualLayout:
    """One group per (rows, cols), tokens in sequence order after ``prefix`` tokens."""
    cells, groups, group = [], [], []
    for g, (rows, cols) in enumerate(shapes):
        cells.append(grid_cells(rows, cols))
        group += [g] * rows * cols
        groups.append(TokenGroup(f"image 0 / tile {g}", 0, rows, cols))
    n = len(group)
    return VisualLayout(positions=np.arange(prefix, prefix + n), group=np.array(group),
                        cell=np.concatenate(cells),
                        boxes=np.concatenate([grid_boxes(r, c, 0, 0, 10 * c, 10 * r) for r, c in shapes]),
                        groups=tuple(groups), image_sizes=((40, 40),), sequence_length=prefix + n + suffix)


def handmade_recording(layout: VisualLayout, entries: dict[SignalNeed, object]) -> Recording:
    """A recording holding exactly ``entries`` (each a [R, K] array: a row of scores is [1, N])."""
    from workbench.recording import EntryKey

    tensors = {EntryKey(n.signal, n.stack, n.layer, n.rows): torch.as_tensor(np.asarray(v, dtype=np.float32))
               for n, v in entries.items()}
    rows = tuple(sorted({n.rows for n in entries if n.rows != "tokens"})) or ("last",)
    request = CaptureRequest(signals=tuple(sorted({n.signal for n in entries})), rows=rows)
    return Recording(Identity("handmade", "0", "q", "p"), request, layout, tensors)


def handmade_context(layout: VisualLayout, budget, entries: dict[SignalNeed, object],
                     model: ModelFacts = LLAVA_FACTS) -> SelectionContext:
    return SelectionContext(layout, budget, handmade_recording(layout, entries), model)


def text_and_kept_rows(prepared, kept) -> torch.Tensor:
    """Rows of the unpruned sequence that are neither visual nor separators, plus the kept visual ones."""
    layout = prepared.layout
    keep = np.ones(layout.sequence_length, dtype=bool)
    keep[layout.positions] = False
    keep[layout.separators] = False
    keep[layout.positions[np.asarray(kept, dtype=np.int64)]] = True
    return torch.from_numpy(np.flatnonzero(keep))


def stack_inputs(adapter, run):
    """(result of ``run()``, the embeddings and position ids the decoder stack got in the prefill)."""
    seen = []

    def grab(module, args, kwargs):
        seen.append((kwargs.get("inputs_embeds"), kwargs.get("position_ids")))

    hook = adapter.language_model().register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = run()
    finally:
        hook.remove()
    # the last whole-sequence call is the prefill (an earlier one may make the wrapper's inputs to the stack)
    embeds, positions = [s for s in seen if s[0] is not None and s[0].shape[1] > 1][-1]
    return out, embeds, positions
