"""A small sweep shared by the dashboard tests: the shipped model, 2 samples, 2 cheap methods, in a
sweep folder (``small/``) and in a report folder (``report/sweep/``)."""

from __future__ import annotations

import shutil

import pytest

SWEEP_SAMPLES = ("scene-00000-attribute", "scene-00000-position")


def make_sweep(results):
    from workbench.models.loading import load
    from workbench.samples import read_dataset
    from workbench.sweep import MethodSpec, run_sweep

    dataset = "data/eval/samples.jsonl"
    samples = [s for s in read_dataset(dataset, 10) if s.id in SWEEP_SAMPLES]
    run_sweep(load(), samples, dataset, [MethodSpec("random"), MethodSpec("uniform_grid")], (0.5, 4),
              results / "small", progress=False)
    # a report folder as `workbench report` leaves it: its page beside the sweep/ it ran
    shutil.copytree(results / "small", results / "report" / "sweep")
    (results / "report" / "index.html").write_text("<html></html>")
    return results


@pytest.fixture(scope="session")
def results_folder(tmp_path_factory):
    """A results folder holding one sweep in ``small/`` and the same as a report's in ``report/``."""
    return make_sweep(tmp_path_factory.mktemp("results"))
