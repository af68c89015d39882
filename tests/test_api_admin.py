"""The Admin tab's actions through REST: users, settings, roll back."""

from __future__ import annotations


def test_users_list_disable_and_enable(server, boss, accounts, api):
    names = {u["name"]: u for u in boss.get("/api/users").json()}
    assert names["ann"] == {"name": "ann", "role": "annotator", "disabled": False}
    assert boss.post("/api/users/ann/disable").status_code == 200
    ann = api("ann")
    assert ann.get("/api/items/next").status_code == 401
    assert boss.post("/api/users/ann/disable", json={"disabled": False}).status_code == 200
    assert ann.get("/api/items/next").status_code == 401  # disabling revoked the token for good (issue 8 item 5)
    token = boss.post("/api/users/ann/token").json()["token"]
    assert api(token=token).get("/api/items/next").status_code == 204
    assert boss.post("/api/users/boss/disable").status_code == 409
    assert boss.post("/api/users/nobody/disable").status_code == 404


def test_settings_round_trip_and_validation(ctx, boss):
    r = boss.patch("/api/settings", json={"overlap": 2, "guidelines": "Be <b>kind</b>.",
                                          "auto_train": {"every_labels": 50, "every_minutes": 0,
                                                         "config": {"algorithm": "kto"}}})
    assert r.status_code == 200, r.text
    body = boss.get("/api/settings").json()
    assert body["overlap"] == 2 and ctx.buffer.config.overlap == 2
    assert body["guidelines"] == "Be <b>kind</b>."
    assert body["auto_train"] == {"every_labels": 50, "every_minutes": 0, "config": {"algorithm": "kto"}}
    before = boss.get("/api/settings").json()
    bad = [{"overlap": 0}, {"auto_train": {"every_labels": 5, "every_minutes": 0, "config": {"betta": 1}}},
           {"guidelines": ""}, {"nonsense": 1}]
    for body in bad:
        r = boss.patch("/api/settings", json=body)
        assert r.status_code == 422, body
    assert boss.get("/api/settings").json() == before


def test_roll_back_deploys_the_parent(ctx, boss, add_version):
    v1 = add_version()
    boss.post(f"/api/versions/{v1}/deploy")
    r = boss.post("/api/versions/rollback", json={"reason": "worse answers"})
    assert r.json() == {"version": 0, "rolled_back": v1}
    assert boss.get("/api/health").json()["policy_version"] == 0
    v = {x["version"]: x for x in boss.get("/api/versions").json()}[v1]
    assert v["status"] == "rolled_back" and v["reason"] == "worse answers"
    assert boss.post("/api/versions/rollback").status_code == 409  # the base model has no parent
