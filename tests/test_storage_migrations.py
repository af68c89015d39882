"""The schema: an empty file migrates to every table and view, and migrating again changes nothing."""

from storage.db import Database
from storage.migrations import MIGRATIONS, applied, migrate
from storage.store import Store

TABLES = {
    "_migrations", "users", "prompts", "items", "answers", "ranking_events", "ranking_answers", "feedback_events",
    "skips", "flags", "versions", "runs", "run_steps", "settings", "canaries",
    "suggestions", "retractions", "arena_votes", "run_log",
}


def test_migrating_an_empty_file_creates_the_schema(tmp_path):
    db = Database(tmp_path / "empty.duckdb")
    cur = db.cursor()
    tables = {name for (name,) in cur.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    views = {name for (name,) in cur.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert tables == TABLES
    assert views == {"pairs", "unary", "rankings", "feedback"}  # rankings / feedback leave retracted ones out
    assert applied(db) == [fn.__name__ for fn in MIGRATIONS]
    assert applied(db)[0] == "m001_users"
    pairs_columns = [name for (name,) in cur.execute("SELECT column_name FROM (DESCRIBE pairs)").fetchall()]
    assert pairs_columns == [
        "ranking_id", "item_id", "annotator", "annotator_id", "policy_version", "prompt_id", "prompt",
        "chosen_answer_id", "chosen", "rejected_answer_id", "rejected", "chosen_rank", "rejected_rank", "created_at",
    ]
    unary_columns = cur.execute("SELECT column_name, column_type FROM (DESCRIBE unary)").fetchall()
    assert [name for name, _ in unary_columns] == [
        "feedback_id", "answer_id", "item_id", "annotator", "policy_version", "prompt", "completion", "label",
        "created_at",
    ]
    assert dict(unary_columns)["label"] == "BOOLEAN"
    prompt_columns = [name for (name,) in cur.execute("SELECT column_name FROM (DESCRIBE prompts)").fetchall()]
    assert prompt_columns[-2:] == ["removed", "removed_at"]  # soft removal (m014)
    run_columns = [name for (name,) in cur.execute("SELECT column_name FROM (DESCRIBE runs)").fetchall()]
    assert run_columns[-3:] == ["phase", "phase_step", "phase_total"]  # where a round is (m015)
    db.close()


def test_migrating_twice_is_a_no_op(tmp_path):
    path = tmp_path / "twice.duckdb"
    db = Database(path)
    first = db.cursor().execute("SELECT name, applied_at FROM _migrations ORDER BY applied_order").fetchall()
    assert migrate(db) == []
    db.close()
    db = Database(path)  # reopening migrates again
    assert db.cursor().execute("SELECT name, applied_at FROM _migrations ORDER BY applied_order").fetchall() == first
    db.close()


def test_the_base_model_is_version_0_and_deployed(tmp_path):
    with Store.open(tmp_path) as store:
        assert (tmp_path / "prefloop.duckdb").exists()
        base = store.versions.deployed()
        assert (base.version, base.status, base.algorithm, base.parent) == (0, "deployed", "base", None)
        assert store.versions.next_number() == 1
