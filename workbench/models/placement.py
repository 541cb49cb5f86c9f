"""One model over several devices, for models larger than one GPU (``load(device_map=...)``).

transformers' own ``device_map`` needs ``accelerate``, which is not in the lock, so ``place`` does
that split itself after the model is loaded on the CPU (the host must hold the weights once): the
decoder layers in contiguous blocks, one block per device, in order; the
vision tower, the embeddings and the rotary module on the first device; the final norm on the last;
and a forward pre-hook on each placed module that moves its tensor inputs to its device, so
activations follow the layers (pipeline placement: one device computes at a time). The LM head
stays with the embeddings on the first device (they are often tied), so logits, and every answer,
come back on the first device.
"""

from __future__ import annotations

import torch

from workbench.errors import UserError

AUTO = "auto"


class DeviceMapError(UserError, ValueError):
    pass


def devices_of(device_map: str) -> list[str]:
    """``"auto"``: every visible CUDA device (the CPU when there is none); otherwise a
    comma-separated list such as ``"cuda:0,cuda:1"``, each checked by torch."""
    if device_map.strip() == AUTO:
        count = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(count)] if count else ["cpu"]
    devices = [part.strip() for part in device_map.split(",") if part.strip()]
    if not devices:
        raise DeviceMapError("--device-map: give 'auto' or devices such as cuda:0,cuda:1")
    for device in devices:  # every name first, then whether this machine has it
        _parsed(device, "--device-map")
    for device in devices:
        check_device(device, "--device-map")
    return devices


def _parsed(device: str, option: str) -> torch.device:
    try:
        return torch.device(device)
    except RuntimeError:
        raise DeviceMapError(f"{option}: {device!r} is not a torch device (e.g. cuda:0, cpu)") from None


def check_device(device: str, option: str = "--device") -> None:
    """``DeviceMapError`` unless ``device`` names a torch device this machine has (checked before
    anything loads: torch would otherwise fail deep inside the model's first move)."""
    parsed = _parsed(device, option)
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise DeviceMapError(f"{option}: {device!r} asks for a GPU, but this torch build sees no CUDA device")
        if parsed.index is not None and parsed.index >= count:
            raise DeviceMapError(f"{option}: {device!r} does not exist; this machine has cuda:0..cuda:{count - 1}")


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def _follow(module: torch.nn.Module, device: str) -> None:
    """Move ``module`` to ``device`` and make its tensor inputs follow it."""
    module.to(device)

    def pre_hook(_, args, kwargs):
        return _to(args, device), {k: _to(v, device) for k, v in kwargs.items()}

    module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def place(adapter, devices: list[str]) -> None:
    """Split ``adapter``'s model over ``devices`` (see the module docstring)."""
    adapter.model.to(devices[0])
    layers = list(adapter.decoder_layers())
    for index, layer in enumerate(layers):
        _follow(layer, devices[index * len(devices) // len(layers)])
    _follow(adapter.final_norm(), devices[-1])
    _follow(adapter.output_head(), devices[0])
