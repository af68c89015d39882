"""Exports (DPO / KTO / rankings JSONL) and training snapshots (Parquet + meta.json, appearing whole or not at all)."""

import json

import pyarrow.parquet as pq
import pytest

from storage.errors import Conflict, InvalidValue
from storage.exports import export_jsonl, iter_export, write_snapshot
from storage.items import AnswerRecord
from storage.store import Store

PAIRS_COLUMNS = [
    "ranking_id", "item_id", "annotator", "annotator_id", "policy_version", "prompt_id", "prompt", "chosen_answer_id",
    "chosen", "rejected_answer_id", "rejected", "chosen_rank", "rejected_rank", "created_at",
]
UNARY_COLUMNS = [
    "feedback_id", "answer_id", "item_id", "annotator", "policy_version", "prompt", "completion", "label", "created_at",
]


@pytest.fixture
def store(tmp_path):
    """Two items: v0 ranked by alice (K=3) with thumbs, v2 ranked by bob (K=4); and one thumbs-down on its own."""
    with Store.open(tmp_path / "data") as store:
        alice, _, _ = store.users.add("alice", "annotator")
        bob, _, _ = store.users.add("bob", "annotator")
        p0, p1, _ = store.prompts.add(["Old prompt?", "New prompt?", "Unused prompt?"]).prompt_ids
        old = store.items.add(p0, 0, {}, [AnswerRecord(f"old {k}", 2, "eos", -1.0) for k in range(3)])
        new = store.items.add(p1, 2, {}, [AnswerRecord(f"new {k}", 2, "eos", -1.0) for k in range(4)])
        a = [x.answer_id for x in old.answers]
        store.labels.add_ranking(old.item_id, alice.user_id, [a[1], a[0], a[2]], seconds=4.0, feedback={a[1]: "up"})
        b = [x.answer_id for x in new.answers]
        store.labels.add_ranking(new.item_id, bob.user_id, b[::-1])
        store.labels.add_feedback(b[0], bob.user_id, "down")
        yield store


def test_dpo_and_kto_rows(store, tmp_path):
    dpo = list(iter_export(store, "dpo"))
    assert len(dpo) == 3 + 6
    assert dpo[:3] == [
        {"prompt": "Old prompt?", "chosen": "old 1", "rejected": "old 0"},
        {"prompt": "Old prompt?", "chosen": "old 1", "rejected": "old 2"},
        {"prompt": "Old prompt?", "chosen": "old 0", "rejected": "old 2"},
    ]
    assert dpo[3] == {"prompt": "New prompt?", "chosen": "new 3", "rejected": "new 2"}
    assert list(iter_export(store, "kto")) == [
        {"prompt": "Old prompt?", "completion": "old 1", "label": True},
        {"prompt": "New prompt?", "completion": "new 0", "label": False},
    ]
    out = tmp_path / "dpo.jsonl"
    assert export_jsonl(store, "dpo", out) == 9
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == dpo
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_rankings_export(store):
    first, second = iter_export(store, "rankings")
    assert first["annotator"] == "alice" and first["policy_version"] == 0 and first["seconds"] == 4.0
    assert first["answers"] == ["old 1", "old 0", "old 2"]
    assert len(first["answer_ids"]) == 3
    assert first["created_at"].endswith("+00:00")
    assert second["answers"] == ["new 3", "new 2", "new 1", "new 0"] and second["seconds"] is None
    json.dumps(first)  # JSON-serialisable as is


def test_unknown_format_writes_no_file(store, tmp_path):
    with pytest.raises(InvalidValue, match="unknown export format 'sft', expected one of dpo, kto, rankings"):
        export_jsonl(store, "sft", tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_snapshot_parquet_files_read_back(store, tmp_path):
    out = tmp_path / "snapshots" / "round-1"
    meta = write_snapshot(store, out, parent_version=2, base_model="tiny")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "pairs.parquet", "prompts.parquet", "unary.parquet"]
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["counts"] == {"pairs": 9, "unary": 2, "prompts": 3}
    assert (meta["parent_version"], meta["base_model"]) == (2, "tiny")
    pairs = pq.read_table(out / "pairs.parquet")
    assert pairs.column_names == PAIRS_COLUMNS and pairs.num_rows == 9
    assert pairs.column("chosen").to_pylist()[0] == "old 1"
    unary = pq.read_table(out / "unary.parquet")
    assert unary.column_names == UNARY_COLUMNS
    assert unary.column("label").to_pylist() == [True, False]
    prompts = pq.read_table(out / "prompts.parquet")
    assert prompts.column_names == ["prompt_id", "prompt"] and prompts.num_rows == 3
    assert not [p for p in out.parent.iterdir() if p.name != "round-1"]  # the temp dir was renamed, not copied


def test_snapshot_with_max_staleness_drops_old_labels(store, tmp_path):
    meta = write_snapshot(store, tmp_path / "snap", parent_version=2, base_model="tiny", max_staleness=1)
    assert meta["counts"] == {"pairs": 6, "unary": 1, "prompts": 3}
    assert set(pq.read_table(tmp_path / "snap" / "pairs.parquet").column("policy_version").to_pylist()) == {2}


def test_snapshot_refuses_a_non_empty_directory(store, tmp_path):
    out = tmp_path / "snap"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(Conflict, match="already exists and is not empty"):
        write_snapshot(store, out, parent_version=0, base_model="tiny")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
