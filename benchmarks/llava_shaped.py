"""A LLaVA-1.5-shaped model for the benchmarks, with random weights (cost does not depend on them).

A Llama decoder with hidden 4096, 32 heads, intermediate 11008, fed 576 visual tokens (a 336 px CLIP
grid of 14 px patches) and ~50 text tokens, cut to ``layers`` decoder layers so it fits a CPU; the
vision tower is a 1-layer, 64-wide CLIP (its cost is not the question here).

Also the benchmarks' shared ``--device``/``--dtype`` options (``Target``, ``parse_target``) and the
synchronised clocks they time with (``clocks``), so each script stays about what it measures.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from workbench.errors import UserError
from workbench.models.loading import DTYPES
from workbench.models.registry import adapter_for
from workbench.shapes_model.build import CHAT_TEMPLATE
from workbench.shapes_model.tokenizer import build_tokenizer

IMAGE, PATCH = 336, 14
QUESTION = ("is there a red circle above the blue square and a green triangle left of the small yellow star ? "
            "what colour is the large shape at the top left and what shape is right of the purple circle ? "
            "how many shapes are there")


@dataclass(frozen=True)
class Target:
    """Where the benchmark model runs, and in which floating-point type."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @property
    def on_cpu(self) -> bool:
        # CPU seconds of this process are the work done only when the work runs on the CPU;
        # on an accelerator they count the host's waiting and launching.
        return self.device.type == "cpu"

    def describe(self) -> str:
        return f"{self.device}, {str(self.dtype).removeprefix('torch.')}"


def _option(argv: list[str], name: str, default: str) -> str:
    if name not in argv:
        return default
    at = argv.index(name) + 1
    if at >= len(argv):
        raise UserError(f"{name} needs a value")
    return argv[at]


def parse_target(argv: list[str]) -> Target:
    """``--device`` (default cpu) and ``--dtype`` (float32 default, bfloat16, float16) from ``argv``."""
    name, dtype = _option(argv, "--device", "cpu"), _option(argv, "--dtype", "float32")
    if dtype not in DTYPES:
        raise UserError(f"--dtype: unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    try:
        device = torch.device(name)
        torch.empty(1, device=device)  # the device exists and this build of torch can reach it
    except (RuntimeError, AssertionError, ValueError) as error:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"--device: {name!r} cannot be used ({cause}); e.g. cpu, cuda, cuda:0") from None
    if not hasattr(getattr(torch, device.type, None), "synchronize"):  # meta, lazy: nothing runs to time
        raise UserError(f"--device: {name!r} runs no kernels that can be timed; e.g. cpu, cuda, cuda:0")
    return Target(device, DTYPES[dtype])


def run_main(main) -> None:
    """Run ``main()``; a ``UserError`` is printed as one line and exits with status 2."""
    try:
        main()
    except UserError as error:
        print(f"{sys.argv[0]}: error: {error}", file=sys.stderr)
        sys.exit(2)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU), so a clock read after it counts it."""
    getattr(torch, device.type).synchronize(device)


def clocks(device: torch.device) -> tuple[float, float]:
    """Wall and CPU (every thread of this process) clocks, read after ``device`` is synchronised."""
    synchronize(device)
    return time.perf_counter(), time.process_time()


def build(layers: int = 2, target: Target = Target()):
    tokenizer = build_tokenizer()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, image_size=IMAGE, patch_size=PATCH),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=11008,
                                num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_seq_length=(IMAGE // PATCH) ** 2,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval().to(target.device, target.dtype)  # weights drawn on the CPU
    adapter = adapter_for(model, processor, name=f"llava-1.5-shaped-{layers}-layers")
    return adapter, adapter.prepare(Image.new("RGB", (400, 300), (120, 60, 200)), QUESTION)
