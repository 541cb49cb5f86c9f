"""Every bad input gets one clear line, before the model loads and before anything is written; and
nothing the user made is deleted, moved or written over."""

from __future__ import annotations

import functools
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from workbench.cli import build_parser, main

IMAGE = "data/eval/images/scene-00000.png"


class ModelLoaded(Exception):
    """Raised by the stand-in loader: validation should have refused before getting here."""


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test: everything here must be refused before it."""
    def refuse(*args, **kwargs):
        raise ModelLoaded("the model was loaded before the input was refused")

    monkeypatch.setattr("workbench.commands.common.load_adapter", refuse)


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"workbench {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. record never deletes or moves what the user did not create ----------------------------------

def test_record_refuses_a_folder_or_file_it_did_not_write(tmp_path, capsys, no_model):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("two years of work")
    assert main(["record", "--image", IMAGE, "--question", "what ?", "--out", str(mine)]) == 2
    assert "is not a workbench recording" in one_error_line(capsys, "record")
    assert tree(mine) == {"thesis.txt": b"two years of work"}
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    assert main(["record", "--image", IMAGE, "--question", "what ?", "--out", str(notes)]) == 2
    assert "is a file, not a folder" in one_error_line(capsys, "record")
    assert notes.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]


@functools.lru_cache(maxsize=None)
def small_recording():
    from workbench.models.loading import load
    from workbench.recorder import record
    from workbench.recording import CaptureRequest
    from workbench.samples import read_dataset

    adapter, sample = load(), read_dataset("data/eval/samples.jsonl", limit=1)[0]
    request = CaptureRequest(signals=("attention",), stacks=("llm",), layers=(0,), rows=("last",))
    return record(adapter, adapter.prepare(sample.load_image(), sample.question), request, sample_id=sample.id,
                  question=sample.question)


def test_saving_a_recording_replaces_only_a_recording(tmp_path):
    from workbench.errors import UserError
    from workbench.recording import Recording, RecordingError

    recording = small_recording()
    recording.save(tmp_path / "rec")
    recording.save(tmp_path / "rec")  # a recording is ours to replace
    assert Recording.load(tmp_path / "rec").identity == recording.identity
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "a.txt").write_text("a")
    with pytest.raises(RecordingError, match="not a workbench recording"):
        recording.save(tmp_path / "user")
    (tmp_path / "file").write_text("f")
    with pytest.raises(UserError, match="is a file"):
        recording.save(tmp_path / "file")
    assert (tmp_path / "user" / "a.txt").read_text() == "a" and (tmp_path / "file").read_text() == "f"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- 2. sample ids never escape the output folder ---------------------------------------------------

@pytest.mark.parametrize("sample_id", ["../escaped", "/tmp/absolute", "a/b", ".", "..", "", " ", "x" * 300, "é/ü"])
def test_a_sample_id_is_always_one_name_inside_the_output_folder(tmp_path, sample_id):
    from workbench.files import child_folder, safe_name

    name = safe_name(sample_id)
    assert name and name not in (".", "..") and "/" not in name and len(name) <= 100
    assert child_folder(tmp_path, sample_id).parent == tmp_path
    assert safe_name("eval-00001") == "eval-00001"  # plain ids keep their names
    assert safe_name("a/b") != safe_name("a_b")  # two ids never share a folder


def test_record_writes_hostile_ids_inside_out(tmp_path, capsys):
    shutil.copy(IMAGE, tmp_path / "img.png")
    rows = [{"id": "../escaped", "image": "img.png", "question": "what is here ?"},
            {"id": str(tmp_path / "absolute"), "image": "img.png", "question": "what is here ?"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["record", "--dataset", str(tmp_path / "d.jsonl"), "--out", str(out), "--signals", "attention",
                 "--stacks", "llm", "--layers", "0"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "img.png", "out"]
    assert len([p for p in out.iterdir() if (p / "manifest.json").is_file()]) == 2


# --- 3. make-scenes never replaces a data set; a too-small -n is one line ---------------------------

def test_make_scenes_refuses_a_folder_with_something_in_it(tmp_path, capsys):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "samples.jsonl").write_text("shipped\n")
    assert main(["make-scenes", "-n", "6", "--out", str(tmp_path / "eval")]) == 2
    assert "is not empty" in one_error_line(capsys, "make-scenes")
    assert tree(tmp_path / "eval") == {"samples.jsonl": b"shipped\n"}
    assert main(["make-scenes", "-n", "5", "--out", str(tmp_path / "new")]) == 2
    assert "at least 6" in one_error_line(capsys, "make-scenes")
    assert not (tmp_path / "new").exists()
    defaults = build_parser().parse_args(["make-scenes"])
    assert Path(defaults.out).resolve() != Path("data/eval").resolve()  # never the shipped set by default


# --- 4. writes follow the umask ---------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    from workbench.samples import write_atomically, write_atomically_bytes  # where every caller imports them

    old = os.umask(umask)
    try:
        write_atomically(tmp_path / "a.json", "{}")
        write_atomically_bytes(tmp_path / "b.bin", lambda tmp: Path(tmp).write_bytes(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == mode


# --- 5. budgets and method parameters are refused before the model loads ----------------------------

@pytest.mark.parametrize("budgets, message", [("-5", "at least 1"), ("-0.2", "must be in (0, 1]"),
                                              ("1.5", "must be in (0, 1]"), ("0", "at least 1")])
def test_bad_budgets_are_one_line_before_anything(tmp_path, capsys, no_model, budgets, message):
    with pytest.raises(SystemExit) as exit:
        main(["sweep", "--budgets", budgets, "--out", str(tmp_path / "s")])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "s").exists()


def test_a_layer_past_the_reference_decoder_is_refused_not_clamped(tmp_path, capsys, no_model):
    assert main(["sweep", "--methods", "fastv:layer=99", "--out", str(tmp_path / "s"), "--limit", "1"]) == 2
    assert "fastv: layer must be below 32" in one_error_line(capsys, "sweep")
    assert not (tmp_path / "s").exists()


def test_a_token_count_above_the_visual_tokens_is_refused_before_the_folder(tmp_path, capsys):
    assert main(["sweep", "--budgets", "1000", "--methods", "random", "--limit", "1",
                 "--out", str(tmp_path / "s")]) == 2
    assert "1000 tokens is outside 0..144" in one_error_line(capsys, "sweep")
    assert not (tmp_path / "s").exists()


# --- 9. an output that cannot be written is one line before any work --------------------------------

@pytest.mark.parametrize("command", [["evaluate", "--limit", "1"], ["sweep", "--limit", "1"],
                                     ["record", "--image", IMAGE, "--question", "what ?"],
                                     ["record", "--dataset", "data/eval/samples.jsonl", "--limit", "1"],
                                     ["make-scenes", "-n", "6"]])
def test_an_output_under_a_file_is_one_line_before_any_work(tmp_path, capsys, no_model, command):
    # Tests run as root, which ignores permission bits: a path under a regular file is unwritable for anyone.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(command + ["--out", str(blocker / "out")]) == 2
    assert "is a file, not a folder" in one_error_line(capsys, command[0])
    assert blocker.read_text() == "x"


# --- 10. the record command's options -----------------------------------------------------------------

def test_record_signals_all_is_every_registered_signal_and_stacks_both_works():
    from probes.registry import available_signals
    from workbench.commands.record import capture_request

    args = build_parser().parse_args(["record", "--out", "x", "--signals", "all", "--stacks", "both"])
    request = capture_request(args)
    assert set(request.signals) == set(available_signals()) and set(request.stacks) == {"tower", "llm"}


def test_an_empty_question_is_refused_naming_its_row(tmp_path, capsys, no_model):
    shutil.copy(IMAGE, tmp_path / "img.png")
    rows = [{"id": "1", "image": "img.png", "question": "what ?"}, {"id": "2", "image": "img.png", "question": "  "}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["evaluate", "--dataset", str(tmp_path / "d.jsonl")]) == 2
    assert f"{tmp_path / 'd.jsonl'}:2: field 'question' is empty" in one_error_line(capsys, "evaluate")


def test_every_option_with_a_default_states_it_in_its_help():
    import argparse

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    silent = []
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.required:
                continue
            if "default" not in (action.help or ""):
                silent.append(f"{name} {action.option_strings[0]}")
    assert not silent, f"options whose --help states no default: {silent}"


def test_evaluate_never_overwrites_a_file_it_did_not_write(tmp_path, capsys, no_model):
    mine = tmp_path / "results.parquet"
    mine.write_text("my own results")
    assert main(["evaluate", "--limit", "1", "--out", str(mine)]) == 2
    assert "is not an answers table written by evaluate" in one_error_line(capsys, "evaluate")
    assert mine.read_text() == "my own results"


def test_make_scenes_leaves_a_whole_data_set_or_nothing(tmp_path, monkeypatch):
    from workbench.samples import read_dataset

    assert main(["make-scenes", "-n", "6", "--out", str(tmp_path / "ok")]) == 0
    assert len(read_dataset(tmp_path / "ok")) == 6 and sorted(p.name for p in tmp_path.iterdir()) == ["ok"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("workbench.scene_dataset.write_dataset", interrupted)
    assert main(["make-scenes", "-n", "6", "--out", str(tmp_path / "cut")]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # no half-written folder, no temporary one
