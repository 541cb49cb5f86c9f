"""Load a model by hub name or local path, offline unless downloads are asked for."""

from __future__ import annotations

import functools
import os
import sys
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """A torch dtype from its name in ``DTYPES``; None or "auto": the checkpoint's own."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    if dtype not in DTYPES:
        raise ModelNotAvailable(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)} (or auto)")
    return DTYPES[dtype]


def load(name_or_path: str = SHIPPED_MODEL, device: str = "cpu", dtype: torch.dtype | str | None = None,
         allow_download: bool = False, trust_remote_code: bool = False,
         attn_implementation: str = "sdpa", device_map: str | None = None) -> ModelAdapter:
    """Load a supported VLM and wrap it in its family's adapter.

    Offline by default (``local_files_only``), so a missing checkpoint fails at once with a message
    saying where to put it instead of waiting on the network. ``dtype``: a torch dtype or one of
    ``DTYPES``' names (default: the checkpoint's). ``device_map``: "auto" or a device list to split
    a model too large for one device over several (``workbench.models.placement``); ``device`` is
    then unused. Attention runs on PyTorch's SDPA kernels in every dtype (the probes listen there).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    from workbench.models.placement import check_device, devices_of, place

    # Both checked before any loading.
    devices = None if device_map is None else devices_of(device_map)
    if device_map is None:
        check_device(str(device))
    torch_dtype = parse_dtype(dtype)
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
        processor = _load_processor(name, config, common, name_or_path)
    except (OSError, ValueError) as e:
        raise _not_available(name, e, allow_download) from None
    except ImportError as e:
        # e.g. SmolVLM's processor refuses to build without num2words (used for video prompts only).
        message = " ".join(str(e).split())
        raise ModelNotAvailable(f"the processor of {name!r} needs a package that is not installed: {message}") from None
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            name, dtype=torch_dtype, attn_implementation=attn_implementation, **common)
    except (OSError, ValueError) as e:
        raise _not_available(name, e, allow_download) from None
    if devices is None:
        return cls(model.to(device), processor, name=name_or_path)
    adapter = cls(model, processor, name=name_or_path)
    place(adapter, devices)
    return adapter


def _load_processor(name: str, config, common: dict, shown_name: str):
    """The checkpoint's processor; for images only when its video processor cannot be built.

    Without torchvision transformers builds no video processor at all, so ``AutoProcessor`` fails on
    every video-capable family (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, SmolVLM). The workbench
    handles still images, which the PIL image processors serve, so those families get their
    processor with an empty video slot, and one line on stderr says so.
    """
    from transformers import PROCESSOR_MAPPING, AutoProcessor
    from transformers.utils import is_torchvision_available

    processor_cls = PROCESSOR_MAPPING.get(type(config), None)
    if (processor_cls is None or is_torchvision_available()
            or "video_processor" not in processor_cls.get_attributes()):
        return AutoProcessor.from_pretrained(name, **common)
    processor = _images_only_processor(processor_cls, name, common)
    print(f"note: {shown_name}: video processor not built (needs torchvision); images only", file=sys.stderr)
    return processor


def _images_only_processor(processor_cls, name: str, common: dict):
    """``processor_cls`` from the checkpoint's image processor, tokenizer, processor settings and
    chat template, with no video processor; what ``from_pretrained`` does, less the video part."""
    from transformers import AutoImageProcessor, AutoTokenizer

    parts = {"image_processor": AutoImageProcessor.from_pretrained(name, **common),
             "tokenizer": AutoTokenizer.from_pretrained(name, **common),
             "video_processor": None}
    cls = _without_video(processor_cls)
    settings, extra = cls.get_processor_dict(name, local_files_only=common["local_files_only"])
    return cls.from_args_and_dict([parts[attribute] for attribute in cls.get_attributes()], settings, **extra)


@functools.cache
def _without_video(processor_cls: type) -> type:
    """A subclass of ``processor_cls`` (same name) that accepts no video processor.

    ``ProcessorMixin`` type-checks each part against a base class, and transformers exports the
    video one only with torchvision. Chat templates are rendered by ``ProcessorMixin`` itself:
    SmolVLM's override only adds frame defaults read from the (absent) video processor.
    """
    from transformers.processing_utils import ProcessorMixin

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return processor_cls.check_argument_for_proper_class(self, argument_name, argument)

    return type(processor_cls.__name__, (processor_cls,), {
        "__module__": processor_cls.__module__, "__qualname__": processor_cls.__qualname__,
        "check_argument_for_proper_class": check_argument_for_proper_class,
        "apply_chat_template": ProcessorMixin.apply_chat_template,
    })
