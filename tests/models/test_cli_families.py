"""Every family loads from a checkpoint folder through the command line, as a user runs it:
``workbench record --model DIR`` and ``workbench sweep --model DIR`` on a saved tiny model of each,
in a fresh interpreter with the README's environment (offline, no torchvision)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from transformers.utils import is_torchvision_available

from tests.tiny_models import QUESTION, TINY_FAMILIES, TINY_SPECS, noise_image, save_tiny, tiny_adapter
from workbench.recording import Recording
from workbench.samples import Sample, write_dataset
from workbench.sweep import CONTROLS, UNPRUNED, read_sweep, recorded_weights

REPO = Path(__file__).resolve().parents[2]
SAMPLE_IDS = ("s0", "s1")
# One method that prunes before the decoder and one that prunes inside it (2-layer tiny decoders).
METHODS, BUDGET = {"random": "random", "fastv:layer=1": "fastv(layer=1)"}, "0.5"  # argument -> table name
# Their processors carry a video processor, which transformers builds only with torchvision.
VIDEO_FAMILIES = {"llava_onevision", "qwen2_vl", "qwen2_5_vl", "smolvlm"}
# Both commands run in one fresh interpreter through the console script's own function
# (`workbench = workbench.cli:main`), so each family pays the torch + transformers import once,
# not twice; it stops at the first command that fails, with that command's exit code.
RUN_COMMANDS = """
import json, sys
from workbench.cli import main
for argv in json.loads(sys.argv[1]):
    code = main(argv)
    if code:
        sys.exit(code)
"""


def write_samples(folder: Path, image_size: tuple[int, int]) -> Path:
    """A two-sample JSONL data set of noise images of ``image_size`` (the family's non-square test
    size, so its cropping / tiling path runs)."""
    folder.mkdir()
    samples = []
    for seed, sample_id in enumerate(SAMPLE_IDS):
        image = folder / f"{sample_id}.png"
        noise_image(image_size, seed).save(image)
        samples.append(Sample(sample_id, image, QUESTION, answer="red"))
    return write_dataset(samples, folder / "samples.jsonl")


def run_workbench(*commands: list[str]) -> subprocess.CompletedProcess:
    # Deprecations are errors, as in pytest's own process (pyproject), so the loading path that only
    # a fresh interpreter takes is held to the same rule. One torch thread: the machine is shared.
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-W", "error::FutureWarning",
                           "-c", RUN_COMMANDS, json.dumps(commands)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_record_and_sweep_a_saved_checkpoint(family, tmp_path):
    checkpoint = save_tiny(family, tmp_path / "checkpoint")
    dataset = write_samples(tmp_path / "data", TINY_SPECS[family].image_size)
    common = ["--model", checkpoint, "--dataset", str(dataset)]
    done = run_workbench(
        ["record", *common, "--out", str(tmp_path / "recordings"), "--signals", "attention", "--layers", "0"],
        ["sweep", *common, "--limit", "2", "--methods", ";".join(METHODS), "--budgets", BUDGET,
         "--out", str(tmp_path / "sweep")],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    check_note(family, checkpoint, done.stderr)
    # The same image and question through the processor the folder was saved from.
    tiny = tiny_adapter(family)
    expected = tiny.prepare(noise_image(TINY_SPECS[family].image_size, 0), QUESTION)
    check_recordings(tmp_path / "recordings", checkpoint, tiny.fingerprint, expected)
    check_sweep(tmp_path / "sweep", tiny.fingerprint, n_visual=len(expected.layout.positions))


def check_note(family: str, checkpoint: str, stderr: str) -> None:
    """One line per load (one per command) says the video processor was left out, and only then."""
    note = f"note: {checkpoint}: video processor not built (needs torchvision); images only"
    expect_note = family in VIDEO_FAMILIES and not is_torchvision_available()
    assert [line for line in stderr.splitlines() if "video processor" in line] == [note] * 2 * expect_note


def check_recordings(folder: Path, checkpoint: str, weights: str, expected) -> None:
    """One recording per sample, of the folder's weights, read by a processor that makes the prompt
    and places the visual tokens as the saved one did."""
    assert sorted(p.name for p in folder.iterdir()) == list(SAMPLE_IDS)
    recording = Recording.load(folder / SAMPLE_IDS[0])
    assert recording.identity.model == checkpoint and recording.identity.weights == weights
    assert recording.identity.prompt == expected.prompt
    assert recording.layout.sequence_length == expected.layout.sequence_length
    assert np.array_equal(recording.layout.positions, expected.layout.positions)


def check_sweep(folder: Path, weights: str, n_visual: int) -> None:
    """Every sample x (unpruned + each method) answered, each method keeping its budget."""
    rows = read_sweep(folder)
    assert recorded_weights(folder) == weights
    assert rows.height == len(SAMPLE_IDS) * (1 + len(CONTROLS) + len(METHODS)) and set(rows["sample_id"]) == set(SAMPLE_IDS)
    assert set(rows["method"]) == {UNPRUNED, *CONTROLS, *METHODS.values()}
    rows = rows.filter(~pl.col("method").is_in(CONTROLS))
    assert (rows["status"] == "ok").all(), rows["message"].to_list()
    assert (rows["n_visual"] == n_visual).all()
    pruned = rows.filter(pl.col("method") != UNPRUNED)
    assert (pruned["kept_count"] == pruned["budget_tokens"]).all()
    assert pruned["budget_tokens"].is_between(1, n_visual - 1).all()
