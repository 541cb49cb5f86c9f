"""The standard benchmarks in their stored forms (tests/benchmark_files.py builds them with the real
column names and PNG bytes): the reference prompts, the answers and references, the evidence
boxes, the official aggregates against hand-computed values, and the chat template around it all."""

import json

import numpy as np
import polars as pl
import pytest

from tests import benchmark_files as B
from workbench.benchmarks import (BENCHMARKS, CAPTION_PROMPT, REC_PROMPT, UnknownBenchmark, benchmark_summary,
                                  gqa_evidence, summary_wide)
from workbench.cider import cider_d
from workbench.cli import main
from workbench.samples import DatasetError, read_dataset, sample_from_row, sample_to_row

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """Every benchmark as a folder of parquet shards (GQA with its scene graphs beside it)."""
    root = tmp_path_factory.mktemp("benchmarks")
    paths = {name: B.build(name, root) for name in B.ROWS}
    (paths["gqa"] / "testdev_sceneGraphs.json").write_text(json.dumps(B.GQA_SCENE_GRAPHS))
    return paths


def by_id(samples):
    return {s.id: s for s in samples}


def test_every_benchmark_is_inferred_from_its_columns(stored):
    for name, path in stored.items():
        samples = read_dataset(path)
        assert {s.benchmark for s in samples} == {name}, name
        assert {s.scorer for s in samples} == {BENCHMARKS[name].scorer}


def test_pope_prompt_answers_and_categories(stored):
    samples = read_dataset(stored["pope"])
    assert [s.id for s in samples] == ["100", "101", "102", "103", "104"]
    assert samples[0].question == "Is there a cat in the image?" + SHORT  # the stored trailing space stripped
    assert [s.answer for s in samples] == ["yes", "no", "yes", "no", "no"]
    assert [s.question_type for s in samples] == ["adversarial", "adversarial", "popular", "popular", "random"]
    assert samples[2].load_image().getpixel((0, 0)) == B.COLOURS[2]  # row 2's own PNG, decoded on demand


def test_vqa_sets_keep_every_annotator_answer_and_score_softly(stored):
    (text,) = read_dataset(stored["textvqa"])
    assert text.question == "What brand is this?" + SHORT  # capitalised, as lmms-eval does
    assert len(text.references) == 10 and text.answer == "samsung"  # the majority, normalised
    assert text.score("Nokia").value == 1.0  # 3 x "nokia" + "Nokia." normalise alike: 4 annotators
    (vqa,) = read_dataset(stored["vqav2"])
    assert vqa.answer == "3" and vqa.question_type == "number" and vqa.question == "How many dogs?" + SHORT
    # references two, two, 2, 3 x 7: "two" and "2" normalise to "2" -> 3 matches; leaving out one of
    # them leaves 2 (2/3), leaving out a "3" leaves 3 (1): (3 * 2/3 + 7 * 1) / 10
    assert vqa.score("two").value == pytest.approx(0.9)
    assert vqa.score("3").value == 1.0 and vqa.score("4").value == 0.0


def test_multiple_choice_prompts_lay_out_options_as_the_reference(stored):
    sqa = read_dataset(stored["scienceqa_img"])
    assert sqa[0].question == ("Context: Look at the animals.\nWhich is a mammal?\nA. shark\nB. whale\nC. trout"
                               + LETTER)
    assert sqa[1].question == "Which is hot?\nA. ice\nB. fire" + LETTER  # no hint, no context line
    assert sqa[0].answer == "B" and sqa[0].options == ("shark", "whale", "trout")
    assert sqa[0].score("B. whale").value == 1.0 and sqa[0].score("whale").value == 1.0
    assert sqa[0].score("A").value == 0.0
    (seed,) = read_dataset(stored["seedbench_img"])  # the video row is not SEED-Bench-IMG
    assert seed.question == "How many cups?\nA. one\nB. two\nC. three\nD. four" + LETTER and seed.answer == "C"
    assert seed.load_image().getpixel((0, 0)) == B.COLOURS[0]  # the first image of the list column
    mmb = by_id(read_dataset(stored["mmbench"]))
    assert mmb["5"].question == ("What colour is it? There are several options:\nA. red\nB. green\nC. blue\n"
                                 "D. black" + LETTER)
    assert mmb["1000005"].question.startswith("What colour is it? There are several options:\nA. green\nB. blue")
    assert (mmb["5"].answer, mmb["1000005"].answer) == ("B", "A")
    assert mmb["5"].group == mmb["1000005"].group == "5"
    assert mmb["6"].question == "A toy. Which shape? There are several options:\nA. cube\nB. ball" + LETTER
    assert mmb["6"].options == ("cube", "ball")


def test_mme_pairs_questions_by_image(stored):
    samples = read_dataset(stored["mme"])
    assert samples[0].question == "Is the output 3?" + SHORT  # lmms-eval's yes/no suffix replaced
    assert [s.group for s in samples] == ["code/0001.png"] * 2 + ["0002.jpg"] * 2
    assert [s.question_type for s in samples] == ["code_reasoning"] * 2 + ["existence"] * 2
    assert len({s.id for s in samples}) == 4
    assert samples[0].score("Yes").value == 1.0 and samples[1].score("Yes").value == 0.0


def test_refcoco_grounding_boxes_become_evidence_and_the_gold_box(stored):
    samples = read_dataset(stored["refcoco_caption"], benchmark="refcoco_rec")  # same stored form, asked by name
    assert [s.id for s in samples] == ["r1-0", "r1-1", "r2-0"]  # one sample per referring expression
    assert {s.scorer for s in samples} == {"box_iou"} and not samples[0].marks  # the image as stored
    assert samples[1].question == REC_PROMPT + "the brown dog"
    # bbox [4, 6, 16, 12] (x, y, w, h) on a 40 x 30 image
    assert samples[0].evidence_boxes == ((4.0, 6.0, 20.0, 18.0),)
    assert samples[0].answer == "[0.100, 0.200, 0.500, 0.600]"
    mask = samples[0].evidence_mask()
    assert mask.shape == (30, 40) and mask.sum() == 16 * 12 and mask[6, 4] and not mask[5, 4]
    assert samples[0].score("[0.1, 0.2, 0.5, 0.55]").value == 1.0


def test_refcoco_captioning_draws_the_region_and_asks_for_a_caption(stored):
    # lmms-eval's refcoco_bbox_*: the image with the region's box drawn (PIL rectangle, outline "red",
    # width 1), the prompt "Provide a short description for this region.", every expression a reference
    samples = read_dataset(stored["refcoco_caption"])  # inferred: the default RefCOCO task
    assert [s.id for s in samples] == ["r1", "r2"]  # one sample per region
    first = samples[0]
    assert first.question == CAPTION_PROMPT == "Provide a short description for this region."
    assert first.scorer == "rouge_l" and first.references == ("left dog", "the brown dog")
    assert first.answer == "left dog"
    # bbox [4, 6, 16, 12] (x, y, w, h): the outline runs through x = 4 and x = 20, y = 6 and y = 18, both
    # corners painted; inside and outside keep the stored colour
    assert first.marks == first.evidence_boxes == ((4.0, 6.0, 20.0, 18.0),)
    image = first.load_image()
    red, stored_colour = (255, 0, 0), B.COLOURS[3]
    for xy in [(4, 6), (20, 6), (4, 18), (20, 18), (12, 6), (12, 18), (4, 12), (20, 12)]:
        assert image.getpixel(xy) == red, xy
    for xy in [(5, 7), (19, 17), (12, 12), (3, 6), (21, 18), (20, 19), (4, 5), (0, 0)]:
        assert image.getpixel(xy) == stored_colour, xy
    pixels = np.asarray(image)
    assert (pixels == red).all(axis=-1).sum() == 2 * 17 + 2 * 11  # two 17-pixel rows, two 11-pixel columns
    # the evidence mask is the region itself (x1/y1 exclusive), not the outline
    assert first.evidence_mask().sum() == 16 * 12
    # the per-row score is ROUGE-L against every expression; an expression itself scores 1
    assert first.score("The brown dog.").value == 1.0 and first.score("a cat").value == 0.0
    # the mark survives the sweep's task round trip, so Ray workers see the drawn image too
    row = json.loads(json.dumps(sample_to_row(first, stored["refcoco_caption"])))
    again = sample_from_row(row, stored["refcoco_caption"], "task")
    assert again == first and np.array_equal(np.asarray(again.load_image()), pixels)


def test_refcoco_caption_cider_is_the_corpus_aggregate_of_a_sweep(stored):
    samples = read_dataset(stored["refcoco_caption"])
    captions = {"r1": "the brown dog", "r2": "a red cup"}
    table = pl.DataFrame([{"sample_id": s.id, "method": "unpruned", "budget": "100%", "status": "ok",
                           "gold_answer": s.answer, "extracted_answer": s.score(captions[s.id]).extracted,
                           "score": s.score(captions[s.id]).value, "correct": s.score(captions[s.id]).value == 1.0}
                          for s in samples])
    got = {r["metric"]: r["value"] for r in benchmark_summary(table, samples).iter_rows(named=True)}
    # two regions: N = 2, idf = ln 2 for an n-gram in one region's references, 0 in both (none here).
    # r1 "the brown dog" equals its second reference: cosine 1 for n = 1, 2, 3 (no 4-gram: 0), no length
    # penalty -> 10 * 3/4 / 2 references = 3.75 from that reference; against "left dog" (idf ln 2 for
    # every n-gram) only "dog" is shared among the unigrams: cos = 1/(sqrt(3) sqrt(2)), bigrams none;
    # length 3 vs 2: exp(-1/72) -> r1 = 10 * (3 + exp(-1/72) / sqrt(6)) / 4 / 2
    # r2 "a red cup" vs "red cup": "a" (df 0 -> idf ln 2) is unshared; unigrams 2 / (sqrt(3) sqrt(2)),
    # bigrams 1 / (sqrt(2) * 1), length penalty exp(-1/72) -> r2 = 10 * exp(-1/72) * (2/sqrt(6) + 1/sqrt(2)) / 4
    import math

    r1 = 10 * (3 + math.exp(-1 / 72) / math.sqrt(6)) / 4 / 2
    r2 = 10 * math.exp(-1 / 72) * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4
    assert got["CIDEr"] == pytest.approx((r1 + r2) / 2)
    # ROUGE-L: r1 equals a reference (1); r2: LCS 2, precision 2/3, recall 1 -> 2.44 * 2/3 / (1 + 1.44 * 2/3)
    assert got["ROUGE_L"] == pytest.approx((1 + 2.44 * (2 / 3) / (1 + 1.44 * 2 / 3)) / 2)
    assert got["CIDEr"] == pytest.approx(cider_d(list(captions.values()), [["left dog", "the brown dog"],
                                                                           ["red cup"]])[0])


def test_gqa_evidence_comes_from_the_scene_graph_objects_it_names(stored):
    (sample,) = read_dataset(stored["gqa"])
    assert sample.question == "What is on the table?" + SHORT and sample.question_type == "query"
    assert sample.evidence_boxes == ((0.0, 15.0, 40.0, 30.0), (10.0, 8.0, 16.0, 15.0))  # table and cup, not wall
    assert gqa_evidence({"answer": {"0": "o3"}}, None) == ()  # no scene graph given: no evidence


def test_stored_forms_parquet_file_save_to_disk_and_coco(tmp_path):
    one = read_dataset(B.build("pope", tmp_path / "file", form="parquet_file"))
    arrow = read_dataset(B.build("pope", tmp_path / "arrow", form="arrow"))
    assert [s.question for s in one] == [s.question for s in arrow] and len(one) == 5
    assert arrow[3].load_image().getpixel((0, 0)) == B.COLOURS[3]
    (coco,) = read_dataset(B.build_coco_refcoco(tmp_path / "coco"), benchmark="refcoco_rec")
    assert coco.benchmark == "refcoco_rec" and coco.image_ref is None and coco.load_image().size == (50, 40)
    assert coco.evidence_boxes == ((10.0, 5.0, 30.0, 35.0),) and coco.answer == "[0.200, 0.125, 0.600, 0.875]"
    assert read_dataset(tmp_path / "coco", benchmark="refcoco_rec") == [coco]  # the folder holding the JSON
    (caption,) = read_dataset(tmp_path / "coco")  # inferred: RefCOCO's captioning task
    assert caption.benchmark == "refcoco_caption" and caption.references == ("dog on the left",)
    assert caption.marks == caption.evidence_boxes == ((10.0, 5.0, 30.0, 35.0),)
    assert caption.load_image().getpixel((30, 35)) == (255, 0, 0)  # the box drawn on the image file's pixels


def test_a_stored_sample_survives_the_sweep_task_round_trip(stored):
    sample = read_dataset(stored["vqav2"])[0]
    row = json.loads(json.dumps(sample_to_row(sample, stored["vqav2"])))
    again = sample_from_row(row, stored["vqav2"], "task")
    assert again == sample and again.references == sample.references
    assert np.array_equal(np.asarray(again.load_image()), np.asarray(sample.load_image()))


def test_images_are_decoded_only_when_asked(tmp_path):
    rows = B.pope_rows()
    rows[1]["image"] = {"bytes": b"not a png", "path": None}
    samples = read_dataset(B.build("pope", tmp_path, rows=rows))  # reading touches no image
    samples[0].load_image()
    with pytest.raises(Exception, match=r"row 1 column 'image'.*cannot decode"):
        samples[1].load_image()


def test_limit_and_explicit_benchmark(stored):
    assert len(read_dataset(stored["pope"], limit=2)) == 2
    with pytest.raises(DatasetError, match=r"not in mme's stored form.*question_id"):
        read_dataset(stored["vqav2"], benchmark="mme")
    with pytest.raises(UnknownBenchmark, match="available: pope, gqa"):
        read_dataset(stored["pope"], benchmark="pope2")
    # POPE's columns hold MME's too: the more specific match wins, and MME can still be asked for
    assert read_dataset(stored["pope"], benchmark="mme")[0].benchmark == "mme"


def _text_file(folder):
    (folder / "notes.txt").write_text("hello")
    return folder / "notes.txt"


def _pope_without_its_columns(folder):
    rows = [{k: v for k, v in r.items() if k not in ("image_source", "category")} for r in B.pope_rows()]
    return B.build("pope", folder, rows=rows)


@pytest.mark.parametrize("make, message", [
    (_text_file, "notes.txt: not a data set the workbench reads; expected a JSONL file"),
    (lambda folder: folder, "no data set in this folder; expected a JSONL file"),
    (_pope_without_its_columns, "are no known benchmark's; pass --benchmark"),
])
def test_a_wrong_stored_form_is_one_line(tmp_path, capsys, make, message):
    dataset = make(tmp_path / "data") if make is not _text_file else make(tmp_path)
    (tmp_path / "data").mkdir(exist_ok=True)
    capsys.readouterr()  # building the file printed progress
    assert main(["sweep", "--dataset", str(dataset), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_columns_that_fit_no_benchmark_name_the_flag(tmp_path):
    rows = [{"question": "q", "image": B.image(0), "label": "x"}]
    with pytest.raises(UnknownBenchmark, match="no known benchmark's; pass --benchmark"):
        read_dataset(B.build("other", tmp_path, rows=rows))


def test_official_aggregates_from_sweep_rows_by_hand(stored):
    samples = read_dataset(stored["pope"]) + read_dataset(stored["mme"]) + read_dataset(stored["mmbench"])
    answers = {  # sample id -> (extracted answer, correct)
        "100": ("yes", True), "101": ("yes", False), "102": ("no", False), "103": ("no", True), "104": ("no", True),
        "code/0001.png#0": ("yes", True), "code/0001.png#1": ("no", True),
        "0002.jpg#2": ("yes", True), "0002.jpg#3": ("yes", False),
        "5": ("B", True), "1000005": ("C", False), "6": ("B", True)}
    gold = {s.id: s.answer for s in samples}
    kind = {s.id: s.question_type for s in samples}
    table = pl.DataFrame([{"sample_id": i, "method": "unpruned", "budget": "100%", "status": "ok",
                           "question_type": kind[i], "gold_answer": gold[i], "extracted_answer": a, "correct": c,
                           "score": float(c)} for i, (a, c) in answers.items()])
    got = {(r["benchmark"], r["metric"]): r["value"] for r in benchmark_summary(table, samples).iter_rows(named=True)}
    # POPE adversarial: yes/yes (tp), yes/no (fp): precision 1/2, recall 1, F1 2/3; overall tp 1 fp 1 fn 1
    assert got["pope", "adversarial/precision"] == 0.5 and got["pope", "adversarial/recall"] == 1.0
    assert got["pope", "adversarial/f1"] == pytest.approx(2 / 3)
    assert got["pope", "all/accuracy"] == pytest.approx(3 / 5) and got["pope", "all/f1"] == pytest.approx(0.5)
    assert got["pope", "popular/recall"] == 0.0 and got["pope", "random/accuracy"] == 1.0
    # MME: code image both right (200, cognition); existence image one of two (50, perception)
    assert got["mme", "code_reasoning/score"] == 200.0 and got["mme", "all/cognition"] == 200.0
    assert got["mme", "existence/score"] == 50.0 and got["mme", "all/perception"] == 50.0
    # MMBench: question 5 fails its rotation, question 6 passes -> 1/2 circular; single pass 2/2
    assert got["mmbench", "circular_accuracy"] == 0.5 and got["mmbench", "single_pass_accuracy"] == 1.0
    wide = summary_wide(benchmark_summary(table, samples).filter(pl.col("benchmark") == "pope"))
    assert set(wide["part"]) == {"all", "adversarial", "popular", "random"} and "f1" in wide.columns


def test_the_prompt_goes_through_the_family_chat_template(stored):
    from tests.tiny_models import tiny_adapter

    adapter = tiny_adapter("llava")
    sample = read_dataset(stored["scienceqa_img"])[0]
    prepared = adapter.prepare(sample.load_image(), sample.question)
    assert prepared.prompt == adapter.prompt(sample.question)
    assert sample.question in prepared.prompt and prepared.prompt != sample.question


def test_the_benchmarks_command_lists_the_registry(capsys):
    assert main(["benchmarks"]) == 0
    out = capsys.readouterr().out
    for name in ("pope", "gqa", "textvqa", "vqav2", "scienceqa_img", "mme", "mmbench", "seedbench_img",
                 "refcoco_caption", "refcoco_rec"):
        assert f"\n{name}: " in "\n" + out
    assert "image_source" in out and "Answer the question using a single word or phrase." in out
    assert main(["benchmarks", "coco"]) == 2


def test_gqa_questions_find_their_images_in_the_images_table_beside_them(tmp_path):
    # lmms-eval's GQA: testdev_balanced_instructions (no image column) + testdev_balanced_images (id, image)
    questions = [{k: v for k, v in r.items() if k != "image"} | {"id": str(200 + i), "imageId": image_id}
                 for i, (r, image_id) in enumerate(zip(B.gqa_rows() * 2, ["n2", "n1"]))]
    folder = tmp_path / "gqa" / "testdev_balanced_instructions"
    folder.mkdir(parents=True)
    B.table(questions, image_columns=()).to_parquet(str(folder / "testdev-00000-of-00001.parquet"))
    B.build("testdev_balanced_images", tmp_path / "gqa", form="arrow",
            rows=[{"id": "n1", "image": B.image(1)}, {"id": "n2", "image": B.image(2)}])
    (tmp_path / "gqa" / "val_sceneGraphs.json").write_text(json.dumps(B.GQA_SCENE_GRAPHS))
    samples = read_dataset(folder)
    assert [s.benchmark for s in samples] == ["gqa", "gqa"]
    assert samples[0].load_image().getpixel((0, 0)) == B.COLOURS[2]  # n2
    assert samples[1].load_image().getpixel((0, 0)) == B.COLOURS[1]  # n1
    assert samples[0].evidence_boxes == () and len(samples[1].evidence_boxes) == 2  # only n1 has a scene graph
    questions[0]["imageId"] = "n9"
    B.table(questions, image_columns=()).to_parquet(str(folder / "testdev-00000-of-00001.parquet"))
    with pytest.raises(DatasetError, match="imageId 'n9' is not in the images table"):
        read_dataset(folder)


def test_the_sweep_fingerprint_follows_the_stored_files_and_the_coco_images(tmp_path):
    from PIL import Image

    from workbench.sweep_identity import dataset_fingerprint

    pope = B.build("pope", tmp_path)
    before = dataset_fingerprint(pope)
    assert dataset_fingerprint(pope) == before
    B.build("pope", tmp_path, rows=B.pope_rows()[:1] + B.pope_rows()[2:])
    assert dataset_fingerprint(pope) != before
    refs = B.build_coco_refcoco(tmp_path / "coco")
    before = dataset_fingerprint(refs)
    Image.new("RGB", (50, 40), "white").save(tmp_path / "coco" / "images" / "COCO_train2014_000000000009.jpg")
    assert dataset_fingerprint(refs) != before  # the image the annotation names, not only the JSON


def test_a_sweep_on_refcoco_captioning_prints_cider(tmp_path, capsys):
    from workbench.sweep import UNPRUNED, read_sweep

    refcoco = B.build("refcoco_caption", tmp_path, form="parquet_file")
    assert main(["sweep", "--dataset", str(refcoco), "--methods", "random", "--budgets", "0.5",
                 "--out", str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out
    assert "RefCOCO (region captioning" in out and "CIDEr" in out and "ROUGE_L" in out
    samples = read_dataset(refcoco)
    rows = read_sweep(tmp_path / "sweep").filter(pl.col("method") == UNPRUNED).sort("sample_id")
    assert rows["sample_id"].to_list() == ["r1", "r2"] and rows["score"].is_not_null().all()
    summary = benchmark_summary(rows, samples)
    cider = summary.filter(pl.col("metric") == "CIDEr")["value"].item()
    expected, _ = cider_d(rows["predicted_answer"].to_list(), [list(s.references) for s in samples])
    assert cider == pytest.approx(expected)  # the corpus metric of the raw generations, whatever they are
