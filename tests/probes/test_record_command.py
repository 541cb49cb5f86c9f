"""``workbench record`` writes loadable recordings and refuses oversized captures in one line."""

from __future__ import annotations

from transformers import AutoConfig

from workbench.cli import main
from workbench.commands.record import layer_list
from workbench.models.loading import SHIPPED_MODEL_DIR
from workbench.recording import Recording


def test_layer_syntax():
    assert layer_list("all") is None
    assert layer_list("0,5,-1") == (0, 5, -1)
    assert layer_list("1-3,7") == (1, 2, 3, 7)


def test_record_an_image_and_a_data_set(tmp_path, capsys):
    image = "data/eval/images/scene-00000.png"
    assert main(["record", "--image", image, "--question", "what colour is the circle ?", "--out",
                 str(tmp_path / "one"), "--signals", "attention,hidden_norm", "--layers", "0,-1",
                 "--tower-layers", "1"]) == 0
    recording = Recording.load(tmp_path / "one")
    last = AutoConfig.from_pretrained(SHIPPED_MODEL_DIR).text_config.num_hidden_layers - 1
    assert recording.layers("attention") == [0, last] and recording.identity.question == "what colour is the circle ?"
    assert main(["record", "--dataset", "data/eval/samples.jsonl", "--limit", "2", "--out", str(tmp_path / "many"),
                 "--signals", "attention", "--stacks", "llm", "--layers", "0"]) == 0
    assert len(list((tmp_path / "many").iterdir())) == 2
    assert "wrote 2 recordings" in capsys.readouterr().out


def test_oversized_capture_is_one_line(tmp_path, capsys):
    code = main(["record", "--image", "data/eval/images/scene-00000.png", "--question", "what ?", "--out",
                 str(tmp_path / "big"), "--rows", "visual", "--per-head", "--memory-limit-gib", "0.0001"])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("workbench record: error:")]
    assert len(errors) == 1 and "per-head" in errors[0] and "fewer" in errors[0] and "MiB" in errors[0]
    assert not (tmp_path / "big").exists()
