"""The shape every pruning method has: validated hyper-parameters plus ``select(context) -> KeepPlan``.

Like a scikit-learn estimator, a method is a frozen dataclass whose fields are its
hyper-parameters (the reference defaults), checked in ``__post_init__``. ``select`` is a pure
function of the ``SelectionContext``: the sample's ``VisualLayout``, the budget, the facts of the
model it runs on and, for signal-based methods, the recording of the unpruned forward. A method
says which recorded signals it reads (``needs``), so one recording per sample serves every method
of a sweep. Methods that choose inside the LLM after earlier pruning (PyramidDrop, SparseVLM, ...)
also return a ``layer_callback``, which the executor consults before each decoder layer with the
live, already pruned state.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from workbench.errors import UserError
from workbench.layout import VisualLayout
from workbench.models.base import tower_layer_of
from workbench.pruning.budget import Budget, resolve_budget
from workbench.pruning.executor import LayerCallback
from workbench.pruning.plan import POSITION_POLICIES, KeepPlan


class MethodNotApplicable(UserError, ValueError):
    """The method cannot run on this model (e.g. [CLS]-based on a tower without [CLS])."""


@dataclass(frozen=True)
class ModelFacts:
    """What a method may know of the model besides its recording."""

    family: str  # the adapter's family ("llava", "qwen2_vl", ...: ``ModelAdapter.family``)
    decoder_layers: int
    vision_layers: int
    has_cls_token: bool
    projector_feed_layer: int  # index into the tower's hidden_states (0 = embeddings, i = after layer i)
    vision_heads: int = 1  # attention heads of the tower (recorded keys hold them side by side)
    mrope: bool = False  # the decoder's position ids have several axes (M-RoPE): they cannot be re-indexed
    multi_view: bool = False  # images are seen as a low-resolution base view plus high-resolution crops

    @staticmethod
    def of(adapter) -> "ModelFacts":
        return ModelFacts(str(adapter.family), len(adapter.decoder_layers()), len(adapter.vision_layers()),
                          bool(adapter.has_cls_token), int(adapter.projector_feed_layer),
                          int(adapter.vision_attention(0).num_heads), bool(adapter.mrope), bool(adapter.multi_view))

    @property
    def projector_feed_tower_layer(self) -> int:
        """The tower layer whose output feeds the projector (recordings index layers, not hidden_states)."""
        return tower_layer_of(self.projector_feed_layer)


@dataclass(frozen=True, order=True)
class SignalNeed:
    """One recorded entry a method reads: ``Recording.get(signal, layer, rows, stack)``.
    ``layer`` is a non-negative layer index of ``stack``; ``rows`` a query-row kind, or "tokens"
    for per-token and feature signals."""

    signal: str
    stack: str
    layer: int
    rows: str = "tokens"


@dataclass(frozen=True)
class SelectionContext:
    """What a method may look at for one sample. ``budget``: a count or a fraction (see
    ``resolve_budget``); ``n_keep`` is the resolved count every method must use."""

    layout: VisualLayout
    budget: Budget
    # The unpruned forward's signals (``workbench.recording.Recording``); typed loosely here so
    # that pruning does not depend on the probes' import.
    recording: object | None = None
    model: ModelFacts | None = None

    def __post_init__(self):
        resolve_budget(self.budget, self.layout.n_tokens)  # fail at construction, not inside a method

    @property
    def n_visual(self) -> int:
        return self.layout.n_tokens

    @property
    def n_keep(self) -> int:
        return resolve_budget(self.budget, self.layout.n_tokens)

    def signal(self, need: SignalNeed):
        """The recorded values of ``need`` as a float64 numpy array."""
        if self.recording is None:
            raise ValueError(f"this method reads {need.signal!r} but the context carries no recording")
        return self.recording.get(need.signal, need.layer, need.rows, need.stack).double().numpy()

    def features(self, need: SignalNeed):
        """[N, D] per-visual-token features of a feature signal: LLM entries as recorded, tower
        entries read per tower view and folded onto the layout's tokens by its tower map (the mean
        of the patches each token owns); a tower whose patches cannot be placed raises ValueError."""
        if need.stack != "tower":
            return self.signal(need)
        from workbench.tower_map import tower_features

        return tower_features(self.recording, self.layout, need.signal, need.layer)

    def require_model(self) -> ModelFacts:
        if self.model is None:
            raise ValueError("this method needs the model's facts (SelectionContext.model)")
        return self.model


# What a method ranks the visual tokens by, so reports can group methods by signal:
# "text_attention" the LLM's attention from text or last rows (RoPE's position bias applies to it),
# "visual_attention" attention among visual tokens or from [CLS] (tower or LLM),
# "similarity" similarity or diversity of token features, "layout" the token grid alone (baselines).
SCORE_SOURCES = ("text_attention", "visual_attention", "similarity", "layout")


class PruningMethod(ABC):
    """Base class of the registered methods (subclasses are frozen dataclasses)."""

    name: ClassVar[str] = ""
    scored_by: ClassVar[str] = ""  # one of SCORE_SOURCES
    # Where the reference behaviour comes from, for ``workbench methods``: the paper, the
    # reference repository and file, and one line on where paper and code differ.
    reference: ClassVar[str] = ""
    # A layer callback that hooks the modules of the layers it is asked at (to measure what they
    # compute) needs those layers run live, so such a run never starts from the unpruned prefill.
    hooks_layers: ClassVar[bool] = False

    @abstractmethod
    def select(self, context: SelectionContext) -> KeepPlan:
        """The plan for one sample; a pure function of ``context`` and the hyper-parameters."""

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        """The recorded entries ``select`` reads on ``model`` (none for layout-only methods)."""
        return ()

    def applicability(self, model: ModelFacts) -> str | None:
        """Why the method cannot run on ``model``, or None when it can."""
        return None

    def check_applies(self, model: ModelFacts) -> None:
        reason = self.applicability(model)
        if reason is not None:
            raise MethodNotApplicable(f"{self.name} does not apply to {model.family}: {reason}")

    def layer_callback(self, context: SelectionContext) -> LayerCallback | None:
        """For methods that select inside the LLM on the live pruned state; None for the others
        (the executor's ``LayerCallback``, which may answer a batch's samples together)."""
        return None

    def tower_callback(self, context: SelectionContext):
        """For methods that prune inside the vision tower on its live state
        (``workbench.pruning.tower_stages.TowerCallback``); None for the others."""
        return None

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        """The documented number of visual tokens alive after each stage; one stage keeping the
        budget unless a method's schedule says otherwise."""
        return (context.n_keep,)

    def params(self) -> dict:
        """Hyper-parameters as plain data (for tables and the dashboard)."""
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def plan(self, context: SelectionContext, stages) -> KeepPlan:
        return KeepPlan(self.name, context.n_keep, context.n_visual, tuple(stages))


def entry_position(policy: str, model: ModelFacts | None) -> str:
    """The position policy of the sequence entering the LLM after a cut made before it (a pre-LLM
    stage, or the last stage inside the vision tower): ``policy``, except "original" on M-RoPE models.

    "reindex" is what the released LLaVA code of the pre-LLM methods does: the pruned image features
    are concatenated with the text embeddings in ``prepare_inputs_labels_for_multimodal`` and the
    model numbers that shorter sequence 0..L'-1. On M-RoPE models (Qwen2-VL, Qwen2.5-VL) the code
    slices the multi-axis ids ``get_rope_index`` made for the unpruned sequence (HiPrune, HoloV,
    MMTok), which is "original" -- and the executor cannot renumber multi-axis ids anyway. Without
    model facts (layout-only use) ``policy`` is taken as given."""
    return "original" if model is not None and model.mrope else policy


def check_choice(method: str, parameter: str, value, choices: tuple) -> None:
    """A parameter that takes one of a few named values: one clear line for any other."""
    if value not in choices:
        raise ValueError(f"{method}: {parameter} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class PreLLMMethod(PruningMethod):
    """Base of the methods that cut before the LLM (and of those whose cut inside the vision tower
    fixes the LLM's input): the ``position`` parameter, its check and ``entry_position``.

    ``position="reindex"`` (default): the LLM numbers the kept sequence contiguously, as the LLaVA
    code does (see ``entry_position``; M-RoPE models keep their positions); ``"original"``: every
    kept token keeps the position id it had in the unpruned sequence (gaps where tokens were cut).
    Keyword-only, so it never shifts a subclass's positional parameters. A subclass with its own
    ``__post_init__`` calls ``super().__post_init__()``."""

    position: str = field(default="reindex", kw_only=True)

    def __post_init__(self):
        check_choice(self.name, "position", self.position, POSITION_POLICIES)

    def entry_position(self, context: SelectionContext) -> str:
        """The position policy of this method's stage entering the LLM for ``context``'s model."""
        return entry_position(self.position, context.model)
