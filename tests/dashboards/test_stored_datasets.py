"""The dashboard's Explore page on a stored benchmark (parquet shards, images as bytes): the sample
list, the benchmark's prompt and the image decoded from its row."""

import pytest
from streamlit.testing.v1 import AppTest

from dashboards import state
from tests import benchmark_files as B
from tests.dashboards.test_pages import APP, ok, on_page


@pytest.fixture
def explore(results_folder, monkeypatch):
    monkeypatch.setenv(state.RESULTS_ENV, str(results_folder))
    return on_page(AppTest.from_file(APP, default_timeout=240), "explore")


def test_explore_reads_a_stored_benchmark(explore, tmp_path):
    pope = B.build("pope", tmp_path)
    at = ok(explore.text_input(key="dataset").input(str(pope)).run())
    assert not at.error, [e.value for e in at.error]
    assert list(at.selectbox(key="sample").options) == ["100", "101", "102", "103", "104"]
    assert any("Is there a cat in the image?" in m.value and "single word or phrase" in m.value for m in at.markdown)
    assert len(at.get("image")) == 2
