"""The literature's observations, measured: each function against hand-computed values on a
handmade recording, and the command end to end on the shipped model."""

import dataclasses

import polars as pl
import pytest

from analyses import literature as L
from tests.pruning.handmade import grid_layout, handmade_recording
from workbench.cli import main
from workbench.pruning.method import SignalNeed

# A 2x3 image (tokens 3..8 of 14: 3 system tokens before it, 5 text tokens after).
LAYOUT = grid_layout((2, 3))
ENTRIES = {
    # last row's mass on (visual, text, system, sink), layers 0-2
    SignalNeed("attention_mass", "llm", 0, "last"): [[0.6, 0.3, 0.1, 0.0]],
    SignalNeed("attention_mass", "llm", 1, "last"): [[0.2, 0.2, 0.6, 0.5]],
    SignalNeed("attention_mass", "llm", 2, "last"): [[0.1, 0.1, 0.8, 0.7]],
    # last row's attention on the 6 visual tokens: layer 1 with RoPE favours the bottom row
    SignalNeed("attention", "llm", 0, "last"): [[0.5, 0.4, 0.0, 0.0, 0.0, 0.1]],
    SignalNeed("attention", "llm", 1, "last"): [[0.0, 0.1, 0.0, 0.3, 0.4, 0.2]],
    SignalNeed("attention", "llm", 2, "last"): [[0.0, 0.4, 0.0, 0.0, 0.5, 0.1]],
    SignalNeed("attention_norope", "llm", 1, "last"): [[0.3, 0.1, 0.2, 0.1, 0.2, 0.1]],
    SignalNeed("visual_sink_score", "llm", 2, "tokens"): [[1.0, 25.0, 3.0, 30.0, 2.0, 1.0]],
}


@pytest.fixture(scope="module")
def recording():
    rec = handmade_recording(LAYOUT, ENTRIES)
    sinks = pl.DataFrame({"stack": ["llm"] * 2, "layer": [2, 2], "view": [0, 0], "position": [4, 6],
                          "dim": [7, 7], "value": [90.0, 80.0], "median": [0.5, 0.5], "role": ["visual"] * 2})
    return dataclasses.replace(rec, tables={"massive_activations": sinks})


def test_roles_shares_and_attention_per_token(recording):
    assert L.role_counts(recording) == {"visual": 6, "text": 5, "system": 3}
    frame = L.attention_by_role([recording]).filter(pl.col("layer") == 1)
    row = {r["role"]: r for r in frame.iter_rows(named=True)}
    assert row["visual"]["token_share"] == pytest.approx(6 / 14)
    assert row["system"]["attention"] == pytest.approx(0.6)
    assert row["system"]["per_token"] == pytest.approx(0.6 / (3 / 14))
    assert row["visual"]["per_token"] == pytest.approx(0.2 / (6 / 14))


def test_fastv_kept_rows_with_and_without_rope(recording):
    # K=2 of 32 layers reads layer 1's last row; keep round(6 * 0.25) = 2 tokens. With RoPE the
    # top two are 4 and 3 (the bottom row); without, 0 and then 2 (tied with 4, the lower index
    # first): the top row.
    frame = L.fastv_rows([recording], decoder_layers=32, k=2)
    rope, norope = (frame.filter(pl.col("signal") == s).row(0, named=True) for s in ("attention", "attention_norope"))
    assert (rope["layer"], rope["kept"]) == (1, 2)
    assert rope["mean_row"] == 1.0 and norope["mean_row"] == 0.0


def test_topk_overlap_between_layers(recording):
    # top 2 (25 % of 6, rounded) per layer: {0, 1}, {4, 3}, {4, 1}
    frame = L.topk_overlap([recording])
    jaccard = {(r["layer_a"], r["layer_b"]): r["jaccard"] for r in frame.iter_rows(named=True)}
    assert jaccard == {(0, 1): 0.0, (0, 2): pytest.approx(1 / 3), (1, 2): pytest.approx(1 / 3)}


def test_visual_sinks_above_the_scaled_threshold(recording):
    assert L.var_threshold(4096) == 20.0 and L.var_threshold(1024) == 10.0
    row = L.visual_sinks([recording], hidden_size=4096).row(0, named=True)
    assert row["sink_dims"] == [7] and row["visual_sinks"] == 2 and row["visual_sink_share"] == pytest.approx(2 / 6)


def test_claims_line_up_with_the_papers(recording):
    zero = pl.DataFrame({"sample_id": ["a", "b"], "question_type": ["x", "x"], "unpruned_answer": ["1", "2"],
                         "zero_answer": ["1", "3"], "unpruned_score": [1.0, 1.0], "zero_score": [1.0, 0.0]})
    claims = L.claims(L.attention_by_role([recording]), L.fastv_rows([recording], 32, k=2),
                      L.visual_sinks([recording], 4096), L.topk_overlap([recording]), zero, decoder_layers=3)
    measured = dict(claims.select("finding", "measured").iter_rows())
    assert measured["image_token_share"] == pytest.approx(6 / 14)
    assert measured["system_attention_deep"] == pytest.approx((0.6 + 0.8) / 2)  # layers 1 and 2 of 3
    assert measured["zero_token_retention"] == pytest.approx(0.5)
    assert measured["topk_overlap"] == pytest.approx((0 + 1 / 3 + 1 / 3) / 3)
    paper = dict(claims.select("finding", "paper_value").iter_rows())
    assert paper["fastv_kept_row_rope"] == 0.807 and paper["image_token_share"] == 0.64


def test_the_command_measures_the_shipped_model(tmp_path, capsys):
    assert main(["findings", "--samples", "2", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "fastv_kept_row_rope" in printed and "0.807" in printed
    claims = pl.read_parquet(tmp_path / "out" / "claims.parquet")
    assert claims.height == len(L.CLAIMS) and claims["measured"].null_count() == 0
    zero = pl.read_parquet(tmp_path / "out" / "zero_tokens.parquet")
    assert zero.height == 2 and set(zero.columns) >= {"zero_answer", "zero_score", "unpruned_score"}


def test_role_shares_per_layer(recording):
    shares = L.role_shares(L.attention_by_role([recording]))
    row = shares.filter(pl.col("layer") == 2).row(0, named=True)
    assert (row["system_attention"], row["visual_attention"], row["text_attention"]) == pytest.approx((0.8, 0.1, 0.1))
    assert row["visual_tokens"] == pytest.approx(6 / 14) and row["system_tokens"] == pytest.approx(3 / 14)
    assert shares["layer"].to_list() == [0, 1, 2]


def test_sink_dimensions_from_layer_two_beside_vars():
    sinks = pl.DataFrame({"sample_id": ["a", "a", "b"], "layer": [1, 2, 2],
                          "sink_dims": [[9], [2533, 7], [2533]], "threshold": [20.0] * 3, "visual_sinks": [0] * 3,
                          "visual_sink_share": [0.0] * 3})
    dims = L.sink_dimensions(sinks, decoder_layers=32)  # layer 1 is before VAR's layer 2: dim 9 not counted
    assert dims.rows() == [(2533, 1.0, True), (7, 0.5, False)]


def test_zero_token_accuracy_per_benchmark():
    zero = pl.DataFrame({"sample_id": list("abc"), "benchmark": ["pope", "pope", "mme"],
                         "question_type": ["x"] * 3, "unpruned_answer": ["yes"] * 3, "zero_answer": ["no"] * 3,
                         "unpruned_score": [1.0, 1.0, 0.0], "zero_score": [1.0, 0.0, 0.0]})
    by = {r["benchmark"]: r for r in L.zero_by_benchmark(zero).iter_rows(named=True)}
    assert (by["pope"]["n"], by["pope"]["unpruned"], by["pope"]["zero_tokens"], by["pope"]["retention"]) == \
        (2, 1.0, 0.5, 0.5)
    assert by["mme"]["retention"] is None  # nothing right unpruned: no ratio


def test_the_command_reads_a_stored_benchmark(tmp_path, capsys):
    from tests import benchmark_files as B

    pope = B.build("pope", tmp_path)
    capsys.readouterr()
    assert main(["findings", "--dataset", str(pope), "--samples", "2", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "2 samples from" in printed and "2533, 1415" in printed and "system_attention" in printed
    zero = pl.read_parquet(tmp_path / "out" / "zero_by_benchmark.parquet")
    assert zero["benchmark"].to_list() == ["pope"] and zero["n"].to_list() == [2]
    # scored as POPE is (lmms-eval's protocol), not by the default exact match
    answers = pl.read_parquet(tmp_path / "out" / "zero_tokens.parquet")
    from workbench.scoring import score
    for answer, value, gold in zip(answers["zero_answer"], answers["zero_score"], ["yes", "no"]):
        assert value == score("pope_lmms_eval", answer, [gold]).value
