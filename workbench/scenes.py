"""Grounded synthetic scenes: images of simple objects with questions whose evidence is known.

A scene is a few objects (shape x colour x size) placed in the cells of a 3x3 grid over a noisy
background. Every question names the objects its answer depends on, so each sample carries the
pixel boxes and masks of its evidence: the ground truth that lets the workbench say whether a
pruning method dropped what the answer needed.

Everything is a pure function of a seed (``numpy.random.Generator``), so data sets rebuild
bit-exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 200),
}
SIZES = {"small": (12, 16), "large": (22, 27)}
GRID = 3
POSITIONS = (
    ("top-left", "top", "top-right"),
    ("left", "center", "right"),
    ("bottom-left", "bottom", "bottom-right"),
)
NUMBERS = ("zero", "one", "two", "three", "four", "five")
QUESTION_TYPES = ("attribute", "object", "existence", "position", "counting", "relation")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]  # (row, col) in the 3x3 grid
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    image: Image.Image = field(compare=False)
    labels: np.ndarray = field(compare=False)  # [H, W] int: 0 background, k = objects[k-1]

    @property
    def size(self) -> int:
        return self.image.size[0]


@dataclass(frozen=True)
class Question:
    question_type: str
    question: str
    answer: str
    evidence: tuple[int, ...]  # indices into Scene.objects


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    x1, y1 = x1 - 1, y1 - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        w = max(2, (x1 - x0) // 3)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((cx - w // 2, y0, cx - w // 2 + w, y1), fill=fill)
        draw.rectangle((x0, cy - w // 2, x1, cy - w // 2 + w), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(objects: tuple[SceneObject, ...], rng: np.random.Generator, image_size: int) -> Scene:
    """Paint ``objects`` over a noisy background with faint grey clutter."""
    background = rng.integers(25, 70)
    pixels = np.full((image_size, image_size, 3), background, dtype=np.int16)
    pixels += rng.integers(-18, 19, size=pixels.shape, dtype=np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 6)):  # clutter: thin grey strokes that belong to no object
        x, y = rng.integers(0, image_size, size=2)
        dx, dy = rng.integers(-10, 11, size=2)
        grey = int(rng.integers(80, 130))
        draw.line((int(x), int(y), int(x + dx), int(y + dy)), fill=(grey, grey, grey), width=1)
    labels = np.zeros((image_size, image_size), dtype=np.int16)
    for k, obj in enumerate(objects, start=1):
        colour = np.array(COLOURS[obj.colour]) + rng.integers(-15, 16, size=3)
        _draw_shape(draw, obj.shape, obj.box, tuple(int(c) for c in np.clip(colour, 0, 255)))
        mask = Image.new("L", (image_size, image_size), 0)
        _draw_shape(ImageDraw.Draw(mask), obj.shape, obj.box, 255)
        labels[np.asarray(mask) > 0] = k
    return Scene(objects=objects, image=image, labels=labels)


def sample_objects(rng: np.random.Generator, n_objects: int, image_size: int = 96) -> tuple[SceneObject, ...]:
    """Draw ``n_objects`` with distinct cells and distinct (colour, shape) pairs."""
    if not 1 <= n_objects <= GRID * GRID:
        raise ValueError(f"n_objects must be in 1..{GRID * GRID}, got {n_objects}")
    cell_px = image_size / GRID
    cells = rng.choice(GRID * GRID, size=n_objects, replace=False)
    # A small palette per scene makes repeated colours and shapes common, so counting questions
    # have answers beyond "one"; the pairs stay distinct so "the red circle" names one object.
    n_colours = int(rng.integers(1, min(n_objects, len(COLOURS)) + 1))
    min_shapes = -(-n_objects // n_colours)
    n_shapes = int(rng.integers(min_shapes, min(max(n_objects, min_shapes), len(SHAPES)) + 1))
    colours = rng.choice(list(COLOURS), size=n_colours, replace=False)
    shapes = rng.choice(list(SHAPES), size=n_shapes, replace=False)
    pairs = [(str(c), str(s)) for c in colours for s in shapes]
    chosen = rng.choice(len(pairs), size=n_objects, replace=False)
    objects = []
    for cell, pair in zip(cells, chosen):
        row, col = divmod(int(cell), GRID)
        colour, shape = pairs[int(pair)]
        size = str(rng.choice(list(SIZES)))
        lo, hi = SIZES[size]
        extent = int(round(rng.integers(lo, hi + 1) * image_size / 96))
        slack = max(0, int(cell_px) - extent)
        x0 = int(col * cell_px) + int(rng.integers(0, slack + 1))
        y0 = int(row * cell_px) + int(rng.integers(0, slack + 1))
        objects.append(SceneObject(shape, colour, size, (row, col), (x0, y0, x0 + extent, y0 + extent)))
    return tuple(objects)


def make_scene(rng: np.random.Generator, n_objects: int, image_size: int = 96) -> Scene:
    return render(sample_objects(rng, n_objects, image_size), rng, image_size)


# --- question templates -----------------------------------------------------------------------
# Each template returns a Question or None when the scene cannot support it (e.g. a relation needs
# two objects). They only read the scene, so any of them can be asked of any scene.

QuestionTemplate = Callable[[tuple[SceneObject, ...], np.random.Generator], "Question | None"]


def _attribute(objs, rng):
    """Attribute of a named object: the colour of a shape that is unique, or the size of an object."""
    if rng.random() < 0.5:
        unique = [i for i, o in enumerate(objs) if sum(p.shape == o.shape for p in objs) == 1]
        if unique:
            i = int(rng.choice(unique))
            return Question("attribute", f"what colour is the {objs[i].shape} ?", objs[i].colour, (i,))
    i = int(rng.integers(len(objs)))
    return Question("attribute", f"what size is the {objs[i].name} ?", objs[i].size, (i,))


def _object(objs, rng):
    """Object with a named attribute: the shape of the only object of a colour."""
    unique = [i for i, o in enumerate(objs) if sum(p.colour == o.colour for p in objs) == 1]
    if not unique:
        return None
    i = int(rng.choice(unique))
    return Question("object", f"what shape is the {objs[i].colour} object ?", objs[i].shape, (i,))


def _existence(objs, rng):
    """Existence with colour-shape binding: negatives prefer a colour and a shape that are both
    present, on different objects, so the answer needs the binding and not either attribute."""
    if rng.random() < 0.5:
        i = int(rng.integers(len(objs)))
        return Question("existence", f"is there a {objs[i].name} ?", "yes", (i,))
    present = {(o.colour, o.shape) for o in objs}
    bound = [(o.colour, p.shape) for o in objs for p in objs if (o.colour, p.shape) not in present]
    if bound and rng.random() < 0.8:
        colour, shape = bound[int(rng.integers(len(bound)))]
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colour, shape = absent[int(rng.integers(len(absent)))]
    evidence = tuple(i for i, o in enumerate(objs) if o.colour == colour or o.shape == shape)
    return Question("existence", f"is there a {colour} {shape} ?", "no", evidence)


def _position(objs, rng):
    i = int(rng.integers(len(objs)))
    row, col = objs[i].cell
    return Question("position", f"where is the {objs[i].name} ?", POSITIONS[row][col], (i,))


def _counting(objs, rng):
    """Count the objects of a colour or of a shape that is present (so evidence exists)."""
    candidates = {}
    for o in objs:
        candidates[f"how many {o.colour} objects are there ?"] = tuple(i for i, p in enumerate(objs) if p.colour == o.colour)
        candidates[f"how many {o.shape} shapes are there ?"] = tuple(i for i, p in enumerate(objs) if p.shape == o.shape)
    # Draw the count first, then a question with that count, so answers are not mostly "one".
    counts = sorted({len(e) for e in candidates.values()})
    count = counts[int(rng.integers(len(counts)))]
    texts = [t for t, e in candidates.items() if len(e) == count]
    text = texts[int(rng.integers(len(texts)))]
    return Question("counting", text, NUMBERS[count], candidates[text])


def _relation(objs, rng):
    """Left-of / above between two named objects in different columns (rows)."""
    if len(objs) < 2:
        return None
    i, j = (int(k) for k in rng.choice(len(objs), size=2, replace=False))
    a, b = objs[i], objs[j]
    axis = int(rng.integers(2))
    if a.cell[1 - axis] == b.cell[1 - axis]:
        axis = 1 - axis
    if a.cell[1 - axis] == b.cell[1 - axis]:
        return None
    word, coord = ("left of", 1) if axis == 0 else ("above", 0)
    answer = "yes" if a.cell[coord] < b.cell[coord] else "no"
    return Question("relation", f"is the {a.name} {word} the {b.name} ?", answer, (i, j))


TEMPLATES: dict[str, QuestionTemplate] = {
    "attribute": _attribute,
    "object": _object,
    "existence": _existence,
    "position": _position,
    "counting": _counting,
    "relation": _relation,
}


def ask(objs: tuple[SceneObject, ...], question_type: str, rng: np.random.Generator, tries: int = 8):
    """A question of ``question_type`` about the scene, or None if the scene cannot support one."""
    if question_type not in TEMPLATES:
        raise ValueError(f"unknown question type {question_type!r}; known: {', '.join(TEMPLATES)}")
    for _ in range(tries):
        question = TEMPLATES[question_type](objs, rng)
        if question is not None:
            return question
    return None


def vocabulary() -> list[str]:
    """Every word a question or an answer can use, in a fixed order."""
    words = ["what", "colour", "size", "shape", "is", "the", "object", "there", "a", "where", "how",
             "many", "objects", "are", "shapes", "left", "of", "above", "?", "yes", "no"]
    words += list(SHAPES) + list(COLOURS) + list(SIZES) + [p for row in POSITIONS for p in row]
    words += list(NUMBERS)
    return list(dict.fromkeys(words))
