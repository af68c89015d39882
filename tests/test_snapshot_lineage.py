"""A label's staleness counts deployed versions along the serving lineage (storage.exports.write_snapshot)."""

import json

import pyarrow.parquet as pq
import pytest

from storage.exports import write_snapshot
from storage.items import AnswerRecord
from storage.store import Store


@pytest.fixture
def store(tmp_path):
    """v1 deployed from v0; v2 (from v1) rejected by its gate; v3 (from v1) deployed; v4 (from v3) a candidate.
    One item ranked at each version 0..4, one answer of each cut at max_new_tokens."""
    with Store.open(tmp_path / "data") as store:
        user, _, _ = store.users.add("alice", "annotator", "alice-password")
        prompts = store.prompts.add([f"Prompt {v}?" for v in range(5)]).prompt_ids
        for version, parent, status in [(1, 0, "candidate"), (2, 1, "rejected"), (3, 1, "candidate"),
                                        (4, 3, "candidate")]:
            store.versions.add(version, parent, "dpo", status, None, {}, {}, 0)
            if version in (1, 3):
                store.versions.deploy(version)
        for version in range(5):
            item = store.items.add(prompts[version], version, {}, [AnswerRecord(f"v{version} a", 2, "eos", -1.0),
                                                                   AnswerRecord(f"v{version} b", 2, "length", -1.0)])
            ids = [a.answer_id for a in item.answers]
            store.labels.add_ranking(item.item_id, user.user_id, ids, feedback={ids[1]: "down"})
        yield store


def staleness_by_version(path) -> dict[int, int | None]:
    table = pq.read_table(path).to_pydict()
    return dict(zip(table["policy_version"], table["staleness"], strict=True))


def test_staleness_counts_deployments_along_the_lineage_not_version_numbers(store, tmp_path):
    meta = write_snapshot(store, tmp_path / "snap", parent_version=3, base_model="tiny")
    # Serving v3 (lineage v3 <- v1 <- v0): the rejected v2 ages nobody; v4 (a child of v3) is as fresh as v3.
    expected = {0: 2, 1: 1, 2: 1, 3: 0, 4: 0}
    assert staleness_by_version(tmp_path / "snap" / "pairs.parquet") == expected
    assert staleness_by_version(tmp_path / "snap" / "unary.parquet") == expected
    assert meta["staleness_by_version"] == {str(v): s for v, s in expected.items()}
    pairs = pq.read_table(tmp_path / "snap" / "pairs.parquet").to_pydict()
    assert set(zip(pairs["chosen_finish_reason"], pairs["rejected_finish_reason"])) == {("eos", "length")}
    assert pq.read_table(tmp_path / "snap" / "unary.parquet").to_pydict()["finish_reason"] == ["length"] * 5

    kept = write_snapshot(store, tmp_path / "recent", parent_version=3, base_model="tiny", max_label_staleness=1)
    # Version numbers would have dropped v1 (3 - 1 = 2 > 1) and kept nothing older; lineage keeps v1 and v2.
    assert set(staleness_by_version(tmp_path / "recent" / "pairs.parquet")) == {1, 2, 3, 4}
    assert kept["counts"]["pairs"] == 4 and json.loads((tmp_path / "recent" / "meta.json").read_text()) == kept


def test_a_roll_back_makes_the_rolled_back_branch_count_from_where_it_left(store, tmp_path):
    store.versions.deploy(1)  # roll back from v3 to v1: lineage v1 <- v0
    write_snapshot(store, tmp_path / "snap", parent_version=1, base_model="tiny")
    assert staleness_by_version(tmp_path / "snap" / "pairs.parquet") == {0: 1, 1: 0, 2: 0, 3: 0, 4: 0}
