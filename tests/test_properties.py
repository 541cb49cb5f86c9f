"""Property-based checks (hypothesis): whatever the input, the outcome is a result or one known,
clear error; never a traceback of another type, never a half-written folder.

Kept fast: few examples each, no deadline (two shared cores), and the model is loaded once per
module (a cached function, outside the examples)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from workbench.errors import UserError
from workbench.files import child_folder, safe_name
from workbench.pruning.budget import check_budget, resolve_budget
from workbench.pruning.plan import KeepPlan, PlanError
from workbench.pruning.registry import available_methods, method_class
from workbench.samples import DatasetError, read_dataset

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IMAGE = "data/eval/images/scene-00000.png"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10)


# --- data-set rows --------------------------------------------------------------------------------------

row_values = {
    "id": st.one_of(st.text(max_size=12), st.integers(), json_values),
    "image": st.one_of(st.just("img.png"), st.just("missing.png"), st.just("../img.png"), json_values),
    "question": st.one_of(st.text(max_size=12), json_values),
    "answer": st.one_of(st.text(max_size=6), st.integers(), json_values),
    "question_type": st.one_of(st.text(max_size=6), json_values),
    "evidence_boxes": st.one_of(st.lists(st.lists(st.floats() | st.integers(-5, 200), max_size=5), max_size=3),
                                json_values),
    "mask": st.one_of(st.fixed_dictionaries({"path": st.just("img.png"), "values": st.lists(st.integers(0, 9))}),
                      json_values),
}
rows = st.fixed_dictionaries({}, optional=row_values) | json_values
lines = st.lists(st.one_of(rows.map(lambda r: json.dumps(r)), st.text(max_size=20)), max_size=5)


@FAST
@given(lines=lines)
def test_any_data_set_file_reads_or_is_one_data_set_error(lines):
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(IMAGE, Path(folder) / "img.png")
        path = Path(folder) / "d.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        try:
            samples = read_dataset(path)
        except DatasetError as e:
            assert str(e) and "\n" not in str(e).strip()
            return
        for sample in samples:
            assert sample.question.strip() and sample.image_path.is_file()
            assert sample.answer is None or isinstance(sample.answer, str)
            assert child_folder(Path(folder) / "out", sample.id).parent == Path(folder) / "out"


@FAST
@given(sample_id=st.text())
def test_every_sample_id_names_one_folder_inside_out(sample_id):
    name = safe_name(sample_id)
    assert name not in ("", ".", "..") and "/" not in name and "\0" not in name and len(name) <= 100


# --- method parameter strings ----------------------------------------------------------------------------

def _fields(name: str) -> list[str]:
    try:
        return [f.name for f in dataclasses.fields(method_class(name))]
    except Exception:
        return []


@st.composite
def method_texts(draw):
    if draw(st.booleans()):
        return draw(st.text(max_size=30))
    name = draw(st.sampled_from(available_methods()) | st.text(max_size=6))
    keys = _fields(name) + ["bogus"]
    values = st.one_of(st.integers(-5, 100).map(str), st.floats().map(repr), st.text(max_size=5),
                       st.sampled_from(["true", "null", "[1,2]", "[]", "1e400", "\"x\"", "[8,16,24]", "-0.0"]))
    params = draw(st.lists(st.tuples(st.sampled_from(keys), values), max_size=3))
    return name + (":" + ",".join(f"{k}={v}" for k, v in params) if params else "")


@FAST
@given(text=method_texts())
def test_any_method_text_is_a_method_or_one_clear_error(text):
    from workbench.commands.sweep import method_specs
    from workbench.sweep_identity import method_version

    try:
        specs = method_specs(text)
        methods = [spec.create() for spec in specs]
    except UserError as e:
        assert str(e)
        return
    for method in methods:
        json.dumps(method_version(method))  # what sweep.json stores of it


# --- budgets ----------------------------------------------------------------------------------------------

@FAST
@given(text=st.text(max_size=12) | st.lists(st.integers(-2000, 2000).map(str) | st.floats().map(repr),
                                            max_size=3).map(",".join))
def test_any_budget_text_is_budgets_or_one_argument_error(text):
    from workbench.commands.sweep import budget_list

    try:
        budgets = budget_list(text)
    except argparse.ArgumentTypeError as e:
        assert str(e)
        return
    for budget in budgets:
        assert check_budget(budget) == budget


@FAST
@given(budget=st.integers(-10, 400) | st.floats(), n=st.integers(0, 300))
def test_a_checked_budget_resolves_to_a_count_or_one_value_error(budget, n):
    try:
        check_budget(budget)
        count = resolve_budget(budget, n)
    except ValueError as e:
        assert str(e)
        return
    assert 0 <= count <= n and (isinstance(budget, float) or count == budget)


# --- keep plans --------------------------------------------------------------------------------------------

@st.composite
def valid_plans(draw):
    n = draw(st.integers(0, 40))
    alive = list(range(n))
    stages, where = [], draw(st.sampled_from(["pre_llm", 0]))
    for _ in range(draw(st.integers(0, 3))):
        alive = sorted(draw(st.sets(st.sampled_from(alive), max_size=len(alive)))) if alive else []
        scores = draw(st.none() | st.lists(st.floats(allow_nan=True), min_size=n, max_size=n))
        stages.append({"where": where, "kept": alive, "scores": scores, "position": "original"})
        where = 1 if where == "pre_llm" else where + draw(st.integers(1, 4))
    return {"method": "m", "budget": draw(st.integers(0, n)), "n_visual": n, "stages": stages}


@FAST
@given(plan=valid_plans())
def test_a_valid_plan_round_trips(plan):
    parsed = KeepPlan.from_dict(plan)
    again = KeepPlan.from_dict(json.loads(json.dumps(parsed.to_dict())))
    assert again.final_kept == parsed.final_kept and again.budget == parsed.budget
    assert all(math.isnan(a) and math.isnan(b) or a == b
               for s, t in zip(parsed.stages, again.stages) for a, b in zip(s.scores or (), t.scores or ()))


@FAST
@given(plan=valid_plans().flatmap(lambda p: st.just(p) | st.builds(lambda key, value: p | {key: value},
                                                                    st.sampled_from(list(p)), json_values))
       | json_values)
def test_any_plan_data_is_a_plan_or_one_plan_error(plan):
    try:
        KeepPlan.from_dict(plan)
    except PlanError as e:
        assert str(e)


# --- damaged folders ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _adapter():
    from workbench.models.loading import load

    return load()


@functools.lru_cache(maxsize=None)
def _good_recording() -> Path:
    from workbench.recorder import record
    from workbench.recording import CaptureRequest

    adapter, sample = _adapter(), read_dataset("data/eval/samples.jsonl", limit=1)[0]
    request = CaptureRequest(signals=("attention", "massive_activations"), stacks=("llm",), layers=(0,),
                             rows=("last",), sink_ratio=2.0, sink_floor=0.5)
    recording = record(adapter, adapter.prepare(sample.load_image(), sample.question), request,
                       sample_id=sample.id, question=sample.question)
    return recording.save(Path(tempfile.mkdtemp()) / "rec")


@functools.lru_cache(maxsize=None)
def _good_sweep() -> Path:
    from workbench.sweep import MethodSpec, run_sweep

    folder = Path(tempfile.mkdtemp()) / "sweep"
    run_sweep(_adapter(), read_dataset("data/eval/samples.jsonl", limit=1), "data/eval/samples.jsonl",
              [MethodSpec("random")], (0.5,), folder, progress=False)
    return folder


def _damage(folder: Path, choices) -> None:
    """Delete or truncate files of ``folder`` as ``choices`` say: (index, delete?, fraction kept)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for index, delete, keep in choices:
        path = files[index % len(files)]
        if not path.exists():
            continue
        if delete:
            path.unlink()
        else:
            data = path.read_bytes()
            path.write_bytes(data[: int(len(data) * keep)])


damage = st.lists(st.tuples(st.integers(0, 50), st.booleans(), st.floats(0, 0.999)), min_size=1, max_size=3)


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@SLOW
@given(choices=damage)
def test_a_damaged_recording_loads_or_is_one_recording_error(choices):
    from workbench.recording import Recording, RecordingError

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "rec"
        shutil.copytree(_good_recording(), folder)
        _damage(folder, choices)
        before = _snapshot(folder)
        with pytest.raises(RecordingError):
            Recording.load(folder)
        assert _snapshot(folder) == before  # reading never repairs


@SLOW
@given(choices=damage)
@example(choices=[(2, False, 0.5)])  # the journal cut after the zero-token control: the blank one must run
def test_a_damaged_sweep_resumes_or_is_refused_without_half_writing(choices):
    from workbench.sweep import CONTROLS, MethodSpec, read_sweep, run_sweep

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sweep"
        shutil.copytree(_good_sweep(), folder)
        _damage(folder, choices)
        before = _snapshot(folder)
        try:
            read_sweep(folder)
        except UserError:
            pass
        assert _snapshot(folder) == before  # readers never write
        try:
            result = run_sweep(_adapter(), read_dataset("data/eval/samples.jsonl", limit=1),
                               "data/eval/samples.jsonl", [MethodSpec("random")], (0.5,), folder, progress=False)
        except UserError:
            after = _snapshot(folder)
            assert {k: v for k, v in after.items() if k != ".lock"} == \
                   {k: v for k, v in before.items() if k != ".lock"}  # refused: nothing changed
            return
        assert result.table.height == read_sweep(folder).height == 2 + len(CONTROLS)
        assert json.loads((folder / "sweep.json").read_text())["format"] == "workbench-sweep"
