"""The tower output VisionZip's and VisionDrop's code hand the projector: [CLS, dominant, contextual].

Both codes pick dominant tokens and merge the others into a few contextual tokens on the hidden
states of the projector-feed tower layer, BEFORE the projector, and then concatenate the block as
[CLS, dominant patches in sequence order, contextual tokens in target order]. A plan says this in
two stages: a ``"tower:<feed layer>"`` stage that keeps the dominant patches and the targets and
merges the sources into their targets on the tower's features (the projector then runs on the
merged vectors), and a ``"pre_llm"`` stage that brings the [CLS] in before the first kept patch and
moves the contextual tokens behind the dominant ones (``Append``s with no sources: the tower's
merged rows only move). Tower stages run only where ``tower_stages.in_tower_reason`` is None.
"""

from __future__ import annotations

from workbench.pruning.plan import PRE_LLM, Append, Stage, cls_token


def moved_after_dominant(targets, merges) -> tuple[Append, ...]:
    """The contextual tokens as the code places them: each target (merged with its sources, if any)
    moved after the last visual token, in target order, behind the dominant tokens."""
    by_target = {m.target: m for m in merges}
    return tuple(Append(t, by_target[t].sources, by_target[t].weights) if t in by_target else Append(t, (), (1.0,))
                 for t in targets)


def tower_output_stages(where, kept, scores, merges, position: str, cls: tuple[Append, ...] = (),
                        moved_targets=()) -> list[Stage]:
    """The tower stage at ``where`` (``kept`` patches, ``merges`` on the tower's features), then,
    when the [CLS] enters (``cls``: its ``Append``) or contextual tokens move behind the dominant
    ones (``moved_targets``, in target order), the ``pre_llm`` stage that does both."""
    kept = tuple(sorted(int(i) for i in kept))
    tower = Stage(where, kept, scores, tuple(merges), position)
    moved = moved_after_dominant(moved_targets, [])
    if not cls and not moved:
        return [tower]
    return [tower, Stage(PRE_LLM, kept + tuple(a.token for a in cls), None, (), position, tuple(cls) + moved)]


def cls_before(n_visual: int, kept, view: int = 0) -> tuple[Append, ...]:
    """The [CLS] of tower view ``view`` brought in before the first of the ``kept`` patches (the code's
    tower output starts with it); nothing when no patch is kept."""
    kept = sorted(int(i) for i in kept)
    return (Append(cls_token(n_visual, view), (), (1.0,), before=kept[0]),) if kept else ()
