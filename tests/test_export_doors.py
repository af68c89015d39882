"""The export's doors: GET /api/export and `prefloop export`, directly and through a running server, with the
conversational default, the plain style and drop_truncated (the rows themselves: tests/test_storage_exports.py)."""

import json
import os
import subprocess
import sys

import pytest

from app.cli import main


@pytest.fixture
def ranked(ctx, ann, sample_items):
    """One item ranked by `ann` through the REST API; returns the item as served."""
    sample_items(1)
    item = ann.get("/api/items/next").json()
    ranking = [a["answer_id"] for a in item["answers"]]
    assert ann.post(f"/api/items/{item['item_id']}/ranking", json={"ranking": ranking}).status_code == 201
    return item


def rows(response) -> list[dict]:
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines() if line]


def cut_off(ctx) -> int:
    """How many DPO pairs of the store hold an answer cut off by max_new_tokens (the tiny model rarely stops)."""
    with ctx.store.db.reader() as cur:
        return cur.execute("""SELECT count(*) FROM pairs p JOIN answers c ON c.answer_id = p.chosen_answer_id
                              JOIN answers r ON r.answer_id = p.rejected_answer_id
                              WHERE 'length' IN (c.finish_reason, r.finish_reason)""").fetchone()[0]


def test_api_export_is_conversational_by_default(ranked, boss, ctx, accounts):
    dpo = rows(boss.get("/api/export", params={"format": "dpo"}))
    assert len(dpo) == 6
    assert dpo[0]["prompt"] == [{"role": "user", "content": ranked["prompt"]}]
    assert [m["role"] for m in dpo[0]["chosen"] + dpo[0]["rejected"]] == ["assistant", "assistant"]
    assert dpo[0]["chosen"][0]["content"] == ranked["answers"][0]["text"]
    ann_id = ctx.store.users.by_token(accounts["ann"][1]).user_id
    assert {(r["annotator_id"], r["policy_version"]) for r in dpo} == {(ann_id, 0)}
    assert {r["chosen_finish_reason"] for r in dpo} <= {"eos", "length"}


def test_api_export_plain_and_drop_truncated(ranked, boss, ctx):
    plain = rows(boss.get("/api/export", params={"format": "dpo", "style": "plain"}))
    assert plain[0]["prompt"] == ranked["prompt"] and isinstance(plain[0]["chosen"], str)
    kept = rows(boss.get("/api/export", params={"format": "dpo", "drop_truncated": "true"}))
    assert len(kept) == 6 - cut_off(ctx)
    assert all(r["chosen_finish_reason"] == r["rejected_finish_reason"] == "eos" for r in kept)


def test_api_export_refuses_an_unknown_style(ranked, boss):
    r = boss.get("/api/export", params={"format": "dpo", "style": "chatml"})
    assert r.status_code == 422 and "style" in r.json()["error"]


def test_cli_export_plain_and_drop_truncated(tmp_path, capsys):
    from storage.items import AnswerRecord
    from storage.store import Store

    data_dir = tmp_path / "data"
    with Store.open(data_dir) as store:
        user, _, _ = store.users.add("alice", "annotator", "alice-password")
        (prompt_id,) = store.prompts.add(["Hi?"]).prompt_ids
        item = store.items.add(prompt_id, 0, {}, [AnswerRecord("short", 1, "eos", -1.0),
                                                  AnswerRecord("cut", 9, "length", -1.0),
                                                  AnswerRecord("fine", 1, "eos", -1.0)])
        store.labels.add_ranking(item.item_id, user.user_id, [a.answer_id for a in item.answers])
    out = tmp_path / "dpo.jsonl"
    assert main(["export", "--format", "dpo", "--out", str(out), "--data-dir", str(data_dir)]) == 0
    assert json.loads(out.read_text().splitlines()[0])["prompt"] == [{"role": "user", "content": "Hi?"}]
    assert main(["export", "--format", "dpo", "--plain", "--drop-truncated", "--out", str(out),
                 "--data-dir", str(data_dir)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"prompt": "Hi?", "chosen": "short", "rejected": "fine", "chosen_finish_reason": "eos",
         "rejected_finish_reason": "eos", "policy_version": 0, "annotator_id": user.user_id,
         "ranking_id": 1, "item_id": item.item_id}]
    assert "wrote 1 dpo rows" in capsys.readouterr().out


def test_cli_export_flags_reach_a_running_server(ranked, ctx, server, tmp_path):
    from app.server import write_server_file

    write_server_file(ctx.config, server.url, ctx.local_token)
    out = tmp_path / "dpo-plain.jsonl"
    out_dpo = tmp_path / "dpo-kept.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for args in (["--format", "dpo", "--plain", "--drop-truncated", "--out", str(out_dpo)],
                 ["--format", "dpo", "--plain", "--out", str(out)]):
        done = subprocess.run([sys.executable, "-m", "app.cli", "export", *args, "--data-dir",
                               str(ctx.config.data_dir)], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr
    plain = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(plain) == 6 and plain[0]["prompt"] == ranked["prompt"]
    assert len(out_dpo.read_text().splitlines()) == 6 - cut_off(ctx)
