"""Each dashboard page's logic and widgets, driven with Streamlit's AppTest (in process, no browser)."""

import io
from pathlib import Path

import polars as pl
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from dashboards import state

APP = str(Path(__file__).resolve().parents[2] / "dashboards" / "app.py")


@pytest.fixture
def app(results_folder, monkeypatch):
    monkeypatch.setenv(state.RESULTS_ENV, str(results_folder))
    return AppTest.from_file(APP, default_timeout=240)


def ok(at):
    assert not at.exception, [e.value for e in at.exception]
    return at


def on_page(at, page):
    at.query_params["page"] = page
    return ok(at.run())


def png(size=(64, 48), colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def test_explore_answers_and_draws_each_signal(app):
    at = on_page(app, "explore")
    assert not at.error
    assert any("**Answer:**" in m.value for m in at.markdown)
    assert len(at.get("image")) == 1 and len(at.get("plotly_chart")) == 1
    assert "attention from [CLS] (vision tower)" in at.selectbox(key="explore_signal").options  # a [CLS] tower
    for name in ("attention from [CLS] (vision tower)", "saliency (gradient x input of the answer)",
                 "attention from the last token without RoPE, per head over the image (FEATHER's score)",
                 "attention from the last token"):
        ok(at.selectbox(key="explore_signal").select(name).run())  # fetched anew: the tree changes each run
        assert len(at.get("image")) == 1, name
    ok(at.slider(key="explore_layer_llm").set_value(2).run())
    ok(at.checkbox(key="explore_heads").check().run())
    heads = state.load_model("shapes-vlm").adapter.model.config.text_config.num_attention_heads
    assert len(at.get("image")) == 1 + heads


def test_methods_list_the_kept_count_for_the_budget(app):
    at = on_page(app, "methods")
    ok(at.multiselect(key="methods_chosen").set_value(["uniform_grid", "fastv"]).run())
    for budget in (20, 50):
        ok(at.slider(key="methods_budget").set_value(budget).run())
        table = at.dataframe[0].value
        assert table["method"].tolist() == ["uniform_grid", "fastv"]
        assert table["kept tokens"].tolist() == [budget, budget]
        assert any(f"**{budget}** kept" in m.value for m in at.markdown)
    assert len(at.get("image")) >= 3  # kept tokens of each, and fastv's score map


def test_a_bad_upload_is_an_error_not_an_exception(app):
    at = on_page(app, "explore")
    ok(at.radio(key="source").set_value("upload an image").run())
    assert at.info  # asks for an upload
    ok(at.file_uploader(key="upload").set_value(("notes.png", b"this is not an image", "image/png")).run())
    assert any("not an image" in e.value for e in at.error)
    ok(at.file_uploader(key="upload").set_value(("big.png", b"\0" * (state.MAX_UPLOAD_BYTES + 1), "image/png")).run())
    assert any("limited to 20 MB" in e.value for e in at.error)
    ok(at.file_uploader(key="upload").set_value(("fine.png", png(), "image/png")).run())  # and the app goes on
    assert not at.error and any("**Answer:**" in m.value for m in at.markdown)


def test_huge_images_are_refused_by_pixel_count(monkeypatch):
    monkeypatch.setattr(state, "MAX_UPLOAD_PIXELS", 1000)
    with pytest.raises(state.UploadError, match="megapixels"):
        state.decode_upload("wide.png", png((100, 20)))
    assert state.decode_upload("small.png", png((20, 20))).size == (20, 20)


def test_a_missing_model_is_an_error(app, tmp_path):
    at = on_page(app, "explore")
    ok(at.text_input(key="model").set_value(str(tmp_path / "no-such-checkpoint")).run())
    assert any("cannot load model" in e.value for e in at.error)
    ok(at.text_input(key="model").set_value("someone/not-here-vlm").run())
    assert any("not available locally" in e.value for e in at.error)


def test_compare_draws_curves_overlap_and_recall(app):
    at = on_page(app, "compare")
    assert not at.error
    assert at.text_input(key="compare_folder").value == "small"
    assert len(at.get("plotly_chart")) == 3  # accuracy curves, Jaccard matrix, evidence recall
    ok(at.selectbox(key="compare_budget").select("4").run())
    assert len(at.get("plotly_chart")) == 3


@pytest.mark.parametrize("path", ["..", "../elsewhere", "/etc", "small/../../x"])
def test_compare_refuses_paths_outside_the_results_folder(app, path):
    at = on_page(app, "compare")
    ok(at.text_input(key="compare_folder").set_value(path).run())
    assert any("outside the results folder" in e.value for e in at.error)
    assert not at.get("plotly_chart")


def expected_failures(results_folder, method, budget) -> int:
    """Samples the unpruned model answers right and ``method`` at ``budget`` wrong, from the raw rows."""
    rows = pl.read_parquet(results_folder / "small" / "results.parquet")
    right = set(rows.filter(method="unpruned", correct=True)["sample_id"])
    wrong = set(rows.filter(method=method, budget=budget, correct=False)["sample_id"])
    return len(right & wrong)


def test_failures_diagnose_and_restore(app, results_folder):
    at = on_page(app, "failures")
    assert not at.error
    ok(at.selectbox(key="failures_method").select("random").run())
    ok(at.selectbox(key="failures_budget").select("4").run())
    count = expected_failures(results_folder, "random", "4")
    assert count >= 1  # 4 random tokens of 144 leave too little; the rest of the test needs a failure
    assert any(f"**{count}** failure(s) of random at 4" in m.value for m in at.markdown)
    assert any("category:" in m.value for m in at.markdown)
    assert len(at.get("image")) == 1
    ok(at.button(key="failures_restore").click().run())
    assert at.success or at.warning
    assert len(at.get("image")) == 2


def test_the_command_serves_the_app_headless_with_the_results_folder():
    from workbench.commands.dashboard import RESULTS_ENV, streamlit_command

    assert RESULTS_ENV == state.RESULTS_ENV
    command = streamlit_command("/some/results", 8600)
    assert command[1:4] == ["-m", "streamlit", "run"] and command[4].endswith("dashboards/app.py")
    assert "--server.headless" in command and "8600" in command and command[-2:] == ["--results", "/some/results"]


def test_tower_signals_are_drawn_through_the_tower_map_on_tiled_models():
    import numpy as np

    from dashboards.views.explore import VIEWS, token_values
    from tests.tiny_models import QUESTION, TINY_SPECS, noise_image, tiny_adapter
    from workbench.recorder import record
    from workbench.recording import CaptureRequest
    from workbench.tower_map import tower_scores

    adapter = tiny_adapter("llava_next")  # a base view and tiles: several tower views
    prepared = adapter.prepare(noise_image(TINY_SPECS["llava_next"].image_size), QUESTION)
    rec = record(adapter, prepared, CaptureRequest(signals=("attention",), rows=("cls",), stacks=("tower",)))
    assert len(rec.layout.tower_owner) > 1
    values = token_values(rec, VIEWS["attention from [CLS] (vision tower)"], 0)
    assert values.shape == (prepared.layout.n_tokens,) and np.isfinite(values).all()
    assert np.allclose(values, tower_scores(rec, rec.layout, "attention", 0, "cls"))
