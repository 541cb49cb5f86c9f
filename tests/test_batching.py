"""Batched execution: several samples, each under its own plan (kept sets, stages before and inside
the LLM, merges, position policies), padded into one batch give the answers, plans and per-layer
token counts of running them one at a time, and logits within float rounding, on every family.
Preparing several samples: the vision tower runs once per sample (its recording's forward) or once
for several (``decoder_inputs_batch``), with the decoder inputs each would get alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.pruning.conftest import ALL_MODELS, SHIPPED, eval_sample, shipped_architecture
from workbench.pruning.executor import Job, execute, execute_batch
from workbench.pruning.method import ModelFacts, SelectionContext
from workbench.pruning.plan import Append, KeepPlan, Merge, Stage, decode_scores
from workbench.pruning.registry import create_method
from workbench.pruning.run import record_needs

GOLD = "large red circle"


def _inputs(model: str):
    """Three inputs of different lengths where the family allows (image sizes, questions)."""
    if model == SHIPPED:
        adapter, sample = shipped_architecture(), eval_sample()
        image = sample.load_image()
        return adapter, [adapter.prepare(image.rotate(90 * i), q)
                         for i, q in enumerate([sample.question, "what shape is it ?", sample.question + " now"])]
    from tests.tiny_models import QUESTION, TINY_SPECS, noise_image, tiny_adapter

    adapter = tiny_adapter(model)
    w, h = TINY_SPECS[model].image_size
    sizes, questions = [(w, h), (h, w), (2 * w, h)], [QUESTION, "what shape is it ?", QUESTION + " now"]
    return adapter, [adapter.prepare(noise_image(size, seed=i), q) for i, (size, q) in enumerate(zip(sizes, questions))]


def _plans(adapter, n: int, offset: int) -> list[KeepPlan]:
    """Plans of every kind, with kept sets that differ per sample (``offset``)."""
    kept = tuple(range(offset % 3, n, 3))
    later = kept[::2]
    position = "original" if adapter.mrope else "reindex"
    merge = Merge(kept[0], (kept[0] + 1,), (0.5, 0.5)) if kept[0] + 1 < n and kept[0] + 1 not in kept else None
    return [
        KeepPlan.keep_all(n, where=None),
        KeepPlan("pre", len(kept), n, (Stage("pre_llm", kept, merges=(merge,) if merge else ()),)),
        KeepPlan("in", len(kept), n, (Stage(1, kept, position=position),)),
        KeepPlan("two", len(later), n, (Stage("pre_llm", kept, position=position), Stage(1, later))),
        KeepPlan("none", 0, n, (Stage("pre_llm", ()),)),
        # appended tokens make each sample's rows differ in order too, before the LLM and inside it
        # (inside it, two after a row that stays: the padded batch's masks must hide them from it, and
        # the second from the first)
        KeepPlan("appends", 3, n, (Stage("pre_llm", kept, appends=(Append(kept[1], (), (1.0,), after=kept[-1]),)),
                                   Stage(1, kept[:3], position=position,
                                         appends=(Append(kept[1], (kept[3],), (.5, .5), after=kept[0]),
                                                  Append(kept[2], (), (1.0,), after=kept[0]))))),
    ]


def _assert_same(single, batched, tolerance: float = 1e-4):
    for one, together in zip(single, batched):
        where = one.plan.method
        assert together.answer_ids == one.answer_ids, where
        assert together.tokens_per_layer == one.tokens_per_layer, where
        assert together.visual_tokens_per_layer == one.visual_tokens_per_layer, where
        assert [(s.where, s.kept, s.merges, s.position, s.appends) for s in together.plan.stages] == \
            [(s.where, s.kept, s.merges, s.position, s.appends) for s in one.plan.stages], where
        for mine, theirs in zip(together.plan.stages, one.plan.stages):  # scores read live states: rounding
            if theirs.scores is not None:
                np.testing.assert_allclose(mine.scores, theirs.scores, atol=tolerance, rtol=tolerance, err_msg=where)
        torch.testing.assert_close(together.logits, one.logits, atol=tolerance, rtol=tolerance, msg=lambda m: f"{where}: {m}")
        assert together.answer_logprob == pytest.approx(one.answer_logprob, abs=tolerance)
        if one.gold_logprob is None:
            assert together.gold_logprob is None
        else:
            assert together.gold_logprob == pytest.approx(one.gold_logprob, abs=tolerance)


@pytest.mark.parametrize("model", ALL_MODELS)
def test_a_batch_of_mixed_plans_equals_one_sample_at_a_time(model):
    adapter, prepared = _inputs(model)
    kinds = len(_plans(adapter, prepared[0].layout.n_tokens, 0))
    for rotation in range(kinds):
        # Each sample gets another kind of plan, so pre-LLM, in-LLM and unpruned samples share a batch.
        jobs = [Job(p, _plans(adapter, p.layout.n_tokens, i)[(rotation + i) % kinds], gold_answer=None if i == 1 else GOLD)
                for i, p in enumerate(prepared)]
        single = [execute(adapter, job.prepared, job.plan, 6, gold_answer=job.gold_answer) for job in jobs]
        _assert_same(single, execute_batch(adapter, jobs, 6))


def test_padding_rows_stay_out_of_every_sample():
    """A sample batched with much longer ones (many padding rows before it, at every layer) gets
    what it gets alone, and so does a long one beside short ones."""
    adapter, prepared = _inputs(SHIPPED)
    n = prepared[0].layout.n_tokens
    plans = [KeepPlan("few", 2, n, (Stage("pre_llm", (0, n - 1)),)),
             KeepPlan.keep_all(n, where=None),
             KeepPlan("late", 3, n, (Stage(2, (1, 2, 3)),))]
    jobs = [Job(p, plan, gold_answer=GOLD) for p, plan in zip(prepared, plans)]
    single = [execute(adapter, p, plan, 6, gold_answer=GOLD) for p, plan in zip(prepared, plans)]
    batched = execute_batch(adapter, jobs, 6)
    assert len({len(e.tokens_per_layer) for e in batched}) == 1
    assert batched[0].tokens_per_layer[0] < batched[1].tokens_per_layer[0]  # really padded
    _assert_same(single, batched)


@pytest.mark.parametrize("name", ["pyramiddrop", "sparsevlm", "fastv", "feather"])
def test_methods_that_select_inside_the_llm_choose_the_same_tokens_in_a_batch(name):
    """Callbacks see each sample's own live state (no padding rows) and choose as they would alone."""
    adapter, prepared = _inputs(SHIPPED)
    facts, method = ModelFacts.of(adapter), create_method(name)

    def job(p, budget):
        context = SelectionContext(p.layout, budget, record_needs(adapter, p, [method]), facts)
        return Job(p, method.select(context), method.layer_callback(context), GOLD)

    budgets = (0.25, 0.5, 0.1)
    single = [execute_batch(adapter, [job(p, b)], 4)[0] for p, b in zip(prepared, budgets)]
    _assert_same(single, execute_batch(adapter, [job(p, b) for p, b in zip(prepared, budgets)], 4))


def _pyramiddrop_jobs(resumed: bool, gold: str | None):
    """PyramidDrop at 0.25 on the three inputs, from their unpruned prefills when ``resumed``."""
    adapter, prepared = _inputs(SHIPPED)
    facts, method = ModelFacts.of(adapter), create_method("pyramiddrop")
    prefills = [None] * len(prepared)
    if resumed:
        unpruned = [Job(p, KeepPlan.keep_all(p.layout.n_tokens, where=None)) for p in prepared]
        prefills = [e.prefill for e in execute_batch(adapter, unpruned, 0, capture=True)]
    jobs = []
    for p, prefill in zip(prepared, prefills):
        context = SelectionContext(p.layout, 0.25, record_needs(adapter, p, [method]), facts)
        jobs.append(Job(p, method.select(context), method.layer_callback(context), gold, resume=prefill))
    return adapter, jobs


@pytest.mark.parametrize("resumed", [False, True])
def test_callbacks_in_a_batch_read_one_attention_pass_per_layer_for_all_samples(resumed):
    """Before a layer whose callbacks read its attention, the layer runs up to its attention once
    for the batch (then once more, as the layer itself), not once per sample; resumed from the
    unpruned prefills, the callbacks asked there before the first pruned layer share one pass too
    (and that layer then runs once, its stages chosen)."""
    adapter, jobs = _pyramiddrop_jobs(resumed, None)  # no gold: its pass would call the layers again
    calls = {}
    modules = [adapter.decoder_attention(i) for i in range(len(adapter.decoder_layers()))]
    handles = [m.register_forward_pre_hook(lambda m, *_, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
               for i, m in enumerate(modules)]
    try:
        execute_batch(adapter, jobs, 0)
    finally:
        for handle in handles:
            handle.remove()
    asked = [i for i in range(len(modules)) if calls.get(i, 0) > 1]
    assert asked, "no layer's attention was read by the callbacks"
    assert all(calls[i] == 2 for i in asked), calls
    assert (0 not in calls) == resumed, calls  # resumed: the layers below the first stage are not run


@pytest.mark.parametrize("resumed", [False, True])
def test_last_token_rankings_of_a_batch_are_asked_once_per_layer_and_read_one_product(resumed, monkeypatch):
    """PyramidDrop's callbacks at a layer are asked in one call for all the batch's samples, which
    reads their last rows' attention in one product of the batch's pass: each row is the sample's
    own state's attention, and each sample's tokens are those it keeps alone."""
    from workbench.pruning.layer_state import BatchAttention, row_attention
    from workbench.pruning.methods.pyramiddrop import LastTokenRanking

    adapter, jobs = _pyramiddrop_jobs(resumed, GOLD)
    asked, products = [], []
    answer, product = LastTokenRanking.answer_together, BatchAttention.row_probs

    def answer_spy(layer, pairs):
        asked.append((layer, len(pairs)))
        states = [state for _, state in pairs]
        rows = [int(state.text_rows[-1]) for state in states]
        for state, row, together in zip(states, rows, row_attention(states, rows)):
            torch.testing.assert_close(together, state.attention(torch.tensor([row]))[:, 0], atol=1e-5, rtol=1e-5)
        return answer(layer, pairs)

    def product_spy(self, samples, rows):
        products.append(len(samples))
        return product(self, samples, rows)
    monkeypatch.setattr(LastTokenRanking, "answer_together", staticmethod(answer_spy))
    monkeypatch.setattr(BatchAttention, "row_probs", product_spy)
    batched = execute_batch(adapter, jobs, 4)
    schedule = sorted(jobs[0].callback.schedule)
    assert [layer for layer, _ in asked if layer in schedule] == schedule, asked  # each scheduled layer asked once
    assert all(count == len(jobs) for _, count in asked), asked
    assert products and all(count == len(jobs) for count in products), products
    monkeypatch.undo()
    _assert_same([execute_batch(adapter, [job], 4)[0] for job in jobs], batched)


def _questions_on_images(model: str, images: int):
    """Three questions of different lengths on each of ``images`` images."""
    if model == SHIPPED:
        from workbench.samples import read_dataset

        adapter, sample = shipped_architecture(), eval_sample()
        pictures = [s.load_image() for s in read_dataset("data/eval/samples.jsonl", limit=13)[::6]]  # six questions a scene
        questions = [sample.question, "what shape is it ?", sample.question + " now"]
    else:
        from tests.tiny_models import QUESTION, TINY_SPECS, noise_image, tiny_adapter

        adapter = tiny_adapter(model)
        pictures = [noise_image(TINY_SPECS[model].image_size, seed=i) for i in range(images)]
        questions = [QUESTION, "what shape is it ?", QUESTION + " now"]
    prepared = [adapter.prepare(picture, q) for picture in pictures[:images] for q in questions]
    adapter.decoder_inputs_batch(prepared)  # one tower pass: an image's rows alike in each of its samples
    return adapter, prepared


def _prefills_beside_alone(adapter, jobs: list[Job]):
    """The jobs run alone and as one batch, checked alike: the runs alone, and the (batch, rows) of
    every prefill call of the batch's first decoder layer (its decoding steps, a row per sample, left out)."""
    single = [execute(adapter, job.prepared, job.plan, 4, gold_answer=job.gold_answer, callback=job.callback)
              for job in jobs]
    seen = []

    def hook(module, args, kwargs):
        seen.append(tuple((args[0] if args else kwargs["hidden_states"]).shape[:2]))
    handle = adapter.decoder_layers()[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        batched = execute_batch(adapter, jobs, 4)
    finally:
        handle.remove()
    _assert_same(single, batched)
    return single, [(b, rows) for b, rows in seen if rows > 1]


@pytest.mark.parametrize("kind", ["unpruned", "pre_llm", "in_llm", "callback"])
@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("model", ALL_MODELS)
def test_questions_on_one_image_prefill_the_rows_they_begin_with_once(model, images, kind):
    """Samples on one image (the blank-image controls; a benchmark's questions per image) with no
    stage inside the LLM: the rows they begin with alike (the prompt up to the image's last kept
    token) are prefilled once per image for the batch, each sample getting what it gets alone. A
    stage or a callback inside the LLM cuts or reads every sample's rows: there each sample runs
    all of them."""
    adapter, prepared = _questions_on_images(model, images)
    n = prepared[0].layout.n_tokens
    kept = tuple(range(0, n, 3))
    callback = None
    if kind == "unpruned":
        plan = KeepPlan.keep_all(n, where=None)
    elif kind == "pre_llm":
        plan = KeepPlan("pre", len(kept), n, (Stage("pre_llm", kept),))
    elif kind == "in_llm":
        plan = KeepPlan("in", len(kept), n, (Stage(1, kept, position="original"),))
    else:
        method = create_method("pyramiddrop")
        context = SelectionContext(prepared[0].layout, 0.25, None, ModelFacts.of(adapter))
        plan, callback = method.select(context), method.layer_callback(context)
    jobs = [Job(p, plan, callback, GOLD) for p in prepared]
    single, prefill = _prefills_beside_alone(adapter, jobs)
    lengths = [one.tokens_per_layer[0] for one in single]
    if kind in ("unpruned", "pre_llm"):
        assert prefill[0][0] == images and prefill[1][0] == len(jobs), prefill  # each image's rows, then the batch
        assert sum(b * rows for b, rows in prefill) < len(jobs) * min(lengths), (prefill, lengths)
    else:
        assert prefill == [(len(jobs), max(lengths))], prefill


def test_groups_sharing_rows_of_different_lengths_are_prefilled_side_by_side():
    """Two questions that begin alike on one image share their rows up to where the questions
    part; two others on another image only up to the image's end: the two groups' rows go through
    one prefill call, the shorter left-padded, and each sample gets what it gets alone."""
    from workbench.samples import read_dataset

    adapter, question = shipped_architecture(), eval_sample().question
    first, second = (s.load_image() for s in read_dataset("data/eval/samples.jsonl", limit=7)[::6])
    prepared = [adapter.prepare(first, question), adapter.prepare(first, question + " now"),
                adapter.prepare(second, "what shape is it ?"), adapter.prepare(second, question)]
    adapter.decoder_inputs_batch(prepared)
    plan = KeepPlan.keep_all(prepared[0].layout.n_tokens, where=None)
    single, (groups, rest) = _prefills_beside_alone(adapter, [Job(p, plan, gold_answer=GOLD) for p in prepared])
    image_end = int(prepared[0].layout.positions.max()) + 1
    assert groups[0] == 2 and groups[1] > image_end, groups  # the first group's rows reach into its questions
    assert rest[0] == len(prepared) and rest[1] < max(e.tokens_per_layer[0] for e in single) - image_end, rest


def test_runs_given_their_unpruned_prefill_share_rows_only_where_they_prune_before_the_llm():
    """The sweep's runs come with each sample's unpruned prefill: a plan pruning before the LLM
    cannot start from it, so its samples on one image still share their rows; an unpruned run
    takes every layer but the last from it instead, and shares nothing."""
    adapter, prepared = _questions_on_images(SHIPPED, 2)
    n = prepared[0].layout.n_tokens
    unpruned = KeepPlan.keep_all(n, where=None)
    prefills = [e.prefill for e in execute_batch(adapter, [Job(p, unpruned) for p in prepared], 0, capture=True)]
    kept = tuple(range(0, n, 3))
    for plan, shared in ((KeepPlan("pre", len(kept), n, (Stage("pre_llm", kept),)), True), (unpruned, False)):
        jobs = [Job(p, plan, gold_answer=GOLD, resume=prefill) for p, prefill in zip(prepared, prefills)]
        single, prefill = _prefills_beside_alone(adapter, jobs)
        if shared:  # each image's rows, through its kept tokens, once; then every sample's rest
            image_start = int(prepared[0].layout.positions.min())
            assert prefill[0][0] == 2 and prefill[0][1] >= image_start + len(kept), prefill
            # the same questions on both images: every sample's rest is its rows past those shared
            assert prefill[1] == (len(jobs), max(e.tokens_per_layer[0] for e in single) - prefill[0][1]), prefill
        else:  # every layer but the last taken from the prefill: the first is not run at all
            assert prefill == [], prefill


def test_samples_on_different_images_share_no_prefill():
    """The rows before the image are alike in every sample, but a prefill of them alone would not
    pay: on different images each sample runs all its rows, and gets what it gets alone."""
    from workbench.samples import read_dataset

    adapter = shipped_architecture()
    samples = read_dataset("data/eval/samples.jsonl", limit=13)[::6]  # six questions per scene
    assert len({s.image_path for s in samples}) == len(samples)
    prepared = [adapter.prepare(s.load_image(), samples[0].question) for s in samples]
    assert len({p.image_size for p in prepared}) == 1  # the same size: only the pixels differ
    plan = KeepPlan.keep_all(prepared[0].layout.n_tokens, where=None)
    single, prefill = _prefills_beside_alone(adapter, [Job(p, plan, gold_answer=GOLD) for p in prepared])
    assert prefill == [(len(prepared), max(e.tokens_per_layer[0] for e in single))]


def test_evaluate_answers_the_same_in_batches_as_one_at_a_time():
    import dataclasses

    from workbench.evaluate import answer_dataset
    from workbench.models.loading import load
    from workbench.samples import read_dataset

    # Questions of different lengths, so the batch is padded.
    samples = [dataclasses.replace(s, question=s.question + " ?" * (2 * i))
               for i, s in enumerate(read_dataset("data/eval/samples.jsonl", limit=4))]
    adapter = load()
    one, together = (answer_dataset(adapter, samples, size, progress=False) for size in (1, 4))
    assert one["predicted_answer"].to_list() == together["predicted_answer"].to_list()
    assert (one["logprob"] - together["logprob"]).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["transprune", "dart", "vscan", "gprune", "topv", "todre", "aim", "sparsevlm",
                                  "flowcut", "visiondrop", "vflowopt", "visionzip+pyramiddrop"])
def test_a_pipeline_batch_gives_every_method_the_rows_of_one_sample_at_a_time(name):
    """The sweep's path: after the unpruned batch, each method's batch equals its samples run alone
    (including a method that hooks the layers' modules, which must not read another sample's rows)."""
    from workbench import pipeline
    from workbench.samples import read_dataset
    from tests.pruning.conftest import adapter_and_input

    adapter, _, _ = adapter_and_input(SHIPPED)
    samples = read_dataset("data/eval/samples.jsonl", limit=3)
    method = create_method(name)
    batch = [pipeline.prepare_sample(adapter, s, [method]) for s in samples]
    alone = [pipeline.prepare_sample(adapter, s, [method]) for s in samples]
    pipeline.run_batch(adapter, batch, None)
    batched = pipeline.run_batch(adapter, batch, method, 0.25)
    single = [pipeline.run(adapter, ready, method, 0.25) for ready in alone]
    for one, other in zip(batched, single):
        assert one.status == other.status == "ok"
        mine, theirs = json.loads(one.row()["stages"]), json.loads(other.row()["stages"])
        assert [(s["where"], s["kept"], s["merges"], s.get("appends")) for s in mine] == \
            [(s["where"], s["kept"], s["merges"], s.get("appends")) for s in theirs]
        for a, b in zip(mine, theirs):  # the scores to float rounding (batched kernels)
            assert (a["scores"] is None) == (b["scores"] is None)
            if a["scores"] is not None:
                np.testing.assert_allclose(np.array(decode_scores(a["scores"])), np.array(decode_scores(b["scores"])),
                                           rtol=1e-4, atol=1e-6)
        assert one.generation == other.generation


# --- preparing several samples ---------------------------------------------------------------------

def _decoder_calls(adapter):
    """A list that grows by one at every call of the decoder stack (a forward reaching the LLM)."""
    calls = []
    handle = adapter.language_model().register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("model", ALL_MODELS)
def test_decoder_inputs_of_several_samples_come_from_one_tower_pass_and_equal_each_alone(model):
    adapter, prepared = _inputs(model)
    # Two more of one image size with other questions: their processor tensors stack.
    if model == SHIPPED:
        image = eval_sample().load_image()
    else:
        from tests.tiny_models import TINY_SPECS, noise_image

        image = noise_image(TINY_SPECS[model].image_size, seed=7)
    prepared = prepared + [adapter.prepare(image, q) for q in ("what shape ?", "is there a red large circle here ?")]
    calls, handle = _decoder_calls(adapter)
    try:
        together = adapter.decoder_inputs_batch(prepared)
    finally:
        handle.remove()
    assert len(calls) < len(prepared)  # at least the same-size images went through one pass
    for item, mine in zip(prepared, together):
        alone = adapter.llm_inputs(item.inputs)
        torch.testing.assert_close(mine.inputs_embeds, alone.inputs_embeds, atol=1e-6, rtol=1e-6)
        assert torch.equal(mine.attention_mask, alone.attention_mask)
        assert torch.equal(mine.position_ids, alone.position_ids)
        assert sorted(mine.extra) == sorted(alone.extra)
        assert adapter.decoder_inputs(item) is mine  # kept for every run on the sample


@pytest.mark.parametrize("model", ALL_MODELS)
def test_the_recorded_forward_gives_the_sample_its_decoder_inputs(model):
    """The recording runs the vision tower once; the sample's runs take their decoder inputs from
    that forward (exactly the tower pass they would make) instead of running it again."""
    from tests.pruning.conftest import sample_for
    from workbench import pipeline

    adapter, image, _, _ = sample_for(model)
    ready = pipeline.prepare_sample(adapter, eval_sample(), [create_method("fastv")], image=image)
    assert ready.recording is not None
    calls, handle = _decoder_calls(adapter)
    try:
        kept = adapter.decoder_inputs(ready.prepared)
    finally:
        handle.remove()
    assert not calls
    alone = adapter.llm_inputs(ready.prepared.inputs)
    for mine, theirs in ((kept.inputs_embeds, alone.inputs_embeds), (kept.attention_mask, alone.attention_mask),
                         (kept.position_ids, alone.position_ids)):
        assert torch.equal(mine, theirs)
    assert sorted(kept.extra) == sorted(alone.extra)


def test_a_sweep_batch_records_its_samples_in_one_forward_and_its_blank_images_in_one_tower_pass(monkeypatch, tmp_path):
    """In ``run_tasks``: the samples (one tower view each) share one recording forward, which
    makes their decoder inputs and is their unpruned prefill, run to the last decoder layer; their
    blank-image controls get no recording and one tower pass on all of them."""
    from workbench import pipeline
    from workbench.models.loading import load
    from workbench.samples import read_dataset, sample_to_row
    from workbench.sweep import MethodSpec, SweepTask, run_tasks

    adapter = load()
    samples = read_dataset("data/eval/samples.jsonl", limit=3)
    tasks = [SweepTask(sample_to_row(s, tmp_path), str(tmp_path), (MethodSpec("fastv"),), (0.25,)) for s in samples]
    towers, last_layer, recorded, real = [], [], [], pipeline.record_together

    def counted(adapter, prepared, *args, **kwargs):
        before = len(last_layer)
        out = real(adapter, prepared, *args, **kwargs)
        recorded.append((len(prepared), len(last_layer) - before))
        return out

    monkeypatch.setattr(pipeline, "record_together", counted)
    handles = [adapter.vision_tower().register_forward_pre_hook(lambda *_: towers.append(1)),
               adapter.decoder_layers()[-1].register_forward_pre_hook(lambda *_: last_layer.append(1))]
    try:
        rows = run_tasks(adapter, tasks)
    finally:
        for handle in handles:
            handle.remove()
    assert all(row["status"] == "ok" for sample_rows in rows for row in sample_rows)
    assert len(towers) == 2
    # One recording of the three samples, run to the last decoder layer (FastV reads an early one):
    # their unpruned runs take their prefills from it.
    assert recorded == [(len(samples), 1)]
