"""The schema, as an ordered list of named migrations recorded in `_migrations` (the pattern of simonw/llm's
migrations.py). Never edit or reorder a migration that has shipped: append a new one.

Label tables are append-only. Integrity between tables (a ranking's answers belong to its item ...) is checked by
the code that writes them, under the write lock; the UNIQUE constraints below are the last line of defence.
No FOREIGN KEYs: DuckDB implements some UPDATEs as delete + insert, which trips foreign keys on rows we do update
(users, versions), and every writer already checks the ids it stores.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from storage.errors import Conflict

if TYPE_CHECKING:
    from storage.db import Cursor, Database

Migration = Callable[["Cursor"], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    """Register `fn` as the next migration; its function name is what `_migrations` records."""
    MIGRATIONS.append(fn)
    return fn


def applied(db: Database) -> list[str]:
    """Names of the migrations applied to `db`, in the order they ran."""
    rows = db.cursor().execute("SELECT name FROM _migrations ORDER BY applied_order").fetchall()
    return [name for (name,) in rows]


def migrate(db: Database) -> list[str]:
    """Apply every migration not yet applied, each in its own transaction; returns the names it applied."""
    with db.write() as cur:
        cur.execute(
            "CREATE TABLE IF NOT EXISTS _migrations ("
            " name VARCHAR PRIMARY KEY, applied_order INTEGER NOT NULL, applied_at TIMESTAMPTZ NOT NULL)"
        )
    done = set(applied(db))
    ran = []
    for fn in MIGRATIONS:
        if fn.__name__ in done:
            continue
        with db.write() as cur:
            fn(cur)
            cur.execute(
                "INSERT INTO _migrations VALUES (?, (SELECT count(*) FROM _migrations), ?)",
                [fn.__name__, datetime.now(UTC)],
            )
        ran.append(fn.__name__)
    return ran


@migration
def m001_users(cur: Cursor) -> None:
    cur.execute("CREATE SEQUENCE users_seq START 1")
    cur.execute("""
        CREATE TABLE users (
            user_id       BIGINT PRIMARY KEY DEFAULT nextval('users_seq'),
            name          VARCHAR NOT NULL UNIQUE,
            role          VARCHAR NOT NULL,
            password_hash VARCHAR NOT NULL,  -- scrypt$n$r$p$salt$hash, never the password
            token_hash    VARCHAR NOT NULL,  -- sha256 of the API token, never the token
            disabled      BOOLEAN NOT NULL DEFAULT false,
            created_at    TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
        )""")


@migration
def m002_prompts(cur: Cursor) -> None:
    cur.execute("CREATE SEQUENCE prompts_seq START 1")
    cur.execute("""
        CREATE TABLE prompts (
            prompt_id  BIGINT PRIMARY KEY DEFAULT nextval('prompts_seq'),
            text       VARCHAR NOT NULL,  -- stripped; unique by the writer's check (an index on 20k-char keys is waste)
            source     VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
        )""")


@migration
def m003_items(cur: Cursor) -> None:
    cur.execute("CREATE SEQUENCE items_seq START 1")
    cur.execute("""
        CREATE TABLE items (
            item_id         BIGINT PRIMARY KEY DEFAULT nextval('items_seq'),
            prompt_id       BIGINT NOT NULL,
            policy_version  INTEGER NOT NULL,
            sampling_params JSON NOT NULL,
            created_at      TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
        )""")
    cur.execute("CREATE SEQUENCE answers_seq START 1")
    cur.execute("""
        CREATE TABLE answers (
            answer_id     BIGINT PRIMARY KEY DEFAULT nextval('answers_seq'),
            item_id       BIGINT NOT NULL,
            position      INTEGER NOT NULL,  -- order of generation; the UI shuffles
            text          VARCHAR NOT NULL,
            token_count   INTEGER NOT NULL,
            finish_reason VARCHAR NOT NULL,  -- 'eos' | 'length'
            logprob_sum   DOUBLE NOT NULL,   -- sum of token log-probs under the generating policy
            UNIQUE (item_id, position)
        )""")


@migration
def m004_labels(cur: Cursor) -> None:
    for table in ("rankings", "feedback", "skips", "flags"):
        cur.execute(f"CREATE SEQUENCE {table}_seq START 1")
    cur.execute("""
        CREATE TABLE rankings (
            ranking_id BIGINT PRIMARY KEY DEFAULT nextval('rankings_seq'),
            item_id    BIGINT NOT NULL,
            user_id    BIGINT NOT NULL,
            seconds    DOUBLE,  -- time the annotator spent on the item, when the client measured it
            created_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
            UNIQUE (item_id, user_id)
        )""")
    cur.execute("""
        CREATE TABLE ranking_answers (
            ranking_id BIGINT NOT NULL,
            rank       INTEGER NOT NULL,  -- 0 = best
            answer_id  BIGINT NOT NULL,
            PRIMARY KEY (ranking_id, rank)
        )""")
    cur.execute("""
        CREATE TABLE feedback (
            feedback_id BIGINT PRIMARY KEY DEFAULT nextval('feedback_seq'),
            answer_id   BIGINT NOT NULL,
            item_id     BIGINT NOT NULL,
            user_id     BIGINT NOT NULL,
            value       VARCHAR NOT NULL CHECK (value IN ('up', 'down')),
            ranking_id  BIGINT,  -- set when given together with a ranking
            created_at  TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
            UNIQUE (answer_id, user_id)
        )""")
    cur.execute("""
        CREATE TABLE skips (
            skip_id    BIGINT PRIMARY KEY DEFAULT nextval('skips_seq'),
            item_id    BIGINT NOT NULL,
            user_id    BIGINT NOT NULL,
            reason     VARCHAR,
            created_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
            UNIQUE (item_id, user_id)
        )""")
    cur.execute("""
        CREATE TABLE flags (
            flag_id    BIGINT PRIMARY KEY DEFAULT nextval('flags_seq'),
            item_id    BIGINT NOT NULL,
            user_id    BIGINT NOT NULL,
            reason     VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
        )""")


@migration
def m005_label_views(cur: Cursor) -> None:
    # Every ranking of K answers yields all C(K,2) pairs: each answer is preferred to every answer ranked below it.
    cur.execute("""
        CREATE VIEW pairs AS
        SELECT r.ranking_id, r.item_id, u.name AS annotator, r.user_id AS annotator_id, i.policy_version,
               i.prompt_id, p.text AS prompt,
               c.answer_id AS chosen_answer_id, ca.text AS chosen,
               j.answer_id AS rejected_answer_id, ja.text AS rejected,
               c.rank AS chosen_rank, j.rank AS rejected_rank, r.created_at
        FROM rankings r
        JOIN ranking_answers c ON c.ranking_id = r.ranking_id
        JOIN ranking_answers j ON j.ranking_id = r.ranking_id AND c.rank < j.rank
        JOIN answers ca ON ca.answer_id = c.answer_id
        JOIN answers ja ON ja.answer_id = j.answer_id
        JOIN items i ON i.item_id = r.item_id
        JOIN prompts p ON p.prompt_id = i.prompt_id
        JOIN users u ON u.user_id = r.user_id""")
    cur.execute("""
        CREATE VIEW unary AS
        SELECT f.feedback_id, f.answer_id, f.item_id, u.name AS annotator, i.policy_version,
               p.text AS prompt, a.text AS completion, f.value = 'up' AS label, f.created_at
        FROM feedback f
        JOIN answers a ON a.answer_id = f.answer_id
        JOIN items i ON i.item_id = f.item_id
        JOIN prompts p ON p.prompt_id = i.prompt_id
        JOIN users u ON u.user_id = f.user_id""")


@migration
def m006_versions(cur: Cursor) -> None:
    cur.execute("""
        CREATE TABLE versions (
            version     INTEGER PRIMARY KEY,  -- 0 = the base model
            parent      INTEGER,
            algorithm   VARCHAR NOT NULL,
            status      VARCHAR NOT NULL,     -- candidate | deployed | rejected | rolled_back
            path        VARCHAR,              -- the version directory (LoRA adapter ...); NULL for the base model
            config      JSON NOT NULL,
            metrics     JSON NOT NULL,
            labels_used INTEGER NOT NULL,
            reason      VARCHAR,              -- why rejected / rolled back
            created_at  TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
            deployed_at TIMESTAMPTZ
        )""")
    cur.execute("""
        INSERT INTO versions (version, parent, algorithm, status, path, config, metrics, labels_used, deployed_at)
        VALUES (0, NULL, 'base', 'deployed', NULL, '{}', '{}', 0, current_timestamp)""")


@migration
def m007_runs(cur: Cursor) -> None:
    cur.execute("CREATE SEQUENCE runs_seq START 1")
    cur.execute("""
        CREATE TABLE runs (
            run_id      BIGINT PRIMARY KEY DEFAULT nextval('runs_seq'),
            status      VARCHAR NOT NULL,  -- queued | running | succeeded | rejected | failed | cancelled
            algorithm   VARCHAR NOT NULL,
            config      JSON NOT NULL,
            progress    DOUBLE NOT NULL DEFAULT 0,  -- 0..1
            step        INTEGER,
            loss        DOUBLE,
            metrics     JSON NOT NULL DEFAULT '{}',
            version     INTEGER,           -- the version the run produced, once registered
            error       VARCHAR,
            created_at  TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
            started_at  TIMESTAMPTZ,
            finished_at TIMESTAMPTZ
        )""")
    cur.execute("""
        CREATE TABLE run_steps (
            run_id  BIGINT NOT NULL,
            step    INTEGER NOT NULL,
            loss    DOUBLE,
            metrics JSON NOT NULL,
            "at"    TIMESTAMPTZ NOT NULL DEFAULT current_timestamp  -- quoted: AT is a keyword
        )""")


@migration
def m008_settings(cur: Cursor) -> None:
    cur.execute("CREATE TABLE settings (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)")


@migration
def m009_user_names_unique_ignoring_case(cur: Cursor) -> None:
    # Issue 8: 'ADMIN' beside 'admin' let one account pass for another. Names stay as typed and login matches
    # them exactly; this index only forbids two names that differ in case alone.
    rows = cur.execute("""
        SELECT list(name ORDER BY user_id) FROM users GROUP BY lower(name) HAVING count(*) > 1
        ORDER BY min(user_id)""").fetchall()
    if rows:
        clashes = "; ".join(", ".join(repr(name) for name in names) for (names,) in rows)
        raise Conflict(
            "cannot make user names unique regardless of case: these names differ only in case: "
            f"{clashes}. Rename all but one of each group (e.g. in the duckdb shell: UPDATE users SET name = "
            "'alice2' WHERE name = 'Alice'), then open the data dir again; nothing was changed."
        )
    cur.execute("CREATE UNIQUE INDEX users_name_ignoring_case ON users (lower(name))")


@migration
def m010_canary(cur: Cursor) -> None:
    # Issue 9: a canary item mixes answers from the candidate and the serving version, so each answer records the
    # version that generated it (the item's policy_version stays the serving one: staleness and labels follow it).
    cur.execute("ALTER TABLE answers ADD COLUMN policy_version INTEGER")
    cur.execute("UPDATE answers SET policy_version = i.policy_version FROM items i WHERE i.item_id = answers.item_id")
    cur.execute("""
        CREATE TABLE canaries (
            version     INTEGER PRIMARY KEY,  -- the candidate under test (versions.status = 'canary' while active)
            serving     INTEGER NOT NULL,     -- the version it is compared with: the one serving when it started
            after_item  BIGINT NOT NULL,      -- items with a larger id were sampled while it ran
            decision    VARCHAR NOT NULL,     -- pending | promoted | rolled_back | undecided
            reason      VARCHAR,              -- who or what decided, or why it ended
            comparisons INTEGER,              -- the evidence at the decision (NULL while pending)
            win_rate    DOUBLE,
            ci_low      DOUBLE,
            ci_high     DOUBLE,
            started_at  TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
            decided_at  TIMESTAMPTZ
        )""")


@migration
def m011_suggestions(cur: Cursor) -> None:
    # Issue 8 item 4: prompts annotators send from the Demo wait here for an admin instead of entering the pool.
    cur.execute("CREATE SEQUENCE suggestions_seq START 1")
    cur.execute("""
        CREATE TABLE suggestions (
            suggestion_id BIGINT PRIMARY KEY DEFAULT nextval('suggestions_seq'),
            user_id       BIGINT NOT NULL,   -- who suggested it
            text          VARCHAR NOT NULL,  -- stripped, as it would enter the pool
            status        VARCHAR NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'rejected')),
            created_at    TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
            decided_by    BIGINT,            -- the admin who approved or rejected it
            decided_at    TIMESTAMPTZ,
            prompt_id     BIGINT             -- the pool prompt an approval added (or found there already)
        )""")


@migration
def m012_retractions(cur: Cursor) -> None:
    # Issue 11: an annotator may take back the ranking they just submitted (Undo). Labels stay append-only: a
    # retraction is a row of its own, and `rankings` / `feedback` become views that leave out retracted rankings and
    # the thumbs given with them, so every reader (the pairs and unary views, exports, snapshots, analytics, the
    # canary, the overlap count) respects a retraction without knowing of it. The rows live on in ranking_events /
    # feedback_events, which drop the UNIQUE (item, user) so the annotator can rank the item again: the writer
    # (storage/labels.py) checks uniqueness against the views, under the write lock. Only that writer inserts.
    cur.execute("CREATE SEQUENCE retractions_seq START 1")
    cur.execute("""
        CREATE TABLE retractions (
            retraction_id BIGINT PRIMARY KEY DEFAULT nextval('retractions_seq'),
            ranking_id    BIGINT NOT NULL UNIQUE,  -- a ranking is retracted at most once
            user_id       BIGINT NOT NULL,         -- who retracted it (its annotator)
            created_at    TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
        )""")
    cur.execute("""
        CREATE TABLE ranking_events (
            ranking_id BIGINT PRIMARY KEY DEFAULT nextval('rankings_seq'),
            item_id    BIGINT NOT NULL,
            user_id    BIGINT NOT NULL,
            seconds    DOUBLE,
            created_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
        )""")
    cur.execute("INSERT INTO ranking_events SELECT ranking_id, item_id, user_id, seconds, created_at FROM rankings")
    cur.execute("""
        CREATE TABLE feedback_events (
            feedback_id BIGINT PRIMARY KEY DEFAULT nextval('feedback_seq'),
            answer_id   BIGINT NOT NULL,
            item_id     BIGINT NOT NULL,
            user_id     BIGINT NOT NULL,
            value       VARCHAR NOT NULL CHECK (value IN ('up', 'down')),
            ranking_id  BIGINT,
            created_at  TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
        )""")
    cur.execute("INSERT INTO feedback_events SELECT feedback_id, answer_id, item_id, user_id, value, ranking_id, "
                "created_at FROM feedback")
    cur.execute("DROP TABLE rankings")
    cur.execute("DROP TABLE feedback")
    cur.execute("""
        CREATE VIEW rankings AS
        SELECT r.ranking_id, r.item_id, r.user_id, r.seconds, r.created_at FROM ranking_events r
        WHERE NOT EXISTS (SELECT 1 FROM retractions x WHERE x.ranking_id = r.ranking_id)""")
    cur.execute("""
        CREATE VIEW feedback AS
        SELECT f.feedback_id, f.answer_id, f.item_id, f.user_id, f.value, f.ranking_id, f.created_at
        FROM feedback_events f
        WHERE f.ranking_id IS NULL OR NOT EXISTS (SELECT 1 FROM retractions x WHERE x.ranking_id = f.ranking_id)""")


@migration
def m013_arena_votes(cur: Cursor) -> None:
    # Issue 11: the Demo's arena. One vote on two answers to one prompt from two versions shown as A and B (which is
    # which hidden until the vote): a preference label of its own kind, kept apart from the items' rankings (its
    # answers come from the Demo's settings, not from the item pipeline, so the learner does not train on them).
    cur.execute("CREATE SEQUENCE arena_votes_seq START 1")
    cur.execute("""
        CREATE TABLE arena_votes (
            vote_id         BIGINT PRIMARY KEY DEFAULT nextval('arena_votes_seq'),
            user_id         BIGINT NOT NULL,   -- who voted
            prompt          VARCHAR NOT NULL,
            version_a       INTEGER NOT NULL,  -- the version that answered on side A
            version_b       INTEGER NOT NULL,
            answer_a        VARCHAR NOT NULL,
            answer_b        VARCHAR NOT NULL,
            seed            BIGINT,            -- shared by both sides
            vote            VARCHAR NOT NULL CHECK (vote IN ('a', 'b', 'tie', 'both_bad')),
            created_at      TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
        )""")


@migration
def m014_prompt_removal(cur: Cursor) -> None:
    # Issue 11: an admin removes prompts from the pool (the starter prompts too). Soft: the row stays, so items, labels,
    # exports and snapshots of answers already sampled keep their prompt; a removed prompt is only never sampled again.
    cur.execute("ALTER TABLE prompts ADD COLUMN removed BOOLEAN NOT NULL DEFAULT false")
    cur.execute("ALTER TABLE prompts ADD COLUMN removed_at TIMESTAMPTZ")


@migration
def m015_run_phase_and_log(cur: Cursor) -> None:
    # Issue 11: a round you can watch. The phase it is in with its step x of total, and the lines its process writes
    # on stderr (a traceback...) or reports as warnings, kept per run (the newest RUN_LOG_LINES, storage/runs.py).
    cur.execute("ALTER TABLE runs ADD COLUMN phase VARCHAR")  # reward | rollouts | policy | eval
    cur.execute("ALTER TABLE runs ADD COLUMN phase_step INTEGER")
    cur.execute("ALTER TABLE runs ADD COLUMN phase_total INTEGER")
    cur.execute("""
        CREATE TABLE run_log (
            run_id BIGINT NOT NULL,
            line   VARCHAR NOT NULL,
            kind   VARCHAR NOT NULL DEFAULT 'log' CHECK (kind IN ('log', 'warning')),
            "at"   TIMESTAMPTZ NOT NULL DEFAULT current_timestamp  -- quoted: AT is a keyword
        )""")


@migration
def m016_ranking_ties(cur: Cursor) -> None:
    # Issue 9: an annotator may mark answers as equally good (a tie), and a ranking of answers that are all alike says
    # "no preference". A tie yields no pair: before this, a person with no preference had to order the answers anyway,
    # and that made-up order trained the reward model and the policy as if it were one (in the structured benchmark
    # 24 of 32 rankings were such noise). `tier` is the answer's place counting tied answers once (0 = best; equal
    # tiers = tied); `rank` stays the position in the submitted order (unique per ranking). Rankings stored before
    # this had no ties: tier = rank. The views that make pairs compare tiers.
    cur.execute("ALTER TABLE ranking_answers ADD COLUMN tier INTEGER")
    cur.execute("UPDATE ranking_answers SET tier = rank")
    cur.execute("""
        CREATE OR REPLACE VIEW pairs AS
        SELECT r.ranking_id, r.item_id, u.name AS annotator, r.user_id AS annotator_id, i.policy_version,
               i.prompt_id, p.text AS prompt,
               c.answer_id AS chosen_answer_id, ca.text AS chosen,
               j.answer_id AS rejected_answer_id, ja.text AS rejected,
               c.rank AS chosen_rank, j.rank AS rejected_rank, r.created_at
        FROM rankings r
        JOIN ranking_answers c ON c.ranking_id = r.ranking_id
        JOIN ranking_answers j ON j.ranking_id = r.ranking_id AND c.tier < j.tier
        JOIN answers ca ON ca.answer_id = c.answer_id
        JOIN answers ja ON ja.answer_id = j.answer_id
        JOIN items i ON i.item_id = r.item_id
        JOIN prompts p ON p.prompt_id = i.prompt_id
        JOIN users u ON u.user_id = r.user_id""")
