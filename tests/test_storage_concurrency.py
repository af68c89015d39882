"""Many threads, a killed process, a second process: every acknowledged label is stored exactly once, committed
labels survive SIGKILL, and a held file is refused with a message that says why."""

import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import storage
from storage.db import Database
from storage.errors import Conflict, DataDirBusy, StorageError
from storage.items import AnswerRecord
from storage.store import Store

REPO = Path(storage.__file__).resolve().parents[1]
THREADS, ITEMS = 8, 25


def run_python(code: str, *args: str) -> subprocess.Popen:
    """A child Python process running `code` from the repository root, its stdout a pipe we read line by line."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, stdout=subprocess.PIPE, text=True
    )


def test_write_rolls_back_on_error_and_does_not_nest(tmp_path):
    db = Database(tmp_path / "x.duckdb")
    with pytest.raises(RuntimeError), db.write() as cur:
        cur.execute("INSERT INTO settings VALUES ('k', 'v')")
        raise RuntimeError("the caller failed half-way")
    assert db.cursor().execute("SELECT count(*) FROM settings").fetchone()[0] == 0
    with db.write(), pytest.raises(StorageError, match="does not nest"), db.write():
        pass
    db.close()


def test_eight_threads_labelling_at_once_store_each_label_exactly_once(tmp_path):
    store = Store.open(tmp_path)
    users = [store.users.add(f"annotator{n}", "annotator", password="password")[0] for n in range(THREADS)]
    prompt_ids = store.prompts.add([f"Question {n}?" for n in range(ITEMS)]).prompt_ids
    items = [
        store.items.add(p, 0, {}, [AnswerRecord(f"answer {k}", 5, "eos", -2.0) for k in range(4)]) for p in prompt_ids
    ]
    acknowledged: dict[str, list[int]] = {"rankings": [], "feedback": [], "skips": []}
    conflicts = []
    errors = []
    start = threading.Barrier(THREADS + 1)
    lock = threading.Lock()

    def annotate(user_id: int) -> None:
        mine: dict[str, list[int]] = {"rankings": [], "feedback": [], "skips": []}
        try:
            start.wait()
            for n, item in enumerate(items):
                answers = [a.answer_id for a in item.answers]
                if n % 5 == 4:
                    mine["skips"].append(store.labels.add_skip(item.item_id, user_id))
                    continue
                ranking = answers[n % 4:] + answers[: n % 4]
                mine["rankings"].append(
                    store.labels.add_ranking(item.item_id, user_id, ranking, seconds=1.0, feedback={ranking[0]: "up"})
                )
                mine["feedback"].append(store.labels.add_feedback(ranking[-1], user_id, "down"))
                store.items.waiting(user_id, [0], overlap=THREADS)  # reads interleaved with everyone's writes
                try:  # a double submit (a retried request) must be refused, not stored twice
                    store.labels.add_ranking(item.item_id, user_id, ranking)
                except Conflict:
                    with lock:
                        conflicts.append(item.item_id)
        except BaseException as e:  # noqa: BLE001 - collected and re-raised in the main thread below
            errors.append(e)
        with lock:
            for table, ids in mine.items():
                acknowledged[table] += ids

    threads = [threading.Thread(target=annotate, args=(user.user_id,)) for user in users]
    for thread in threads:
        thread.start()
    start.wait()
    for thread in threads:
        thread.join()
    assert not errors, errors

    cur = store.db.cursor()
    rankings = [r for (r,) in cur.execute("SELECT ranking_id FROM rankings").fetchall()]
    skips = [s for (s,) in cur.execute("SELECT skip_id FROM skips").fetchall()]
    feedback_alone = [f for (f,) in cur.execute("SELECT feedback_id FROM feedback WHERE ranking_id IS NULL").fetchall()]
    ranked_per_user = ITEMS - ITEMS // 5
    assert sorted(rankings) == sorted(acknowledged["rankings"]) and len(set(rankings)) == THREADS * ranked_per_user
    assert sorted(skips) == sorted(acknowledged["skips"]) and len(skips) == THREADS * (ITEMS // 5)
    assert sorted(feedback_alone) == sorted(acknowledged["feedback"])
    assert len(conflicts) == THREADS * ranked_per_user
    assert cur.execute("SELECT count(*) FROM feedback").fetchone()[0] == 2 * THREADS * ranked_per_user
    assert cur.execute("SELECT count(*) FROM ranking_answers").fetchone()[0] == 4 * THREADS * ranked_per_user
    assert cur.execute("SELECT count(*) FROM pairs").fetchone()[0] == 6 * THREADS * ranked_per_user
    store.close()


LABELLER = """
    import sys
    from pathlib import Path
    from storage.items import AnswerRecord
    from storage.store import Store

    store = Store(Path(sys.argv[1]))
    user, _, _ = store.users.add("alice", "annotator", password="password")
    for n in range(100_000):
        prompt_id = store.prompts.add([f"Question {n}?"]).prompt_ids[0]
        item = store.items.add(prompt_id, 0, {}, [AnswerRecord(f"a{k}", 3, "eos", -1.0) for k in range(3)])
        ranking_id = store.labels.add_ranking(item.item_id, user.user_id, [a.answer_id for a in item.answers])
        print(ranking_id, flush=True)  # only after add_ranking returned, i.e. after COMMIT
"""


def test_acknowledged_labels_survive_sigkill(tmp_path):
    path = tmp_path / "prefloop.duckdb"
    child = run_python(LABELLER, str(path))
    printed = []
    try:
        while len(printed) < 30:
            line = child.stdout.readline()
            assert line, "the labelling process exited early"
            printed.append(int(line))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    with Store(path) as store:
        cur = store.db.cursor()
        stored = {r for (r,) in cur.execute("SELECT ranking_id FROM rankings").fetchall()}
        assert set(printed) <= stored
        # Each ranking is whole: the transaction that wrote it also wrote its 3 ranked answers.
        ranks = cur.execute("SELECT ranking_id, count(*) FROM ranking_answers GROUP BY ranking_id").fetchall()
        assert dict(ranks) == {ranking_id: 3 for ranking_id in stored}


HOLDER = """
    import sys, time
    from pathlib import Path
    from storage.store import Store

    store = Store.open(Path(sys.argv[1]))
    print("open", flush=True)
    time.sleep(60)
"""


def test_a_file_held_by_another_process_raises_data_dir_busy(tmp_path):
    child = run_python(HOLDER, str(tmp_path))
    try:
        assert child.stdout.readline() == "open\n"
        with pytest.raises(DataDirBusy) as caught:
            Store.open(tmp_path)
        message = str(caught.value)
        assert str(tmp_path / "prefloop.duckdb") in message
        assert "prefloop serve" in message
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    with Store.open(tmp_path) as store:  # the lock goes with the process
        assert store.users.count() == 0
