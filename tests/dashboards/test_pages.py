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


def chart(at, key: str) -> dict:
    """The plotly figure of the chart with widget key ``key``, as a dict."""
    import json

    found = [c for c in at.get("plotly_chart") if c.proto.id.endswith(f"-{key}") or key in c.proto.id]
    assert found, f"no chart {key!r}"
    return json.loads(found[0].proto.spec)


def image_captions(at) -> list[str]:
    return [str(getattr(i, "proto", i)) for i in at.get("image")]


def test_explore_answers_and_draws_each_signal(app):
    at = on_page(app, "explore")
    assert not at.error
    assert any("**Answer:**" in m.value for m in at.markdown)
    assert len(at.get("image")) == 2  # the original beside the map
    assert "attention from [CLS] (vision tower)" in at.selectbox(key="explore_signal").options  # a [CLS] tower
    for name in ("attention from [CLS] (vision tower)", "saliency (gradient x input of the answer)",
                 "attention from the last token without RoPE, per head over the image (FEATHER's score)",
                 "sink tokens (VAR sink score)", "attention from the last token"):
        ok(at.selectbox(key="explore_signal").select(name).run())  # fetched anew: the tree changes each run
        assert len(at.get("image")) == 2, name
        captions = " ".join(image_captions(at))
        if name.startswith("saliency"):
            assert "signed: blue < 0 < red" in captions  # signed values on a diverging map
        if name.startswith("sink"):
            assert "no signal" in captions  # the all-zero sink score of the shipped model is said to be empty
        else:
            assert "no signal" not in captions, name


def test_the_per_layer_plot_follows_the_signal_the_layer_and_the_patch(app):
    at = on_page(app, "explore")
    first = chart(at, "explore_by_layer")
    assert "attention per llm layer" in first["layout"]["title"]["text"]
    assert first["layout"]["xaxis"]["dtick"] == 1  # whole layers only
    assert first["layout"]["shapes"][0]["x0"] == 1  # the chosen layer is marked
    ok(at.slider(key="explore_layer_llm").set_value(3).run())
    assert chart(at, "explore_by_layer")["layout"]["shapes"][0]["x0"] == 3
    ok(at.number_input(key="explore_patch").set_value(17).run())
    names = [t["name"] for t in chart(at, "explore_by_layer")["data"]]
    assert "patch 17" in names and "mean over the evidence" in names
    assert "patch 17" in chart(at, "explore_to_patch")["layout"]["title"]["text"]
    ok(at.selectbox(key="explore_signal").select("token transitions (1 - cosine across the layer)").run())
    assert "transition_direction per llm layer" in chart(at, "explore_by_layer")["layout"]["title"]["text"]


def test_a_patchs_attention_to_and_from_the_text_per_layer(app):
    at = on_page(app, "explore")
    ok(at.number_input(key="explore_patch").set_value(40).run())
    to_patch = chart(at, "explore_to_patch")["data"][0]
    layers = state.load_model("shapes-vlm").adapter.model.config.text_config.num_hidden_layers
    assert len(to_patch["y"]) == layers and len(to_patch["x"]) == len(to_patch["z"][0])
    assert any("what" in str(x) for x in to_patch["x"])  # text tokens by name
    from_patch = chart(at, "explore_from_patch")["data"]
    assert [t["name"] for t in from_patch] == ["visual", "text", "system", "sink"]
    # each layer's masses are one softmax row split four ways (sinks may overlap the others)
    assert all(0.99 <= sum(t["y"][k] for t in from_patch[:3]) <= 1.01 for k in range(layers))


def test_every_layer_and_head_for_a_chosen_query_row(app):
    at = on_page(app, "explore")
    ok(at.selectbox(key="explore_signal").select("attention from the text tokens").run())
    ok(at.checkbox(key="explore_heads").check().run())
    assert len(at.get("image")) == 3  # original, map, and the layer x head grid in one image
    rows = at.selectbox(key="explore_head_row")
    assert rows.options[0] == "mean of the rows" and len(rows.options) > 2
    ok(rows.select_index(1).run())
    assert any("query row: 0:" in c for c in image_captions(at))
    ok(at.checkbox(key="explore_heads_shared").uncheck().run())
    assert any("each map at its own scale" in c for c in image_captions(at))


def test_the_logit_lens_follows_the_answer_token(app):
    at = on_page(app, "explore")
    rank = chart(at, "explore_lens_rank")["data"][0]["y"]
    probability = chart(at, "explore_lens_prob")["data"][0]["y"]
    layers = state.load_model("shapes-vlm").adapter.model.config.text_config.num_hidden_layers
    assert len(rank) == len(probability) == layers
    assert rank[-1] == 0 and probability[-1] > 0.5  # the last layer is the model's own (correct) answer
    assert chart(at, "explore_lens_rank")["layout"]["xaxis"]["dtick"] == 1


def test_methods_list_the_kept_count_and_cost_for_the_budget(app):
    at = on_page(app, "methods")
    ok(at.multiselect(key="methods_chosen").set_value(["uniform_grid", "fastv"]).run())
    for budget in (20, 50):
        ok(at.slider(key="methods_budget").set_value(budget).run())
        table = at.dataframe[0].value
        assert table["method"].tolist() == ["fastv", "uniform_grid"]  # grouped: LLM attention before the layout
        assert table["kept tokens"].tolist() == [budget, budget]
        assert table["scored by"].tolist() == ["LLM attention from text", "layout only (baselines)"]
        # FastV runs layer 0 on every token: more effective tokens and FLOPs than a pre-LLM cut
        assert table["effective tokens"][0] > table["effective tokens"][1] == budget
        assert 0 < table["FLOPs (x unpruned)"][1] < table["FLOPs (x unpruned)"][0] < 1
        assert any(f"**{budget}** kept" in m.value for m in at.markdown)
    assert len(at.get("image")) >= 3  # kept tokens of each, and fastv's score map
    tokens = chart(at, "methods_tokens_per_layer")
    assert [t["name"] for t in tokens["data"]] == ["fastv", "uniform_grid"]
    assert tokens["data"][1]["y"] == [50] * len(tokens["data"][1]["y"])


def test_methods_scale_to_every_method(app):
    from workbench.pruning.registry import available_methods

    at = on_page(app, "methods")
    ok(at.checkbox(key="methods_every").check().run())
    table = at.dataframe[0].value
    assert len(table) == len(available_methods()) > 19
    groups = table["scored by"].tolist()
    assert groups == sorted(groups, key=groups.index)  # each group in one run of rows
    ok(at.checkbox(key="methods_shared_scale").check().run())
    assert len(at.get("image")) > 2 * 19


def test_a_bad_upload_is_an_error_not_an_exception(app):
    at = on_page(app, "explore")
    ok(at.radio(key="source").set_value("upload an image").run())
    assert at.info  # asks for an upload
    ok(at.file_uploader(key="upload").set_value(("notes.png", b"this is not an image", "image/png")).run())
    assert any("not an image" in e.value for e in at.error)
    assert at.file_uploader(key="upload").proto.max_upload_size_mb == state.MAX_UPLOAD_BYTES // 2**20 == 20
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
    # only what the dashboard has is suggested: its model box, no command-line flag
    assert all("--" not in e.value and "model box" in e.value for e in at.error if "cannot load" in e.value)


def test_compare_reads_a_report_folder_and_draws_cost_curves_overlap_and_recall(app):
    at = on_page(app, "compare")
    assert not at.error
    assert at.text_input(key="compare_folder").value == "report"  # the report folder itself, not report/sweep
    assert len(at.get("plotly_chart")) == 4  # accuracy vs cost, accuracy curves, Jaccard matrix, evidence recall
    cost = chart(at, "compare_cost_chart")
    assert "prefill FLOPs" in cost["layout"]["title"]["text"]
    assert cost["data"][-1]["name"] == "Pareto front" and cost["data"][-1]["x"]
    ok(at.selectbox(key="compare_cost").select("effective visual tokens (mean per decoder layer)").run())
    cost = chart(at, "compare_cost_chart")
    assert cost["layout"]["xaxis"]["title"]["text"].startswith("visual tokens per decoder layer")
    overlap = chart(at, "compare_overlap")
    assert overlap["layout"]["yaxis"]["tickvals"] == overlap["data"][0]["y"]  # every row labelled
    ok(at.selectbox(key="compare_budget").select("4").run())
    assert len(at.get("plotly_chart")) == 4
    ok(at.text_input(key="compare_folder").set_value("small").run())  # a sweep folder too
    assert len(at.get("plotly_chart")) == 4 and not at.error


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
    assert at.text_input(key="failures_folder").value == "report"
    ok(at.selectbox(key="failures_method").select("random").run())
    ok(at.selectbox(key="failures_budget").select("4").run())
    count = expected_failures(results_folder, "random", "4")
    assert count >= 1  # 4 random tokens of 144 leave too little; the rest of the test needs a failure
    assert any(f"**{count}** failure(s) of random at 4" in m.value for m in at.markdown)
    assert any("category:" in m.value for m in at.markdown)
    assert len(at.get("image")) == 2  # the original and the kept tokens
    table = at.dataframe[1].value
    assert list(table.columns[:2]) == ["dropped evidence token", "rank under occlusion"]
    assert any("what the categories mean" in e.proto.label for e in at.expander)
    ok(at.button(key="failures_restore").click().run())
    assert at.success or at.warning
    assert len(at.get("image")) == 3


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


def test_a_sample_is_judged_with_all_its_references_and_options(tmp_path):
    """The dashboard's verdict is the sweep's: every reference and option of the sample counts."""
    from workbench.samples import Sample

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    choice = state.subject_of_sample(Sample("q", tmp_path / "x.png", "Which animal?", answer="B",
                                            scorer="multiple_choice", options=("dog", "cat", "bird")))
    assert choice.is_correct("It is a cat.") and not choice.is_correct("It is a bird.")
    vqa = state.subject_of_sample(Sample("v", tmp_path / "x.png", "What colour?", answer="red", scorer="vqa_soft",
                                         references=("blue",) * 4 + ("red",) * 3 + ("green",) * 3))
    assert vqa.is_correct("blue") and not vqa.is_correct("green")
