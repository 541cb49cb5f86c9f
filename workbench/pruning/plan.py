"""What a pruning method decided: which visual tokens survive each stage, what got merged, and why.

A ``KeepPlan`` is pure data. Methods return one, the executor runs the model under one, the
dashboard draws one and the analyses compare them, so it is plain values only (ints, floats,
strings, tuples) and round-trips through ``to_dict``/``from_dict`` and JSON.

Every index is into the ORIGINAL visual tokens ``0..N-1`` of the sample's ``VisualLayout`` (layout
order), whatever stage it belongs to, so plans of different methods line up token for token. The
indices from ``N`` on are reserved: ``N + v`` names the vision tower's [CLS] output of tower view ``v``
(``cls_token``), a token some methods pass on to the LLM (``Append``); after the V views' [CLS] names
come the tower patches the layout has no token for (LLaVA-NeXT's unpadding drops the crops' padding
patches), view by view: ``N + V + (patches of views 0..v-1) + p`` names patch ``p`` of view ``v``
(``padded_patch``; VisPruner's code passes them on). Neither has a box in the layout, so whatever
draws or counts tokens on the image reads ``boxed`` indices only.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Literal, Union

import numpy as np

PRE_LLM = "pre_llm"
TOWER = "tower:"  # "tower:i": on the vision tower's hidden states after tower layer i
POSITION_POLICIES = ("original", "reindex")
# What becomes of the tokens a stage drops: "removed" takes their rows out of the sequence; "masked" (inside
# the LLM) keeps them as rows the later layers still compute but hides them as keys (AIM's code).
DROP_POLICIES = ("removed", "masked")
# What becomes of the layout's separators (image-newline rows, tile markers) at a "pre_llm" stage: "kept" in
# their places (the model's own sequence), or "dropped" from the LLM input (HiRED's code packs no newlines).
SEPARATOR_POLICIES = ("kept", "dropped")

# "tower:i": inside the vision tower, after its layer i (later tower layers, and the LLM, see only the
# kept tokens); "pre_llm": on the decoder's input embeddings; an int k: on the hidden states entering
# decoder layer k.
Where = Union[Literal["pre_llm"], int, str]
PositionPolicy = Literal["original", "reindex"]
DropPolicy = Literal["removed", "masked"]
SeparatorPolicy = Literal["kept", "dropped"]
# Where an ``Append``'s weighted sum is taken: "embedding", on the rows entering the stage; "tower", on its
# members' tower features at the projector's feed layer, then through the projector (VisionZip's code).
APPEND_SPACES = ("embedding", "tower")


class PlanError(ValueError):
    """A plan that cannot be executed as written; the message says which stage and why."""


def cls_token(n_visual: int, view: int = 0) -> int:
    """The reserved index of the tower's [CLS] output of view ``view`` in a plan over ``n_visual`` tokens."""
    return int(n_visual) + int(view)


def padded_patch(n_visual: int, view_sizes, view: int, patch: int) -> int:
    """The reserved index of patch ``patch`` of tower view ``view`` (row-major in the view, the tower's
    order) in a plan over ``n_visual`` tokens whose tower encodes views of ``view_sizes`` patches: a
    name for a patch the layout has no token for (``VisualLayout.tower_owner`` -1), past the [CLS]
    names. Brought into the LLM like the [CLS] (an ``Append`` of the ``"pre_llm"`` stage, no sources):
    its row is the patch's tower feature at the projector's feed layer, through the projector."""
    sizes = [int(s) for s in view_sizes]
    if not (0 <= int(view) < len(sizes) and 0 <= int(patch) < sizes[int(view)]):
        raise PlanError(f"no patch {patch} of tower view {view} among views of {sizes} patches")
    return int(n_visual) + len(sizes) + sum(sizes[:int(view)]) + int(patch)


def padded_patch_at(index: int, n_visual: int, view_sizes) -> tuple[int, int] | None:
    """(view, patch) of a ``padded_patch`` name; None for a layout token or a [CLS] name."""
    sizes = [int(s) for s in view_sizes]
    offset = int(index) - int(n_visual) - len(sizes)
    if offset < 0:
        return None
    for view, size in enumerate(sizes):
        if offset < size:
            return view, offset
        offset -= size
    raise PlanError(f"reserved index {index} is past the last tower patch ({len(sizes)} views of {sizes} patches)")


def boxed(indices, n_visual: int) -> np.ndarray:
    """The indices among ``indices`` that are visual tokens of the layout (the [CLS] and padded-patch
    names left out):
    what has a box to draw and a row in every per-token [N] array."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    return indices[indices < n_visual]


def tower_where(layer: int) -> str:
    """The ``where`` of a stage after vision-tower layer ``layer``."""
    return f"{TOWER}{int(layer)}"


def tower_layer(where: Where) -> int | None:
    """The tower layer of a ``"tower:i"`` stage, None for any other ``where``."""
    if isinstance(where, str) and where.startswith(TOWER) and where[len(TOWER):].isdigit():
        return int(where[len(TOWER):])
    return None


def _stage_order(where: Where) -> int:
    layer = tower_layer(where)
    if layer is not None:
        return layer - 2**31  # every tower stage runs before the LLM
    return -1 if where == PRE_LLM else int(where)


def describe_where(where: Where) -> str:
    layer = tower_layer(where)
    if layer is not None:
        return f"after vision-tower layer {layer}"
    return "before the LLM" if where == PRE_LLM else f"before decoder layer {where}"


def among(values, members) -> np.ndarray:
    """bool per entry of ``values``: it is one of ``members`` (non-negative ints; a negative value,
    a row that is no visual token, never is). A lookup table: ``np.isin`` sorts, and plans and
    stages ask this of every token once per stage and sample."""
    members = np.asarray(members, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)
    if not len(members) or not len(values):
        return np.zeros(len(values), dtype=bool)
    table = np.zeros(max(int(members.max()), int(values.max())) + 1, dtype=bool)
    table[members] = True
    return (values >= 0) & table[np.maximum(values, 0)]


def missing(tokens, alive) -> list[int]:
    """The ``tokens`` not among ``alive``, sorted, each once."""
    tokens = np.unique(np.asarray(tokens, dtype=np.int64))
    return tokens[~among(tokens, alive)].tolist()


SCORE_ENCODINGS = {"float32": "<f4", "float64": "<f8"}


def encode_scores(scores) -> dict:
    """A stage's [N] scores for a stored plan, exactly: their little-endian bytes in base64, as
    float32 where every score is a float32 value (attention and most similarities are), else as
    float64; NaN (unscored) stays NaN. A quarter of the text of a JSON list of the same float32
    scores (3.1 against 12.8 kB for 576 tokens), and a sweep stores one per stage and row."""
    values = np.asarray(scores, dtype=np.float64)
    with np.errstate(over="ignore"):  # a score beyond float32's range is stored as float64
        narrow = values.astype(np.float32)
    kind = "float32" if np.array_equal(narrow, values, equal_nan=True) else "float64"
    return {kind: base64.b64encode(values.astype(SCORE_ENCODINGS[kind]).tobytes()).decode("ascii")}


def decode_scores(stored) -> tuple[float, ...]:
    """The scores ``encode_scores`` stored, or a JSON list of numbers with null for NaN (plans
    written by hand, or before the encoding)."""
    if isinstance(stored, dict):
        if len(stored) != 1 or next(iter(stored)) not in SCORE_ENCODINGS:
            raise PlanError(f"scores must be a list or one of {sorted(SCORE_ENCODINGS)} in base64, got keys {sorted(stored)}")
        (kind, text), = stored.items()
        values = np.frombuffer(base64.b64decode(text, validate=True), dtype=SCORE_ENCODINGS[kind])
        return tuple(values.astype(np.float64).tolist())
    return tuple(math.nan if s is None else s for s in stored)


def _int_array(values) -> np.ndarray:
    """``values`` as a 1-D int64 array, each as ``int()`` takes it."""
    array = np.asarray(values)
    if array.ndim == 1 and array.dtype.kind in "iub":
        return array.astype(np.int64)
    return np.array([int(v) for v in values], dtype=np.int64)


def check_weights(what: str, kept: str, sources: tuple, weights: tuple) -> None:
    """A fold's weights: one for the ``kept`` token, then one per source, all finite."""
    if len(weights) != len(sources) + 1:
        raise PlanError(f"{what}: {len(weights)} weights for 1 {kept} + {len(sources)} sources (need one weight each)")
    if not all(math.isfinite(w) for w in weights):
        raise PlanError(f"{what} has non-finite weights {weights}")


@dataclass(frozen=True)
class Merge:
    """Fold ``sources`` into ``target``: ``target <- weights[0]*target + sum(weights[i+1]*sources[i])``.

    The target keeps its own sequence position; the sources are dropped by the same stage.
    Weights are taken as given (no renormalisation): methods that average pass weights summing to 1.
    """

    target: int
    sources: tuple[int, ...]
    weights: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(int(s) for s in self.sources))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        object.__setattr__(self, "target", int(self.target))
        if not self.sources:
            raise PlanError(f"merge into token {self.target} has no source tokens")
        check_weights(f"merge into token {self.target}", "target", self.sources, self.weights)
        if len(set(self.sources)) != len(self.sources):
            raise PlanError(f"merge into token {self.target} lists a source twice: {self.sources}")
        if self.target in self.sources:
            raise PlanError(f"merge into token {self.target} lists the target among its sources")

    @staticmethod
    def mean(target: int, sources) -> "Merge":
        """The plain average of the target and its sources."""
        sources = tuple(int(s) for s in sources)
        weight = 1.0 / (len(sources) + 1)
        return Merge(target, sources, (weight,) * (len(sources) + 1))

    def to_dict(self) -> dict:
        return {"target": self.target, "sources": list(self.sources), "weights": list(self.weights)}

    @staticmethod
    def from_dict(row: dict) -> "Merge":
        return Merge(row["target"], tuple(row["sources"]), tuple(row["weights"]))


@dataclass(frozen=True)
class Append:
    """A new token made by the stage and inserted elsewhere in the sequence (SparseVLM's recycled
    clusters go after the kept visual tokens, as in its code):
    ``token <- weights[0]*token + sum(weights[i+1]*sources[i])``, read before the stage.

    ``token`` names the new token: one of the tokens it is made of, alive before the stage and kept
    by it, so every index in a plan stays an original visual index (later stages keep, drop or merge
    it by that name; it is drawn at that token's box). Its old row leaves its place; the new row is
    inserted right after the row of visual token ``after`` (alive before the stage, kept or not), or
    with ``after=None`` right after the last visual row alive before the stage: the end of the
    visual block. Appends at the same place follow each other in the stage's order. Under the
    "original" position policy it takes the position id of the row it follows (that row's, even
    when the stage drops it); under "reindex" the sequence is numbered contiguously as usual.
    ``sources`` may be empty (the token only moves, scaled by ``weights[0]``); they are dropped by
    the same stage. With ``before`` (instead of ``after``) the new row goes right before the row of
    visual token ``before`` (alive before the stage, kept or not), and under "original" it takes
    that row's position id.

    The tower's [CLS]: ``token = cls_token(N, v)`` (a reserved index past the layout's tokens) in a
    ``"pre_llm"`` stage that keeps it brings the [CLS] output of tower view ``v`` into the sequence
    (VisionZip's and VisionDrop's code pass it to the LLM as a visual token): its row is that
    feature at the projector's feed layer, through the projector, as the model's own patches are
    (times ``weights[0]``; no sources), from the same tower pass as the patches. From then on it is a
    visual token like the others, named by that index: later stages keep, drop, merge or move it;
    it counts in every kept count and every layer's visual tokens; it has no box (``boxed``). Only
    towers with a [CLS] can pass it (the executor says so otherwise). A padded patch
    (``padded_patch``: a tower patch the layout has no token for) enters the same way, its row that
    patch's feature at the feed layer, through the projector, from the same tower pass.

    ``space``: "embedding" (default) takes the weighted sum of the members' rows entering the stage;
    "tower" takes it on the members' tower features at the projector's feed layer and runs the
    projector on it, ``projector(sum_i w_i * feed_i)``, from the tower pass that made the decoder's
    inputs (VisionZip's code merges there, before the projector). Only in the ``"pre_llm"`` stage or
    the stage before decoder layer 0 (nothing has computed on the rows yet), and every member must be
    a tower patch: a layout token that owns exactly one patch of one tower view, or a padded patch,
    not a [CLS] name (the executor says so otherwise).
    """

    token: int
    sources: tuple[int, ...]
    weights: tuple[float, ...]
    after: int | None = None
    before: int | None = None
    space: str = "embedding"

    def __post_init__(self):
        object.__setattr__(self, "token", int(self.token))
        object.__setattr__(self, "sources", tuple(int(s) for s in self.sources))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        for name in ("after", "before"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                    raise PlanError(f"appended token {self.token}: {name!r} must be a visual index or None, "
                                    f"got {value!r}")
                object.__setattr__(self, name, int(value))
        if self.after is not None and self.before is not None:
            raise PlanError(f"appended token {self.token}: give 'after' or 'before', not both")
        check_weights(f"appended token {self.token}", "token", self.sources, self.weights)
        if len(set(self.sources)) != len(self.sources) or self.token in self.sources:
            raise PlanError(f"appended token {self.token} lists a token twice: {(self.token,) + self.sources}")
        if self.space not in APPEND_SPACES:
            raise PlanError(f"appended token {self.token}: space must be one of {APPEND_SPACES}, got {self.space!r}")

    @property
    def members(self) -> tuple[int, ...]:
        """Every token whose state makes the new one: the token itself, then the sources."""
        return (self.token,) + self.sources

    @property
    def place(self) -> int | None:
        """The visual token whose row the new row is placed next to (``after`` or ``before``)."""
        return self.before if self.before is not None else self.after

    def to_dict(self) -> dict:
        return {"token": self.token, "sources": list(self.sources), "weights": list(self.weights), "after": self.after,
                "before": self.before, "space": self.space}

    @staticmethod
    def from_dict(row: dict) -> "Append":
        return Append(row["token"], tuple(row["sources"]), tuple(row["weights"]), row.get("after"), row.get("before"),
                      row.get("space", "embedding"))  # plans written before the field summed embeddings


@dataclass(frozen=True)
class Stage:
    """One pruning step.

    ``where``: ``"pre_llm"`` or decoder layer index k ("before layer k": layers < k see the tokens
    that entered this stage, layers >= k only ``kept``), or ``"tower:i"`` (after vision-tower layer
    i: later tower layers and the LLM see only ``kept``; merges act on the tower's hidden states;
    ``position`` then says how the LLM numbers the tokens the tower passed on).
    ``kept``: sorted original visual indices that survive this stage.
    ``scores``: the [N] score that ranked the tokens (NaN where a token was not scored), or None
    for methods that rank nothing (random, uniform grid).
    ``position``: "original" keeps every surviving token's position id (FastV); "reindex" numbers
    the surviving sequence contiguously from 0 (PyramidDrop).
    ``appends``: kept tokens rebuilt from others and moved elsewhere in the sequence (``Append``),
    and, in the ``"pre_llm"`` stage, the tower's [CLS] brought in (``cls_token``); before the LLM and
    inside it, not in the tower.
    ``dropped``: what becomes of the tokens the stage drops. "removed" (default): their rows leave
    the sequence, so later layers neither compute nor see them. "masked" (inside the LLM only): they
    stay rows of the sequence, which layers >= k still compute (each still attends to the visible
    keys), but their keys are hidden from every query, their own included, from layer k on, in the
    prefill and while decoding: what AIM's code does with its attention mask. ``kept`` is then the
    tokens still visible as keys; later stages keep a subset of them and a later "removed" stage
    takes the masked rows out too. A masking stage only hides tokens: no merges or appends, and
    positions stay as they are ("original").
    ``separators``: the layout's separators (image-newline rows, tile markers), which no stage keeps
    or drops by index. "kept" (default): they stay in their places. "dropped" (the ``"pre_llm"``
    stage only): their rows are left out of the LLM input, so no layer computes or sees them (HiRED's
    code packs its image features with no newline); positions follow ``position`` ("reindex"
    numbers the shorter sequence contiguously, "original" leaves gaps).
    """

    where: Where
    kept: tuple[int, ...]
    scores: tuple[float, ...] | None = None
    merges: tuple[Merge, ...] = ()
    position: PositionPolicy = "original"
    appends: tuple[Append, ...] = ()
    dropped: DropPolicy = "removed"
    separators: SeparatorPolicy = "kept"

    def __post_init__(self):
        if self.where != PRE_LLM and tower_layer(self.where) is None:
            if isinstance(self.where, bool) or not isinstance(self.where, (int, np.integer)):
                raise PlanError(f"stage 'where' must be {PRE_LLM!r} or a decoder layer index (or 'tower:<layer>' "
                                f"inside the vision tower), got {self.where!r}")
            if self.where < 0:
                raise PlanError(f"stage 'where' must be a non-negative layer index, got {self.where}")
            object.__setattr__(self, "where", int(self.where))
        # As arrays: a stage holds up to thousands of indices and scores, and every run makes several.
        kept_array = _int_array(self.kept)
        if (np.diff(kept_array) <= 0).any():
            raise PlanError(f"stage {describe_where(self.where)}: kept indices must be sorted and unique")
        kept_array.flags.writeable = False
        object.__setattr__(self, "kept", tuple(kept_array.tolist()))
        object.__setattr__(self, "_kept_array", kept_array)
        if self.scores is not None:
            scores = np.asarray(self.scores, dtype=np.float64)
            if scores.ndim != 1:
                raise PlanError(f"stage {describe_where(self.where)}: scores must be one number per visual token")
            values = scores.tolist()
            for i in np.flatnonzero(np.isnan(scores)).tolist():
                values[i] = math.nan  # one NaN object: stages with NaN in the same places compare equal
            object.__setattr__(self, "scores", tuple(values))
        object.__setattr__(self, "merges", tuple(self.merges))
        if self.position not in POSITION_POLICIES:
            raise PlanError(f"stage {describe_where(self.where)}: position policy must be one of "
                            f"{POSITION_POLICIES}, got {self.position!r}")
        kept_set = set(self.kept) if self.merges or self.appends else set()  # for the folds' checks
        where = describe_where(self.where)
        if self.dropped not in DROP_POLICIES:
            raise PlanError(f"stage {where}: dropped must be one of {DROP_POLICIES}, got {self.dropped!r}")
        if self.dropped == "masked" and (not self.in_llm or self.merges or self.appends or self.position != "original"):
            raise PlanError(f"stage {where}: a masking stage (dropped='masked') acts inside the LLM, keeps every "
                            "row where it is (position 'original') and has no merges or appends")
        if self.separators not in SEPARATOR_POLICIES:
            raise PlanError(f"stage {where}: separators must be one of {SEPARATOR_POLICIES}, got {self.separators!r}")
        if self.separators == "dropped" and self.where != PRE_LLM:
            raise PlanError(f"stage {where}: only the {PRE_LLM!r} stage can leave the layout's separators out of the "
                            "LLM input (separators='dropped')")

        def check_fold(what: str, token: int, sources) -> None:
            # A merge and an append both rebuild one kept token from dropped ones.
            if token not in kept_set:
                raise PlanError(f"stage {where}: {what} {token} is not kept")
            if kept_set.intersection(sources):
                raise PlanError(f"stage {where}: sources {sorted(kept_set.intersection(sources))} of {what} {token} "
                                "are kept; a source must be dropped")

        for merge in self.merges:
            check_fold("merge target", merge.target, merge.sources)
        object.__setattr__(self, "appends", tuple(self.appends))
        if self.appends and self.in_tower:
            raise PlanError(f"stage {where}: appended tokens are made before the LLM or "
                            "inside it, not in the vision tower")
        if self.where not in (PRE_LLM, 0) and any(append.space == "tower" for append in self.appends):
            raise PlanError(f"stage {where}: appended tokens are made on the tower's features (space='tower') only "
                            f"in the {PRE_LLM!r} stage or before decoder layer 0")
        targets = {merge.target for merge in self.merges}
        tokens = [append.token for append in self.appends]
        for append in self.appends:
            check_fold("appended token", append.token, append.sources)
            if append.token in targets or tokens.count(append.token) > 1:
                raise PlanError(f"stage {where}: token {append.token} is made twice "
                                "(appended twice, or also a merge target)")

    @property
    def in_llm(self) -> bool:
        return self.where != PRE_LLM and not self.in_tower

    @property
    def in_tower(self) -> bool:
        return tower_layer(self.where) is not None

    @property
    def kept_array(self) -> np.ndarray:
        """``kept`` as a read-only int64 array."""
        return self._kept_array

    @property
    def folds(self) -> tuple[Merge, ...]:
        """Every group of tokens this stage folds into one, whether in place (``merges``) or into an
        appended token made of several (``appends``), as merges into the token that carries it: what
        the views draw and the analyses count as merged."""
        return self.merges + tuple(Merge(a.token, a.sources, a.weights) for a in self.appends if a.sources)

    @property
    def score_array(self) -> np.ndarray | None:
        return None if self.scores is None else np.asarray(self.scores, dtype=np.float64)

    def to_dict(self) -> dict:
        scores = None if self.scores is None else encode_scores(self.scores)
        return {"where": self.where, "kept": list(self.kept), "scores": scores,
                "merges": [m.to_dict() for m in self.merges], "position": self.position,
                "appends": [a.to_dict() for a in self.appends], "dropped": self.dropped,
                "separators": self.separators}

    @staticmethod
    def from_dict(row: dict) -> "Stage":
        scores = row.get("scores")
        if scores is not None:
            scores = decode_scores(scores)
        return Stage(row["where"], tuple(row["kept"]), scores,
                     tuple(Merge.from_dict(m) for m in row.get("merges", ())), row.get("position", "original"),
                     tuple(Append.from_dict(a) for a in row.get("appends", ())), row.get("dropped", "removed"),
                     row.get("separators", "kept"))  # plans written before the field kept them


@dataclass(frozen=True)
class KeepPlan:
    """A method's decision for one sample: its stages in execution order.

    ``budget`` is the resolved token budget the method was asked for (a count); the final kept
    count usually equals it, but methods with thresholds or per-layer schedules may differ.
    A plan with no stages keeps everything.
    """

    method: str
    budget: int
    n_visual: int
    stages: tuple[Stage, ...] = field(default_factory=tuple)

    def __post_init__(self):
        try:
            object.__setattr__(self, "stages", tuple(self.stages))
            object.__setattr__(self, "budget", int(self.budget))
            object.__setattr__(self, "n_visual", int(self.n_visual))
        except (TypeError, ValueError, OverflowError) as e:
            raise PlanError(f"not a keep plan: stages must be a sequence, budget and n_visual integers ({e})") from None
        if not all(isinstance(stage, Stage) for stage in self.stages):
            raise PlanError("not a keep plan: every stage must be a Stage")
        self.validate()

    def validate(self) -> None:
        n = self.n_visual
        if n < 0:
            raise PlanError(f"n_visual must be >= 0, got {n}")
        if not 0 <= self.budget <= n:
            raise PlanError(f"budget {self.budget} is outside 0..{n} visual tokens")
        alive = np.arange(n, dtype=np.int64)
        previous = None
        for stage in self.stages:
            where = describe_where(stage.where)
            if previous is not None and _stage_order(stage.where) <= _stage_order(previous.where):
                raise PlanError(f"stage {where} comes after stage {describe_where(previous.where)}; "
                                "stages must be in strictly increasing order (pre_llm first, then layers)")
            entering = missing([a.token for a in stage.appends if a.token >= n], alive)
            for token in entering:
                append = next(a for a in stage.appends if a.token == token)
                if stage.where != PRE_LLM or append.sources:
                    raise PlanError(f"stage {where}: reserved token {token} (the tower's [CLS] or a padded patch) "
                                    "enters the sequence in the 'pre_llm' stage, made of no other token")
            kept = stage.kept_array
            known = among(kept, alive) | among(kept, entering)
            bad = kept[~(known | ((kept >= 0) & (kept < n)))].tolist()
            if bad:
                raise PlanError(f"stage {where}: kept indices {bad[:5]} are out of range 0..{n - 1}")
            extra = kept[~known].tolist()
            if extra:
                raise PlanError(f"stage {where}: keeps {extra[:5]} which an earlier stage dropped "
                                "(each stage must keep a subset of the previous one)")
            if stage.scores is not None and len(stage.scores) != n:
                raise PlanError(f"stage {where}: {len(stage.scores)} scores for {n} visual tokens")
            for merge in stage.merges:
                gone = missing(merge.sources, alive)
                if gone:
                    raise PlanError(f"stage {where}: merge into {merge.target} uses sources {gone[:5]} "
                                    "that were already dropped (or are out of range)")
            for append in stage.appends:
                gone = missing(append.sources, alive)
                if gone or (append.place is not None and not among([append.place], alive)[0]):
                    raise PlanError(f"stage {where}: appended token {append.token} uses tokens "
                                    f"{(gone or [append.place])[:5]} that were already dropped (or are out of range)")
            alive = kept
            previous = stage

    # --- views ---------------------------------------------------------------------------------
    @property
    def final_kept(self) -> tuple[int, ...]:
        return self.stages[-1].kept if self.stages else tuple(range(self.n_visual))

    def kept_at(self, where: Where) -> tuple[int, ...]:
        """Visual tokens alive at ``where`` (after any stage at that point)."""
        alive = tuple(range(self.n_visual))
        for stage in self.stages:
            if _stage_order(stage.where) > _stage_order(where):
                break
            alive = stage.kept
        return alive

    def stage_at(self, where: Where) -> Stage | None:
        return next((s for s in self.stages if s.where == where), None)

    @property
    def kept_per_stage(self) -> dict:
        return {stage.where: stage.kept for stage in self.stages}

    # --- constructors --------------------------------------------------------------------------
    @staticmethod
    def keep_all(n: int, where: Where | None = PRE_LLM, method: str = "keep_all") -> "KeepPlan":
        """Keeps every token; with ``where`` it has one explicit stage there (used to check that
        the executor's pruning path reproduces the unpruned model), with None no stage at all."""
        stages = () if where is None else (Stage(where, tuple(range(n))),)
        return KeepPlan(method, n, n, stages)

    def with_stages(self, stages) -> "KeepPlan":
        return KeepPlan(self.method, self.budget, self.n_visual, tuple(stages))

    # --- plain data ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"method": self.method, "budget": self.budget, "n_visual": self.n_visual,
                "stages": [s.to_dict() for s in self.stages]}

    @staticmethod
    def from_dict(row: dict) -> "KeepPlan":
        """The plan ``to_dict`` wrote; ``PlanError`` for anything else (plans are read back from
        sweep tables and files a user may have edited)."""
        try:
            return KeepPlan(row["method"], row["budget"], row["n_visual"],
                            tuple(Stage.from_dict(s) for s in row.get("stages", ())))
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise PlanError(f"not a keep plan ({type(e).__name__}: {e})") from None
