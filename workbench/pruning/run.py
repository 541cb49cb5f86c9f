"""Run one method on one sample: record what it reads, let it choose, execute the model under its plan."""

from __future__ import annotations

from typing import Iterable

from workbench.models.base import ModelAdapter, PreparedInput
from workbench.pruning.budget import Budget
from workbench.pruning.executor import Execution, execute
from workbench.pruning.method import ModelFacts, PruningMethod, SelectionContext, SignalNeed


def capture_request(needs: Iterable[SignalNeed]):
    """One ``CaptureRequest`` recording every entry in ``needs`` (None when there are none)."""
    from workbench.recording import CaptureRequest

    needs = sorted(set(needs))
    if not needs:
        return None
    layers = {stack: tuple(sorted({n.layer for n in needs if n.stack == stack})) for stack in ("llm", "tower")}
    rows = tuple(sorted({n.rows for n in needs if n.rows != "tokens"})) or ("last",)
    stacks = tuple(s for s in ("tower", "llm") if layers[s])
    return CaptureRequest(signals=tuple(sorted({n.signal for n in needs})), layers=layers["llm"] or None,
                          tower_layers=layers["tower"] or None, rows=rows, stacks=stacks)


def record_needs(adapter: ModelAdapter, prepared: PreparedInput, methods: Iterable[PruningMethod]):
    """The one recording of the unpruned forward that every method in ``methods`` reads (or None)."""
    from workbench.recorder import record

    facts = ModelFacts.of(adapter)
    request = capture_request(need for m in methods for need in m.needs(facts))
    return None if request is None else record(adapter, prepared, request)


def run_method(adapter: ModelAdapter, prepared: PreparedInput, method: PruningMethod, budget: Budget,
               recording=None, gold_answer: str | None = None, max_new_tokens: int = 8) -> Execution:
    """``method`` at ``budget`` on one prepared sample; ``recording`` is made when not given."""
    facts = ModelFacts.of(adapter)
    method.check_applies(facts)
    if recording is None:
        recording = record_needs(adapter, prepared, [method])
    context = SelectionContext(prepared.layout, budget, recording, facts)
    plan = method.select(context)
    return execute(adapter, prepared, plan, max_new_tokens=max_new_tokens, gold_answer=gold_answer,
                   callback=method.layer_callback(context), tower_callback=method.tower_callback(context))
