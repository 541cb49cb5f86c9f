"""One vision-tower pass per distinct image view of a batch.

A batch often holds one image several times: the questions a benchmark asks of each image (POPE
asks six per image in each of its three splits), or every sample's blank-image control. A tower's outputs for a view depend on that
view alone, so within ``ViewSharing.active`` each tower pass runs on the distinct views only and
every view of the batch gets its own copy of its outputs. Towers that take every image's patches as
one flattened sequence (Qwen2-VL) are passed as they are.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def view_groups(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(first, inverse) over views given as the rows of ``tensors`` (each [N, ...], read together):
    the first view of each distinct one, in order, and each view's place among them; None when
    no two views are exactly equal."""
    n = tensors[0].shape[0]
    # Each tensor's distinct rows, then the distinct combinations of them.
    labels = torch.stack([torch.unique(t.reshape(n, -1), dim=0, return_inverse=True)[1].to(tensors[0].device)
                          for t in tensors], 1)
    _, inverse = torch.unique(labels, dim=0, return_inverse=True)
    count = int(inverse.max()) + 1
    if count == n:
        return None
    first = torch.full((count,), n, dtype=torch.long, device=inverse.device).scatter_reduce(
        0, inverse, torch.arange(n, device=inverse.device), "amin")
    order = torch.argsort(first)
    place = torch.empty_like(order)
    place[order] = torch.arange(count, device=order.device)
    return first[order], place[inverse]


def spread(value, inverse: torch.Tensor):
    """``value`` made on the distinct views (a tensor with a row per view, or a tuple, list or
    ``ModelOutput`` of them; anything else as it is) with a row per view of the batch."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, inverse.to(value.device)) if value.dim() else value
    if isinstance(value, dict):  # ModelOutput: its fields in place, so attribute access sees them
        for key in list(value.keys()):
            value[key] = spread(value[key], inverse)
        return value
    if isinstance(value, (tuple, list)):
        items = [spread(item, inverse) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # a namedtuple, or not
    return value


@dataclass
class ViewSharing:
    """The deduplication of one tower's passes. ``inverse`` is set during a deduplicated pass (each
    view's place among the distinct views), so what reads the tower's layers meanwhile can
    ``spread`` what it read there to the batch's views."""

    tower: torch.nn.Module
    inverse: torch.Tensor | None = None
    depth: int = 0  # ``active`` contexts entered: the hooks are registered by the outermost only

    def spread(self, value):
        return value if self.inverse is None else spread(value, self.inverse)

    def _enter(self, module, args, kwargs):
        self.inverse = None
        images = args[0] if args else kwargs.get("pixel_values")
        if not isinstance(images, torch.Tensor) or images.dim() < 4 or images.shape[0] < 2:
            return None  # not a batch of images (a flattened patch sequence, or one view)
        n = images.shape[0]
        per_view = [(i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == n]
        named = [(k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n]
        found = view_groups([t for _, t in per_view + named])
        if found is None:
            return None
        first, self.inverse = found
        args = list(args)
        for i, tensor in per_view:
            args[i] = tensor.index_select(0, first.to(tensor.device))
        return tuple(args), {**kwargs, **{k: v.index_select(0, first.to(v.device)) for k, v in named}}

    def _leave(self, module, args, kwargs, output):
        if self.inverse is None:
            return None
        output, self.inverse = spread(output, self.inverse), None
        return output

    @contextlib.contextmanager
    def active(self):
        """Within it, every pass of the tower runs on its batch's distinct views (entered again
        inside, it changes nothing: a pass is deduplicated once)."""
        if self.depth:
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
            return
        handles = [self.tower.register_forward_pre_hook(self._enter, with_kwargs=True, prepend=True),
                   self.tower.register_forward_hook(self._leave, with_kwargs=True, prepend=True)]
        self.depth = 1
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.depth, self.inverse = 0, None
