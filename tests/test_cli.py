import subprocess
import sys

from workbench.cli import main


def test_help_lists_the_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("evaluate", "make-scenes", "train-shapes"):
        assert name in out


def test_missing_dataset_is_one_line_not_a_traceback(capsys, tmp_path):
    assert main(["evaluate", "--dataset", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "data set not found" in err and "Traceback" not in err


def test_missing_checkpoint_is_a_clear_offline_error(capsys, tmp_path):
    assert main(["evaluate", "--model", "someone/not-here-vlm", "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert "not available locally" in err and "Traceback" not in err


def test_console_script_runs_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-m", "workbench", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train-shapes" in out.stdout


def test_a_file_that_is_not_an_image_is_one_line(capsys, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    assert main(["record", "--image", str(fake), "--question", "what is here ?", "--out", str(tmp_path / "rec")]) == 2
    err = capsys.readouterr().err
    assert "cannot identify image file" in err and "Traceback" not in err
