"""A short digest of a model's weights, so results made with other weights are never mixed in.

Names, shapes, dtypes and the leading values of every tensor: a retrain, a fine-tune or another
dtype changes it, and it costs milliseconds even on a 7B model (no full pass over the weights).
"""

from __future__ import annotations

import hashlib

import torch

LEADING_VALUES = 4096


def weights_fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        if tensor.device.type != "meta":  # offloaded weights: their names and shapes still count
            head = tensor.detach().reshape(-1)[:LEADING_VALUES].to("cpu", torch.float64)
            digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:16]
