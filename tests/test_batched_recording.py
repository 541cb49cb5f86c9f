"""Recording several samples in one forward: samples whose image tensors stack (one image, or its
tiles and crops, of one shape) ride the batch axis, their tower views side by side and their
decoder rows right-padded, and every recording, decoder input and recorded prefill equals the
sample's own up to float rounding; flattened-patch towers (Qwen2-VL, Qwen2.5-VL) and samples over
the memory limit record one at a time."""

from __future__ import annotations

import json

import pytest
import torch
from polars.testing import assert_frame_equal

from tests.pruning.conftest import ALL_MODELS, SHIPPED, eval_sample, shipped_architecture
from tests.models.test_distinct_views import tower_batches
from tests.test_batching import _inputs
from workbench import pipeline
from workbench.memory import estimate
from workbench.pruning.recorded_prefill import recorded_prefill, recorded_prefills
from workbench.recorder import batch_inputs, record, record_together, recording_groups
from workbench.recording import CaptureRequest

REQUEST = CaptureRequest(rows=("last", "cls", "mean", "visual"))
TOLERANCE = 1e-4


def _assert_same_recording(together, alone, where: str) -> None:
    assert together.tensors.keys() == alone.tensors.keys(), where
    for key, value in alone.tensors.items():
        torch.testing.assert_close(together.tensors[key], value, atol=TOLERANCE, rtol=TOLERANCE,
                                   msg=lambda m: f"{where} {key}: {m}")
    assert together.per_head == alone.per_head, where
    assert together.row_positions.keys() == alone.row_positions.keys(), where
    for name, rows in alone.row_positions.items():
        assert torch.equal(together.row_positions[name], rows), f"{where} {name}"
    assert together.tables.keys() == alone.tables.keys(), where
    for name, table in alone.tables.items():
        assert_frame_equal(together.tables[name], table, check_exact=False, rel_tol=TOLERANCE, abs_tol=TOLERANCE)
    assert together.notes == alone.notes, where


def _same_shapes(model: str):
    """Three inputs whose images give tensors of one shape, their questions of different lengths."""
    if model == SHIPPED:
        return _inputs(model)  # the shipped processor resizes every image to one size
    from tests.tiny_models import QUESTION, TINY_SPECS, noise_image, tiny_adapter

    adapter = tiny_adapter(model)
    size = TINY_SPECS[model].image_size
    return adapter, [adapter.prepare(noise_image(size, seed=i), q)
                     for i, q in enumerate([QUESTION, "what shape is it ?", QUESTION + " now"])]


@pytest.mark.parametrize("model", ALL_MODELS)
def test_samples_recorded_together_equal_each_recorded_alone(model):
    adapter, prepared = _same_shapes(model)
    lengths = {item.inputs["input_ids"].shape[1] for item in prepared}
    assert len(lengths) > 1, "the samples must differ in length, or no padding is tested"
    groups = recording_groups(adapter, prepared, REQUEST)
    assert groups == [[0, 1, 2]]
    together = [recording for group in groups
                for recording in record_together(adapter, [prepared[i] for i in group],
                                                 batch_inputs(adapter, [prepared[i] for i in group]), REQUEST)]
    for i, (item, made) in enumerate(zip(prepared, together)):
        _assert_same_recording(made, record(adapter, item, REQUEST), f"{model} sample {i}")
    views = len(prepared[0].layout.tower_owner) or 1  # every tower view of every sample was recorded
    assert {key.view for key in together[-1].tensors if key.stack == "tower"} == set(range(views))


@pytest.mark.parametrize("model", ["qwen2_vl", "qwen2_5_vl"])
def test_flattened_patches_of_images_of_different_sizes_are_recorded_together(model):
    """Towers that take every image's patches as one sequence (block-wise attention) record images
    of different sizes together: each sample's span of the sequence is its own."""
    adapter, prepared = _inputs(model)
    assert len({item.inputs["pixel_values"].shape[0] for item in prepared}) > 1
    assert recording_groups(adapter, prepared, REQUEST) == [[0, 1, 2]]
    together = record_together(adapter, prepared, batch_inputs(adapter, prepared), REQUEST)
    for i, (item, made) in enumerate(zip(prepared, together)):
        _assert_same_recording(made, record(adapter, item, REQUEST), f"{model} sample {i}")


def _alone(adapter, item, request: CaptureRequest = REQUEST):
    """A fresh sample's own recording, with the decoder inputs, [CLS] and begun unpruned prefill its
    recorded forward leaves."""
    with recorded_prefill(adapter, item) as begun:
        recording = record(adapter, item, request)
    return recording, adapter.decoder_inputs(item), begun.prefill, item._decoder_inputs.get("cls")


def _assert_left_as_alone(adapter, item, prefill, alone, where: str) -> None:
    """What a batch's recorded forward left a sample (its decoder inputs, [CLS] and begun prefill
    ``prefill``) equals what its own left (``_alone``)."""
    _, decoder_inputs, own_prefill, cls = alone
    assert "llm" in item._decoder_inputs, f"{where}: the batch forward made no decoder inputs"
    assert (cls is not None) == adapter.has_cls_token
    if cls is not None:  # the tower's [CLS] of each view, projected, is the sample's own
        torch.testing.assert_close(item._decoder_inputs["cls"], cls, atol=TOLERANCE, rtol=TOLERANCE)
    mine = adapter.decoder_inputs(item)
    torch.testing.assert_close(mine.inputs_embeds, decoder_inputs.inputs_embeds, atol=TOLERANCE, rtol=TOLERANCE)
    assert torch.equal(mine.attention_mask, decoder_inputs.attention_mask)
    assert torch.equal(mine.position_ids, decoder_inputs.position_ids)
    assert prefill is not None and prefill.depth == own_prefill.depth
    for part in ("inputs", "keys", "values"):
        for layer, (a, b) in enumerate(zip(getattr(prefill, part), getattr(own_prefill, part))):
            assert a.shape == b.shape, f"{where} {part} {layer}"
            torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=TOLERANCE)
    for name, value in own_prefill.kwargs.items():
        theirs = prefill.kwargs[name]
        for a, b in zip(value if isinstance(value, tuple) else (value,),
                        theirs if isinstance(theirs, tuple) else (theirs,)):
            assert (a is None) == (b is None), name
            if a is not None:
                torch.testing.assert_close(b, a, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("model", ALL_MODELS)
def test_a_batch_recording_gives_each_sample_its_decoder_inputs_and_unpruned_prefill(model):
    """The recorded forward of several samples also leaves each one the decoder inputs and the
    begun unpruned prefill its own forward would: its rows of every layer's input, keys and values."""
    adapter, prepared = _same_shapes(model)
    alone = [_alone(adapter, copy) for copy in _same_shapes(model)[1]]  # the same inputs made anew: nothing cached
    inputs = batch_inputs(adapter, prepared)
    with recorded_prefills(adapter, prepared, inputs) as begun:
        record_together(adapter, prepared, inputs, REQUEST)
    for i, (item, made, own) in enumerate(zip(prepared, begun, alone)):
        _assert_left_as_alone(adapter, item, made.prefill, own, f"{model} sample {i}")


def _two_images_twice(model: str):
    """Four inputs: two images, each under two questions of different lengths."""
    if model == SHIPPED:
        adapter, sample = shipped_architecture(), eval_sample()
        images, questions = [sample.load_image().rotate(90 * i) for i in range(2)], [sample.question, "what shape is it ?"]
    else:
        from tests.tiny_models import QUESTION, TINY_SPECS, noise_image, tiny_adapter

        adapter = tiny_adapter(model)
        images = [noise_image(TINY_SPECS[model].image_size, seed=i) for i in range(2)]
        questions = [QUESTION, "what shape is it ?"]
    return adapter, [adapter.prepare(image, q) for image in images for q in questions]


@pytest.mark.parametrize("model", ALL_MODELS)
def test_questions_on_one_image_recorded_together_share_its_tower_pass_unless_the_tower_is_recorded(model):
    """Samples on one image recorded together share its tower pass where the request records the
    decoder alone; each recording, decoder input, [CLS] and begun prefill is still the sample's own.
    A request that records the tower reads every view's pass: none is shared."""
    passes = {}
    for request in (REQUEST, CaptureRequest(rows=("last", "mean", "visual"), stacks=("llm",))):
        adapter, prepared = _two_images_twice(model)
        alone = [_alone(adapter, copy, request) for copy in _two_images_twice(model)[1]]
        inputs = batch_inputs(adapter, prepared)
        with tower_batches(adapter) as seen, recorded_prefills(adapter, prepared, inputs) as begun:
            together = record_together(adapter, prepared, inputs, request)
        passes[request.stacks] = seen
        for i, (item, recording, made, own) in enumerate(zip(prepared, together, begun, alone)):
            where = f"{model} {request.stacks} sample {i}"
            _assert_same_recording(recording, own[0], where)
            _assert_left_as_alone(adapter, item, made.prefill, own, where)
    (every, images), = passes[("tower", "llm")]
    (computed, _), = passes[("llm",)]
    assert computed == (every // 2 if images else every), model


def test_prepared_together_runs_give_the_answers_of_samples_prepared_alone():
    """``pipeline.prepare_inputs`` on several samples: the unpruned run (from the batch recording's
    prefill) and a method's run give each sample's answers and gold log-probabilities."""
    from workbench.pruning.registry import create_method

    adapter, sample = shipped_architecture(), eval_sample()
    method = create_method("fastv")
    together = pipeline.prepare_inputs(adapter, [(sample, item) for item in _inputs(SHIPPED)[1]], [method])
    assert all(ready.recorded_prefill is not None for ready in together)
    for i, (ready, item) in enumerate(zip(together, _inputs(SHIPPED)[1])):
        alone = pipeline.prepare_inputs(adapter, [(sample, item)], [method])[0]
        for run_method, budget in ((None, None), (method, 0.25)):
            mine, theirs = (pipeline.run(adapter, r, run_method, budget) for r in (ready, alone))
            assert mine.generation == theirs.generation, f"sample {i}"
            assert mine.plan.final_kept == theirs.plan.final_kept, f"sample {i}"
            assert mine.gold_logprob == pytest.approx(theirs.gold_logprob, abs=TOLERANCE)


def test_recording_groups_hold_to_the_memory_limit():
    adapter, prepared = _inputs(SHIPPED)
    sizes = [estimate(adapter, item, REQUEST).total for item in prepared]
    assert recording_groups(adapter, prepared, REQUEST, limit=max(sizes)) == [[0], [1], [2]]
    assert recording_groups(adapter, prepared, REQUEST, limit=sizes[0] + sizes[1]) == [[0, 1], [2]]
    assert recording_groups(adapter, prepared, REQUEST, limit=None) == [[0, 1, 2]]


@pytest.mark.parametrize("model", ALL_MODELS)
def test_a_sweep_batch_gives_the_rows_of_one_sample_at_a_time(model, tmp_path):
    """``run_tasks`` on three samples at once (one recording forward, batched runs) against each
    alone: the same kept tokens, answers and counts for methods reading the recording before and
    inside the LLM."""
    from tests.tiny_models import QUESTION, TINY_SPECS, noise_image
    from workbench.samples import Sample, sample_to_row
    from workbench.sweep import MethodSpec, SweepTask, run_tasks

    if model == SHIPPED:
        adapter, image = shipped_architecture(), eval_sample().load_image()
        images = [image.rotate(90 * i) for i in range(3)]
    else:
        adapter, _ = _same_shapes(model)
        images = [noise_image(TINY_SPECS[model].image_size, seed=i) for i in range(3)]
    specs = tuple(MethodSpec(name) for name in ("fastv", "cdpruner", "pyramiddrop"))
    tasks = []
    for i, (image, question) in enumerate(zip(images, [QUESTION, "what shape is it ?", QUESTION + " now"])):
        image.save(tmp_path / f"{i}.png")
        sample = Sample(f"s{i}", tmp_path / f"{i}.png", question, "red")
        tasks.append(SweepTask(sample_to_row(sample, tmp_path), str(tmp_path), specs, (0.25,)))
    together = run_tasks(adapter, tasks)
    for task, rows in zip(tasks, together):
        (alone,) = run_tasks(adapter, [task])
        assert [(r["method"], r["status"]) for r in rows] == [(r["method"], r["status"]) for r in alone]
        for mine, theirs in zip(rows, alone):
            where = (model, mine["sample_id"], mine["method"])
            if mine["stages"] is not None:
                assert [s["kept"] for s in json.loads(mine["stages"])] == \
                    [s["kept"] for s in json.loads(theirs["stages"])], where
            assert mine["predicted_answer"] == theirs["predicted_answer"], where
            assert mine["visual_tokens_per_layer"] == theirs["visual_tokens_per_layer"], where


def test_samples_a_model_does_not_run_as_stacked_are_recorded_one_at_a_time(monkeypatch):
    """A forward whose tower batch is not the samples' views side by side (here: the inputs are made
    to claim two views each) is refused inside the recording, and the pipeline records those
    samples one at a time instead: the same recordings and prefills, nothing lost."""
    from workbench import recorder
    from workbench.pruning.registry import create_method

    adapter, sample = shipped_architecture(), eval_sample()
    method = create_method("fastervlm")  # it reads the tower, where the claim fails
    items = [(sample, item) for item in _inputs(SHIPPED)[1]]
    monkeypatch.setattr(recorder, "tower_rows", lambda inputs: (2, None))
    with pytest.raises(recorder.UnstackedBatch):
        prepared = [item for _, item in items]
        record_together(adapter, prepared, batch_inputs(adapter, prepared), REQUEST)
    together = pipeline.prepare_inputs(adapter, items, [method])
    for i, (ready, item) in enumerate(zip(together, _inputs(SHIPPED)[1])):
        alone = pipeline.prepare_inputs(adapter, [(sample, item)], [method])[0]
        assert ready.recorded_prefill is not None
        _assert_same_recording(ready.recording, alone.recording, f"sample {i}")
