"""Load a model by hub name or local path, offline unless downloads are asked for."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from workbench.models.base import ModelAdapter
from workbench.models.registry import adapter_class

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_MODEL = "shapes-vlm"
SHIPPED_MODEL_DIR = REPO_ROOT / "data" / "models" / SHIPPED_MODEL


class ModelNotAvailable(RuntimeError):
    pass


def resolve(name_or_path: str) -> str:
    if name_or_path == SHIPPED_MODEL:
        if not (SHIPPED_MODEL_DIR / "config.json").is_file():
            raise ModelNotAvailable(f"the shipped model is missing from {SHIPPED_MODEL_DIR}; "
                                    "restore it from the repository or retrain it with `workbench train-shapes`")
        return str(SHIPPED_MODEL_DIR)
    return name_or_path


def _not_available(name: str, error: Exception, allow_download: bool) -> ModelNotAvailable:
    if Path(name).exists():
        return ModelNotAvailable(f"{name} is not a loadable checkpoint folder ({error})")
    how = ("downloads were allowed but failed" if allow_download else
           "downloads are off (pass --allow-download on a machine with hub access)")
    return ModelNotAvailable(
        f"weights for {name!r} are not available locally and {how}. Point --model at a local copy "
        f"(a folder with config.json, the weights and the processor files), or download it first, "
        f"e.g. `huggingface-cli download {name}`. Cause: {type(error).__name__}: {str(error).splitlines()[0]}"
    )


def load(name_or_path: str = SHIPPED_MODEL, device: str = "cpu", dtype: torch.dtype | str | None = None,
         allow_download: bool = False, trust_remote_code: bool = False,
         attn_implementation: str = "sdpa") -> ModelAdapter:
    """Load a supported VLM and wrap it in its family's adapter.

    Offline by default (``local_files_only``), so a missing checkpoint fails at once with a message
    saying where to put it instead of waiting on the network.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    name = resolve(name_or_path)
    local_only = not allow_download or os.environ.get("HF_HUB_OFFLINE") == "1"
    common = {"local_files_only": local_only, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(name, **common)
    except (OSError, ValueError) as e:
        raise _not_available(name, e, allow_download) from None
    architecture = (config.architectures or [""])[0]
    cls = adapter_class(architecture)
    try:
        processor = AutoProcessor.from_pretrained(name, **common)
    except (OSError, ValueError) as e:
        raise _not_available(name, e, allow_download) from None
    except ImportError as e:
        # e.g. Qwen2-VL / OneVision / SmolVLM processors bring a video processor that needs
        # torchvision, and SmolVLM's needs num2words.
        raise ModelNotAvailable(f"the processor of {name!r} needs a package that is not installed: {e}") from None
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            name, dtype=dtype or "auto", attn_implementation=attn_implementation, **common)
    except (OSError, ValueError) as e:
        raise _not_available(name, e, allow_download) from None
    return cls(model.to(device), processor, name=name_or_path)
