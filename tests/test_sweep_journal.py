"""The sweep table is read back from the journal a chunk of rows at a time (so a long sweep never
holds its rows as dicts); every chunking gives the same table, torn last line left out."""

from __future__ import annotations

import json

import pytest

from workbench import sweep
from workbench.sweep import read_sweep


def _folder(tmp_path, rows: int, torn: bool = False):
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps({"format": sweep.FORMAT, "version": sweep.VERSION}))
    lines = [json.dumps({"sample_id": str(i), "method": "random", "budget": "33%", "kept_count": i,
                         "answer": f"a{i}", "status": "ok"}) + "\n" for i in range(rows)]
    (folder / "rows.jsonl").write_text("".join(lines) + ('{"sample_id": "x", "meth' if torn else ""))
    return folder


@pytest.mark.parametrize("rows", [0, 1, 4, 5, 9])
@pytest.mark.parametrize("torn", [False, True])
def test_every_chunking_reads_the_same_table(tmp_path, monkeypatch, rows, torn):
    folder = _folder(tmp_path, rows, torn)
    whole = read_sweep(folder)
    assert whole["sample_id"].to_list() == [str(i) for i in range(rows)]
    assert whole["kept_count"].to_list() == list(range(rows))
    assert whole["predicted_answer"].to_list() == [f"a{i}" for i in range(rows)]  # an older journal's name
    monkeypatch.setattr(sweep, "JOURNAL_CHUNK", 2)
    assert read_sweep(folder).equals(whole)
