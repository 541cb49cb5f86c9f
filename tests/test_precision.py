"""Precision and placement: models load in float32, bfloat16 or float16 and still attend through
PyTorch's SDPA kernel (recording included, never eager); a device map splits the decoder over
devices without changing a result; bad choices give one clear line."""

from __future__ import annotations

import pytest
import torch

from probes.interception import base_implementation
from workbench.models.loading import ModelNotAvailable, load
from workbench.models.placement import DeviceMapError, devices_of
from workbench.pruning.executor import execute
from workbench.pruning.plan import KeepPlan, Stage
from workbench.recorder import record
from workbench.recording import CaptureRequest
from workbench.samples import read_dataset


@pytest.fixture(scope="module")
def sample():
    return read_dataset("data/eval/samples.jsonl", limit=1)[0]


class KernelCalls:
    """Counts calls of torch's SDPA kernel and of transformers' eager attention while active."""

    def __init__(self, monkeypatch):
        import transformers.integrations.sdpa_attention as sdpa
        from transformers.models.llama import modeling_llama

        self.sdpa = self.eager = 0
        real_sdpa, real_eager = torch.nn.functional.scaled_dot_product_attention, modeling_llama.eager_attention_forward

        def counted_sdpa(*args, **kwargs):
            self.sdpa += 1
            return real_sdpa(*args, **kwargs)

        def counted_eager(*args, **kwargs):
            self.eager += 1
            return real_eager(*args, **kwargs)

        monkeypatch.setattr(sdpa.torch.nn.functional, "scaled_dot_product_attention", counted_sdpa)
        monkeypatch.setattr(modeling_llama, "eager_attention_forward", counted_eager)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_records_on_sdpa_and_close_to_float32(dtype, sample, monkeypatch):
    full, half = load(dtype="float32"), load(dtype={torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype])
    assert half.model.dtype == dtype and full.model.dtype == torch.float32
    for model in (half.model, half.model.model.language_model, half.vision_tower()):
        assert base_implementation(model) == "sdpa"
    request = CaptureRequest(signals=("attention",), rows=("last",), stacks=("llm", "tower"))
    recordings = {}
    for name, adapter in (("full", full), ("half", half)):
        prepared = adapter.prepare(sample.load_image(), sample.question)
        calls = KernelCalls(monkeypatch)
        recordings[name] = record(adapter, prepared, request)
        assert calls.sdpa >= len(adapter.decoder_layers()) and calls.eager == 0, name
    for layer in range(len(full.decoder_layers())):
        one, other = (recordings[k].get("attention", layer, "last", "llm").float() for k in ("full", "half"))
        assert torch.isfinite(other).all()
        torch.testing.assert_close(other, one, atol=0.05, rtol=0.1)


def test_a_pruned_run_in_bfloat16_gives_the_float32_answer(sample):
    answers = []
    for dtype in ("float32", "bfloat16"):
        adapter = load(dtype=dtype)
        prepared = adapter.prepare(sample.load_image(), sample.question)
        n = prepared.layout.n_tokens
        plan = KeepPlan("half", n // 2, n, (Stage(2, tuple(range(0, n, 2))),))
        answers.append(execute(adapter, prepared, plan, 4).answer)
    assert answers[0] == answers[1]


def test_a_device_map_splits_the_decoder_and_changes_no_result(sample):
    plain, split = load(), load(device_map="cpu,cpu")
    prepared = [a.prepare(sample.load_image(), sample.question) for a in (plain, split)]
    hooked = [bool(layer._forward_pre_hooks) for layer in split.decoder_layers()]
    assert all(hooked) and not any(layer._forward_pre_hooks for layer in plain.decoder_layers())
    n = prepared[0].layout.n_tokens
    plan = KeepPlan("half", n // 2, n, (Stage(1, tuple(range(0, n, 2))),))
    one, other = (execute(a, p, plan, 4, gold_answer=sample.answer) for a, p in zip((plain, split), prepared))
    assert torch.equal(one.logits, other.logits) and one.answer_ids == other.answer_ids


def test_bad_precision_and_placement_choices_are_one_line():
    with pytest.raises(ModelNotAvailable, match="unknown dtype 'float8'"):
        load(dtype="float8")
    with pytest.raises(DeviceMapError, match="not a torch device"):
        devices_of("cuda:0,gpu7")
    assert devices_of("auto") == ([f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"])
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (cuda:0 on a CPU machine)
    with pytest.raises(DeviceMapError, match="GPU|does not exist"):
        devices_of(f"cpu,{missing}")
    with pytest.raises(DeviceMapError, match="GPU|does not exist"):
        load(device=missing)


def test_bad_choices_on_the_command_line_are_one_line(capsys):
    from workbench.cli import main

    assert main(["evaluate", "--limit", "1", "--device-map", "cuda:0,gpu7"]) != 0
    err = capsys.readouterr().err
    assert "not a torch device" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["sweep", "--dtype", "float8"])
    assert "invalid choice: 'float8'" in capsys.readouterr().err
