"""Cost of a recording next to a plain SDPA forward and an eager ``output_attentions=True`` one.

The model is LLaVA-1.5-shaped where it matters: a Llama decoder with hidden 4096, 32 heads,
intermediate 11008, fed 576 visual tokens (a 336 px CLIP grid of 14 px patches) and ~60 text
tokens, cut to 2 layers so it fits a CPU; the vision tower is a 1-layer, 64-wide CLIP (its cost is
not the question here). Weights are random: cost does not depend on them.

Printed, in one run:
* time(record every single-forward signal) / time(plain SDPA forward): medians of 3 runs after a
  warm-up. Saliency is left out: the gradients need a backward pass and occlusion one forward per
  batch of occluded groups, by design.
* peak memory of the recording vs the eager forward (its returned attentions kept alive), both as
  peak RSS above the RSS before the run, and as the part above a plain forward's peak.

How memory is measured: each workload runs after ``gc`` and ``malloc_trim``; the kernel's
high-water mark of resident memory is reset (``/proc/self/clear_refs`` <- 5) and read back
(``VmHWM`` in ``/proc/self/status``) after the run. glibc's mmap threshold is pinned
(``MALLOC_MMAP_THRESHOLD_``, set by re-executing) so freed tensors go back to the kernel and the
resident set follows live memory. tracemalloc cannot be used: it sees Python allocations only, not
torch's tensor buffers.

Run: ``nice -n 19 .venv/bin/python benchmarks/bench_recording.py`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import sys
import time

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,  # noqa: E402
                          LlavaProcessor)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

from workbench.models.registry import adapter_for  # noqa: E402
from workbench.recorder import record  # noqa: E402
from workbench.recording import SINGLE_FORWARD_SIGNALS, CaptureRequest  # noqa: E402
from workbench.shapes_model.build import CHAT_TEMPLATE  # noqa: E402
from workbench.shapes_model.tokenizer import build_tokenizer  # noqa: E402

IMAGE, PATCH = 336, 14
QUESTION = ("is there a red circle above the blue square and a green triangle left of the small yellow star ? "
            "what colour is the large shape at the top left and what shape is right of the purple circle ? "
            "how many shapes are there")
REQUEST = CaptureRequest(signals=SINGLE_FORWARD_SIGNALS, rows=("last", "text", "cls", "visual", "mean"))


def build():
    tokenizer = build_tokenizer()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                       image_size=IMAGE, patch_size=PATCH),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=11008,
                                num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=32,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_seq_length=(IMAGE // PATCH) ** 2,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    return adapter_for(model, processor, name="llava-1.5-shaped-2-layers")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(run) -> tuple[float, int]:
    """(seconds, peak resident bytes above the resident set before the run) of ``run()``."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    del result
    return seconds, peak - before


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    adapter = build()
    image = Image.new("RGB", (400, 300), (120, 60, 200))
    prepared = adapter.prepare(image, QUESTION)
    length, visual = prepared.inputs["input_ids"].shape[1], prepared.layout.n_tokens
    print(f"{adapter.name}: {length} tokens ({visual} visual, {length - visual} text), hidden 4096, 32 heads, "
          f"2 decoder layers; {torch.get_num_threads()} threads")

    def plain():
        with torch.no_grad():
            return adapter.model(**prepared.inputs)

    def recording():
        return record(adapter, prepared, REQUEST, memory_limit=None)

    def eager_attentions():  # the same weights, switched to eager attention for this run only
        adapter.model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                return adapter.model(**prepared.inputs, output_attentions=True)
        finally:
            adapter.model.set_attn_implementation("sdpa")

    # The plain forward runs first, before nnsight instruments any module.
    runs = {"plain SDPA forward": plain, "record (all single-forward signals)": recording,
            "eager, output_attentions=True": eager_attentions}
    results = {}
    for name, run in runs.items():
        measure(run)  # warm-up
        samples = [measure(run) for _ in range(3)]
        results[name] = (statistics.median(s for s, _ in samples), max(m for _, m in samples))
        print(f"  {name:40s} {results[name][0]:7.2f} s   peak +{results[name][1] / 2**20:8.1f} MiB")
    (t_plain, m_plain), (t_rec, m_rec), (t_eager, m_eager) = results.values()
    print(f"time   record / plain forward:                 {t_rec / t_plain:5.2f}x   (target <= 1.3x)")
    print(f"memory eager / record, peak above start:       {m_eager / m_rec:5.2f}x")
    extra_rec, extra_eager = max(m_rec - m_plain, 1), m_eager - m_plain
    print(f"memory eager / record, peak above plain's:     {extra_eager / extra_rec:5.2f}x   (target >= 10x)")
    rec = recording()
    stored = sum(t.numel() * t.element_size() for t in rec.tensors.values())
    print(f"stored: recording {stored / 2**20:.1f} MiB ({len(rec.tensors)} entries) vs eager attentions "
          f"{2 * 32 * length * length * 4 / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
