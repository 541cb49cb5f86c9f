"""Images are opened in one place, as a viewer shows them; an undecodable one is one line naming it."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from workbench.cli import main
from workbench.images import BACKGROUND, ImageError
from workbench.samples import Sample

IMAGE = "data/eval/images/scene-00000.png"


def open_rgb(path):
    """What every command sees of an image: a sample's ``load_image``."""
    return Sample("s", path, "what ?").load_image()


def truncated_png(path):
    data = open(IMAGE, "rb").read()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_a_truncated_png_is_an_error_naming_the_file(tmp_path):
    broken = truncated_png(tmp_path / "broken.png")
    with pytest.raises(ImageError, match=f"{broken}: cannot decode image"):
        open_rgb(broken)


def test_sixteen_bit_greyscale_keeps_its_levels(tmp_path):
    levels = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "grey16.png")
    rgb = np.asarray(open_rgb(tmp_path / "grey16.png"))
    assert rgb.shape == (1, 3, 3) and rgb.dtype == np.uint8
    assert list(rgb[0, :, 0]) == [0, 128, 255]  # not clipped to white


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))  # blue left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    upright = open_rgb(tmp_path / "phone.jpg")
    assert upright.size == (20, 40)
    top = np.asarray(upright)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the blue half is now on top


def test_palette_and_alpha_are_composited_on_white(tmp_path, capsys):
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 255, 0] + [0] * 765)
    palette.save(tmp_path / "palette.png")
    assert tuple(np.asarray(open_rgb(tmp_path / "palette.png"))[0, 0]) == (0, 255, 0)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "rgba.png")
    rgb = np.asarray(open_rgb(tmp_path / "rgba.png"))
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[1, 1]) == BACKGROUND
    notes = [line for line in capsys.readouterr().err.splitlines() if "composited onto white" in line]
    assert len(notes) <= 1  # once per run, not once per image


def test_record_and_evaluate_name_an_undecodable_image_in_one_line(tmp_path, capsys):
    broken = truncated_png(tmp_path / "broken.png")
    assert main(["record", "--image", str(broken), "--question", "what ?", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"workbench record: error: {broken}: cannot decode image" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
    shutil.copy(IMAGE, tmp_path / "good.png")
    rows = [{"id": "1", "image": "good.png", "question": "what ?"}, {"id": "2", "image": "broken.png", "question": "what ?"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["evaluate", "--dataset", str(tmp_path / "d.jsonl"), "--no-blank", "--attention-samples", "0"]) == 2
    captured = capsys.readouterr()
    assert f"workbench evaluate: error: {broken}: cannot decode image" in captured.err
    assert "Traceback" not in captured.err and "loading" not in captured.out  # refused before the model loaded
