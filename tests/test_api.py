"""The REST contract, through a real server on a free port: every status code the contract names."""

from __future__ import annotations

import threading


def test_health_needs_no_token(server, api):
    body = api().get("/api/health").json()
    assert body == {"status": "ok", "policy_version": 0, "labels": 0}


def test_401_without_or_with_a_bad_token(server, api):
    assert api().get("/api/items/next").status_code == 401
    r = api(token="not-a-token").get("/api/items/next")
    assert r.status_code == 401 and "error" in r.json()


def test_204_when_nothing_waits(ann):
    assert ann.get("/api/items/next").status_code == 204


def test_next_item_is_reserved_and_stable(ctx, server, accounts, ann, sample_items, api):
    sample_items(2)
    first = ann.get("/api/items/next").json()
    assert set(first) == {"item_id", "prompt", "answers"}
    assert len(first["answers"]) == 4 and set(first["answers"][0]) == {"answer_id", "text"}
    assert ann.get("/api/items/next").json() == first  # a reload shows the same item, same order
    other = api("bob").get("/api/items/next").json()
    assert other["item_id"] != first["item_id"]  # reserved: not given to a second annotator (overlap 1)


def test_ranking_201_then_409_and_every_422(ctx, ann, sample_items):
    sample_items(1)
    item = ann.get("/api/items/next").json()
    ids = [a["answer_id"] for a in item["answers"]]
    url = f"/api/items/{item['item_id']}/ranking"
    bad_bodies = {
        "wrong count": {"ranking": ids[:3]},
        "repeated id": {"ranking": [ids[0], ids[0], ids[1], ids[2]]},
        "unknown answer": {"ranking": [*ids[:3], 999_999]},
        "strings": {"ranking": [str(i) for i in ids]},
        "missing field": {},
        "extra field": {"ranking": ids, "oops": 1},
    }
    for why, body in bad_bodies.items():
        r = ann.post(url, json=body)
        assert r.status_code == 422, why
        assert r.json()["error"], why
    r = ann.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert ctx.store.labels.total() == 0  # nothing written by any failed request
    assert ann.post(url, json={"ranking": ids}).status_code == 201
    r = ann.post(url, json={"ranking": ids})
    assert r.status_code == 409 and "already" in r.json()["error"]
    assert ann.post("/api/items/999999/ranking", json={"ranking": ids}).status_code == 404
    assert ctx.store.labels.counts().rankings == 1
    pairs = ctx.store.db.cursor().execute("SELECT count(*) FROM pairs").fetchone()[0]
    assert pairs == 6


def test_feedback_and_skip(ctx, ann, sample_items):
    sample_items(2)
    item = ann.get("/api/items/next").json()
    answer_id = item["answers"][0]["answer_id"]
    assert ann.post(f"/api/answers/{answer_id}/feedback", json={"value": "up"}).status_code == 201
    assert ann.post(f"/api/answers/{answer_id}/feedback", json={"value": "up"}).status_code == 409
    assert ann.post(f"/api/answers/{answer_id}/feedback", json={"value": "meh"}).status_code == 422
    assert ann.post("/api/answers/999999/feedback", json={"value": "up"}).status_code == 404
    assert ann.post(f"/api/items/{item['item_id']}/skip", json={"reason": "can't judge"}).status_code == 201
    assert ann.post(f"/api/items/{item['item_id']}/skip").status_code == 409
    nxt = ann.get("/api/items/next").json()
    assert nxt["item_id"] != item["item_id"]  # a skipped item does not come back
    assert ann.post(f"/api/items/{nxt['item_id']}/skip").status_code == 201  # the body is optional


def test_prompts_need_an_admin(ctx, ann, boss):
    r = ann.post("/api/prompts", json={"prompts": ["Name a prime."]})
    assert r.status_code == 403 and "admin" in r.json()["error"]
    before = ctx.store.prompts.count()
    r = boss.post("/api/prompts", json={"prompts": ["Name a prime.", "Name a prime.", "Why is the sky blue?"]})
    assert r.status_code == 201
    body = r.json()
    assert body["added"] + body["duplicates"] == 3 and body["duplicates"] >= 1
    assert ctx.store.prompts.count() == before + body["added"]


def test_bad_prompts_write_nothing(ctx, boss):
    before = ctx.store.prompts.count()
    for prompts in (["fine", "   "], ["x" * 1_000_000], [3]):
        r = boss.post("/api/prompts", json={"prompts": prompts})
        assert r.status_code == 422, prompts
    huge = boss.post("/api/prompts", json={"prompts": ["y" * 3_000_000]})
    assert huge.status_code == 413
    assert ctx.store.prompts.count() == before


def test_admin_creates_users_and_exports(ctx, ann, boss, server, sample_items, api):
    r = boss.post("/api/users", json={"name": "cleo", "role": "annotator"})
    assert r.status_code == 201
    token = r.json()["token"]
    assert api(token=token).get("/api/me").json() == {"name": "cleo", "role": "annotator"}
    assert ann.post("/api/users", json={"name": "eve", "role": "admin"}).status_code == 403
    sample_items(1)
    item = ann.get("/api/items/next").json()
    ann.post(f"/api/items/{item['item_id']}/ranking", json={"ranking": [a["answer_id"] for a in item["answers"]]})
    r = boss.get("/api/export", params={"format": "dpo"})
    lines = [line for line in r.text.splitlines() if line]
    assert r.status_code == 200 and len(lines) == 6
    assert ann.get("/api/export", params={"format": "dpo"}).status_code == 403
    assert boss.get("/api/export", params={"format": "csv"}).status_code == 422


def test_generate_answers_from_the_deployed_version(ann):
    r = ann.post("/api/generate", json={"prompt": "Say hi", "max_new_tokens": 5})
    assert r.status_code == 200
    assert r.json()["version"] == 0 and isinstance(r.json()["text"], str)
    assert ann.post("/api/generate", json={"prompt": "hi", "version": 42}).status_code == 404
    assert ann.post("/api/generate", json={"prompt": "hi", "max_new_tokens": 100_000}).status_code == 422


def test_generate_shares_the_demo_limit(ctx, ann):
    for _ in range(ctx.generation_slots.size):
        ctx.generation_slots.acquire()
    try:
        r = ann.post("/api/generate", json={"prompt": "hi", "max_new_tokens": 2})
        assert r.status_code == 429 and "busy" in r.json()["error"] and r.headers["retry-after"]
    finally:
        for _ in range(ctx.generation_slots.size):
            ctx.generation_slots.release()
    assert ann.post("/api/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200


def test_generate_batch_answers_every_prompt_n_times_for_admins_only(ctx, boss, ann):
    body = {"prompts": ["Say hi", "Name a colour", "Count to three"], "n": 2, "max_new_tokens": 3}
    r = boss.post("/api/generate/batch", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["version"] == 0 and len(out["answers"]) == 3
    for item in out["answers"]:
        assert len(item) == 2
        for a in item:
            assert isinstance(a["text"], str) and a["finish_reason"] in ("eos", "length")
            assert 0 <= a["token_count"] <= 3 and (a["finish_reason"] == "eos" or a["token_count"] == 3)
    r = ann.post("/api/generate/batch", json=body)
    assert r.status_code == 403 and "admin" in r.json()["error"]
    assert boss.post("/api/generate/batch", json={**body, "version": 42}).status_code == 404
    too_many = boss.post("/api/generate/batch", json={"prompts": ["hi"] * 11, "n": 3})
    assert too_many.status_code == 422 and "33 answers" in too_many.json()["error"]
    for bad in ({"prompts": []}, {"prompts": [""]}, {"prompts": ["hi"], "n": 0}, {"prompt": "hi"},
                {"prompts": ["hi"], "max_new_tokens": 100_000}):
        assert boss.post("/api/generate/batch", json=bad).status_code == 422, bad
    for _ in range(ctx.generation_slots.size):
        ctx.generation_slots.acquire()
    try:
        r = boss.post("/api/generate/batch", json=body)
        assert r.status_code == 429 and r.headers["retry-after"]
    finally:
        for _ in range(ctx.generation_slots.size):
            ctx.generation_slots.release()


def test_openapi_documents_the_api(server, api):
    spec = api().get("/api/openapi.json").json()
    for path in ("/api/items/next", "/api/items/{item_id}/ranking", "/api/answers/{answer_id}/feedback",
                 "/api/items/{item_id}/skip", "/api/prompts", "/api/health"):
        assert path in spec["paths"]


def test_concurrent_annotators_every_acknowledged_label_stored_once(ctx, server, accounts, sample_items, api):
    sample_items(24)
    tokens = [ctx.store.users.add(f"worker{i}", "annotator", f"worker{i}-password")[2] for i in range(8)]
    acknowledged: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def work(token: str) -> None:
        with api(token=token) as c:
            while True:
                r = c.get("/api/items/next")
                if r.status_code == 204:
                    return
                item = r.json()
                r = c.post(f"/api/items/{item['item_id']}/ranking",
                           json={"ranking": [a["answer_id"] for a in item["answers"]]})
                with lock:
                    if r.status_code == 201:
                        acknowledged.append(r.json()["ranking_id"])
                    else:
                        errors.append(r.text)

    threads = [threading.Thread(target=work, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert len(acknowledged) == 24
    stored = [r[0] for r in ctx.store.db.cursor().execute("SELECT ranking_id FROM rankings").fetchall()]
    assert sorted(stored) == sorted(acknowledged)
