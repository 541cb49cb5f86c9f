"""Small files in the stored forms of the standard benchmarks, as the hub datasets lmms-eval reads
store them: the real column names, images as PNG bytes in a ``datasets`` Image column, answer
lists as lists. Nothing is downloaded; every file is built here."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
from PIL import Image

COLOURS = ((200, 30, 30), (30, 160, 60), (40, 60, 200), (220, 200, 40))


def png(i: int, size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, COLOURS[i % len(COLOURS)]).save(buffer, "PNG")
    return buffer.getvalue()


def image(i: int, size: tuple[int, int] = (40, 30)) -> dict:
    return {"bytes": png(i, size), "path": None}


def table(rows: list[dict], image_columns=("image",), image_lists=()) -> datasets.Dataset:
    """A ``datasets`` table of ``rows`` with the image columns typed as the hub stores them."""
    features = datasets.Dataset.from_list([{k: v for k, v in rows[0].items()
                                            if k not in image_columns and k not in image_lists}]).features
    for name in image_columns:
        features[name] = datasets.Image()
    for name in image_lists:
        features[name] = datasets.List(datasets.Image())
    ordered = [{k: row[k] for k in features} for row in rows]
    return datasets.Dataset.from_list(ordered, features=features)


def pope_rows() -> list[dict]:
    # id, question_id, question, answer, image_source, image, category: lmms-lab/POPE's columns
    spec = [("adversarial", "yes"), ("adversarial", "no"), ("popular", "yes"), ("popular", "no"), ("random", "no")]
    return [{"id": str(i), "question_id": str(100 + i), "question": "Is there a cat in the image? ",
             "answer": answer, "image_source": f"COCO_val2014_{i:012d}", "image": image(i), "category": category}
            for i, (category, answer) in enumerate(spec)]


def textvqa_rows() -> list[dict]:
    return [{"image_id": "t0", "question_id": 7, "question": "what brand is this?", "question_tokens": ["what"],
             "image": image(0), "image_width": 40, "image_height": 30, "flickr_original_url": "",
             "flickr_300k_url": "", "answers": ["nokia"] * 3 + ["Nokia."] + ["samsung"] * 6,
             "image_classes": ["phone"], "set_name": "val", "ocr_tokens": ["nokia"]}]


def vqav2_rows() -> list[dict]:
    answers = ["two"] * 2 + ["2"] * 1 + ["3"] * 7
    return [{"question_type": "how many", "multiple_choice_answer": "3",
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
             "image_id": 9, "answer_type": "number", "question_id": 90, "question": "How many dogs?",
             "image": image(1)}]


def scienceqa_rows() -> list[dict]:
    return [{"image": image(2), "question": "Which is a mammal?", "choices": ["shark", "whale", "trout"],
             "answer": 1, "hint": "Look at the animals.", "task": "closed choice", "grade": "grade4",
             "subject": "natural science", "topic": "biology", "category": "Classification",
             "skill": "x", "lecture": "", "solution": ""},
            {"image": image(3), "question": "Which is hot?", "choices": ["ice", "fire"], "answer": 1, "hint": "",
             "task": "closed choice", "grade": "grade2", "subject": "natural science", "topic": "physics",
             "category": "Heat", "skill": "x", "lecture": "", "solution": ""}]


def mme_rows() -> list[dict]:
    # two questions per image (question_id is the image's file name), as MME stores them
    return [{"question_id": "code/0001.png", "question": "Is the output 3? Please answer yes or no.", "answer": "Yes",
             "category": "code_reasoning", "image": image(0)},
            {"question_id": "code/0001.png", "question": "Is the output 4? Please answer yes or no.", "answer": "No",
             "category": "code_reasoning", "image": image(0)},
            {"question_id": "0002.jpg", "question": "Is there a dog? Please answer yes or no.", "answer": "Yes",
             "category": "existence", "image": image(1)},
            {"question_id": "0002.jpg", "question": "Is there a cow? Please answer yes or no.", "answer": "No",
             "category": "existence", "image": image(1)}]


def mmbench_rows() -> list[dict]:
    base = {"hint": "nan", "category": "attribute", "L2-category": "fine", "source": "x", "split": "dev",
            "comment": "nan", "E": "nan"}
    options = ["red", "green", "blue", "black"]
    rows = []
    for k in range(2):  # question 5 and its first rotation (index 5 + 1e6)
        rotated = options[k:] + options[:k]
        rows.append(base | {"index": 5 + k * 1_000_000, "question": "What colour is it?",
                            "A": rotated[0], "B": rotated[1], "C": rotated[2], "D": rotated[3],
                            "answer": "ABCD"[rotated.index("green")], "image": image(1)})
    rows.append(base | {"index": 6, "question": "Which shape?", "hint": "A toy.", "A": "cube", "B": "ball",
                        "C": "nan", "D": "nan", "answer": "B", "image": image(2)})
    return rows


def seedbench_rows() -> list[dict]:
    return [{"answer": "C", "choice_a": "one", "choice_b": "two", "choice_c": "three", "choice_d": "four",
             "data_id": "1", "data_type": "image", "question": "How many cups?", "question_id": "101",
             "question_type_id": 5, "image": [image(0)], "segment": None},
            {"answer": "A", "choice_a": "run", "choice_b": "sit", "choice_c": "jump", "choice_d": "swim",
             "data_id": "v1", "data_type": "video", "question": "What happens?", "question_id": "102",
             "question_type_id": 10, "image": [image(1), image(2)], "segment": None}]


def refcoco_rows() -> list[dict]:
    # lmms-lab/RefCOCO's columns; bbox is COCO's [x, y, width, height] in pixels of the 40 x 30 image,
    # answer every referring expression of the region
    return [{"question_id": "r1", "image": image(3), "question": "Please carefully observe the area circled.",
             "answer": ["left dog", "the brown dog"], "segmentation": [1.0, 2.0, 3.0], "bbox": [4.0, 6.0, 16.0, 12.0],
             "iscrowd": 0, "file_name": "COCO_train2014_1.jpg"},
            {"question_id": "r2", "image": image(1), "question": "Please carefully observe the area circled.",
             "answer": ["red cup"], "segmentation": [4.0, 5.0, 6.0], "bbox": [30.0, 2.0, 8.0, 10.0],
             "iscrowd": 0, "file_name": "COCO_train2014_2.jpg"}]


def gqa_rows() -> list[dict]:
    return [{"id": "201", "imageId": "n1", "question": "What is on the table?", "answer": "cup",
             "fullAnswer": "The cup is on the table.", "isBalanced": True,
             "types": {"structural": "query", "semantic": "rel", "detailed": "relS"},
             "annotations": {"answer": {"0": "o2"}, "question": {"4": "o1"}, "fullAnswer": {"1": "o2"}},
             "image": image(0)}]


GQA_SCENE_GRAPHS = {"n1": {"width": 40, "height": 30, "objects": {
    "o1": {"name": "table", "x": 0, "y": 15, "w": 40, "h": 15},
    "o2": {"name": "cup", "x": 10, "y": 8, "w": 6, "h": 7},
    "o3": {"name": "wall", "x": 0, "y": 0, "w": 40, "h": 8}}}}

ROWS = {"pope": pope_rows, "textvqa": textvqa_rows, "vqav2": vqav2_rows, "scienceqa_img": scienceqa_rows,
        "mme": mme_rows, "mmbench": mmbench_rows, "seedbench_img": seedbench_rows,
        "refcoco_caption": refcoco_rows,
        "gqa": gqa_rows}


def build(name: str, folder: Path, form: str = "parquet", rows: list[dict] | None = None) -> Path:
    """The benchmark's rows in ``folder`` as a parquet shard folder ("parquet"), one parquet file
    ("parquet_file") or a ``save_to_disk`` folder ("arrow"); returns what ``--dataset`` names."""
    rows = rows if rows is not None else ROWS[name]()
    data = table(rows, image_columns=() if name == "seedbench_img" else ("image",),
                 image_lists=("image",) if name == "seedbench_img" else ())
    folder.mkdir(parents=True, exist_ok=True)
    if form == "arrow":
        data.save_to_disk(str(folder / name))
        return folder / name
    if form == "parquet_file":
        data.to_parquet(str(folder / f"{name}.parquet"))
        return folder / f"{name}.parquet"
    shards = folder / name / "data"
    shards.mkdir(parents=True, exist_ok=True)
    half = max(1, len(data) // 2)
    data.select(range(half)).to_parquet(str(shards / "test-00000-of-00002.parquet"))
    if len(data) > half:
        data.select(range(half, len(data))).to_parquet(str(shards / "test-00001-of-00002.parquet"))
    return folder / name


def build_coco_refcoco(folder: Path) -> Path:
    """RefCOCO as an image folder and a COCO-style annotation JSON (refer's "sentences")."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    Image.open(io.BytesIO(png(3, (50, 40)))).save(folder / "images" / "COCO_train2014_000000000009.jpg")
    annotations = {"images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "width": 50, "height": 40}],
                   "annotations": [{"id": 31, "image_id": 9, "category_id": 18, "bbox": [10.0, 5.0, 20.0, 30.0],
                                    "sentences": [{"sent": "dog on the left"}]}],
                   "categories": [{"id": 18, "name": "dog"}]}
    (folder / "refs.json").write_text(json.dumps(annotations))
    return folder / "refs.json"
