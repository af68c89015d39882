"""Issue 8 item 1: no annotator (or anonymous caller, or disabled user) gets through the Admin UI's door, and no
FileData payload makes the server copy a file from outside Gradio's upload folder or freeze.

A real server on a free port, with Gradio's upload cache in this test's own directory (GRADIO_TEMP_DIR), so what the
attacks leave there can be counted.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

LOGIN_TIMEOUT_S = 120  # a login runs scrypt on 2 shared cores; generous, never a timing assertion
HEALTH_TIMEOUT_S = 30  # /api/health must answer at all after the attacks; a frozen server never does
EVENT_TIMEOUT_S = 60  # every queued event must report completion (an error) on its stream


@pytest.fixture
def upload_cache(tmp_path, monkeypatch) -> Path:
    """Gradio's upload folder for this test only (read when the apps are built)."""
    folder = tmp_path / "gradio-cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder))
    return folder


@pytest.fixture
def door_server(ctx, accounts, upload_cache):
    from app.server import RunningServer, create_app

    running = RunningServer(create_app(ctx), "127.0.0.1", 0).start()
    yield running
    running.stop()


@pytest.fixture
def clients(door_server):
    made = []

    def make(name: str | None = None, token: str | None = None) -> httpx.Client:
        """A client logged in as `name` through the shared login form, or sending `token` as Bearer (neither:
        anonymous)."""
        headers = {"authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(base_url=door_server.url, timeout=LOGIN_TIMEOUT_S, headers=headers)
        made.append(client)
        if name:
            r = client.post("/ui/login", data={"username": name, "password": f"{name}-password"})
            assert r.status_code == 200, r.text
        return client

    yield make
    for client in made:
        client.close()


def file_data(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": "z.jsonl"}


def dependencies(client: httpx.Client, door: str) -> list[dict]:
    r = client.get(f"{door}/config")
    assert r.status_code == 200, r.text
    return r.json()["dependencies"]


def fn_index(client: httpx.Client, door: str, api_name: str) -> int:
    return next(d["id"] for d in dependencies(client, door) if d.get("api_name") == api_name)


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# Every kind of Gradio route, as (method, path, body): pages, config, info, queue and its stream, upload, files.
def gradio_routes(door: str, admin_fn: int) -> list[tuple[str, str, dict | None]]:
    join = {"data": [file_data("/dev/zero"), False], "fn_index": admin_fn, "session_hash": "x"}
    return [
        ("GET", f"{door}/", None),
        ("GET", f"{door}/config", None),
        ("GET", f"{door}/gradio_api/info", None),
        ("GET", f"{door}/gradio_api/info?all_endpoints=true", None),
        ("POST", f"{door}/gradio_api/queue/join", join),
        ("GET", f"{door}/gradio_api/queue/data?session_hash=x", None),
        ("POST", f"{door}/gradio_api/run/predict", {"data": [], "fn_index": admin_fn}),
        ("POST", f"{door}/gradio_api/upload", {"files": ("p.jsonl", b'{"prompt": "x"}\n')}),
        ("GET", f"{door}/gradio_api/file=/etc/passwd", None),
        ("GET", f"{door}/gradio_api/heartbeat/x", None),
        ("GET", f"{door}/gradio_api/startup-events", None),
        ("GET", f"{door}/theme.css", None),
        ("GET", f"{door}/gradio_api/user", None),
        ("GET", f"{door}/gradio_api/token", None),
        ("GET", f"{door}/assets/index.js", None),
    ]


def call(client: httpx.Client, method: str, path: str, body) -> httpx.Response:
    if method == "GET":
        return client.get(path)
    if "files" in (body or {}):
        return client.post(path, files=body)
    return client.post(path, json=body)


def test_the_admin_door_answers_401_or_403_to_everyone_but_enabled_admins(ctx, accounts, clients):
    prompts = ctx.store.prompts.count()
    boss = clients("boss")
    upload_fn = fn_index(boss, "/admin", "admin_upload_prompts")
    ctx.store.users.add("old-boss", "admin", "old-boss-password")
    old_boss = clients("old-boss")  # logged in while still an admin...
    ctx.store.users.set_disabled("old-boss", True)  # ...then disabled: the session is worth nothing now
    refused = {"anonymous": (clients(), 401), "annotator": (clients("ann"), 403), "disabled admin": (old_boss, 401),
               "annotator token": (clients(token=accounts["ann"][1]), 403),
               "bad token": (clients(token="not-a-token"), 401)}
    for who, (client, status) in refused.items():
        for method, path, body in gradio_routes("/admin", upload_fn):
            r = call(client, method, path, body)
            assert r.status_code == status, (who, method, path, r.status_code, r.text[:200])
    assert "admins only: 'ann' is an annotator" in clients("ann").get("/admin/config").json()["error"]
    # Enabled admins get through, by session or by API token.
    assert boss.get("/admin/").status_code == 200
    assert clients(token=accounts["boss"][1]).get("/admin/config").status_code == 200
    assert ctx.store.prompts.count() == prompts  # nothing was imported


def test_the_annotator_ui_has_no_admin_component_or_event(clients):
    config = clients("ann").get("/ui/config").json()
    names = {d.get("api_name") for d in config["dependencies"]}
    assert not {n for n in names if n and n.startswith("admin")}, names
    assert "pl-admin" not in json.dumps(config)
    assert not [c for c in config["components"] if c.get("type") in ("file", "uploadbutton")]


def test_file_payloads_copy_nothing_and_the_server_keeps_answering(ctx, accounts, clients, tmp_path, upload_cache):
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"prompt": "a file outside the upload folder"}\n')
    targets = ["/dev/zero", "/etc/shadow", str(ctx.config.data_dir / "prefloop.duckdb"), str(secret)]
    prompts = ctx.store.prompts.count()
    boss, ann = clients("boss"), clients("ann")
    ctx.store.users.add("gone", "annotator", "gone-password")
    gone = clients("gone")
    ctx.store.users.set_disabled("gone", True)
    upload_fn = fn_index(boss, "/admin", "admin_upload_prompts")
    before = files_in(upload_cache)

    for path in targets:
        for attacker in (ann, gone):  # the admin upload event, through the admin door: refused before Gradio
            r = attacker.post("/admin/gradio_api/queue/join",
                              json={"data": [file_data(path), False], "fn_index": upload_fn, "session_hash": "x"})
            assert r.status_code in (401, 403), r.text
        # Every event of the annotator UI, with the file in every input: Gradio must refuse the path itself.
        events = dependencies(ann, "/ui")
        session = f"attack-{len(path)}"
        for dep in events:
            payload = {"data": [file_data(path)] * len(dep["inputs"]), "fn_index": dep["id"], "session_hash": session}
            r = ann.post("/ui/gradio_api/queue/join", json=payload)
            assert r.status_code == 200, r.text
        outcomes = read_stream(ann, "/ui", session, expected=len(events))
        assert len(outcomes) == len(events), outcomes
        health = httpx.get(f"{ann.base_url}/api/health", timeout=HEALTH_TIMEOUT_S)
        assert health.status_code == 200

    assert files_in(upload_cache) == before  # nothing was copied into the upload cache
    assert ctx.store.prompts.count() == prompts


def read_stream(client: httpx.Client, door: str, session: str, expected: int) -> list[dict]:
    """The completion messages of `expected` queued events, read from the queue's event stream."""
    done = []
    with client.stream("GET", f"{door}/gradio_api/queue/data", params={"session_hash": session},
                       timeout=EVENT_TIMEOUT_S) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            message = json.loads(line[5:])
            if message.get("msg") == "process_completed":
                done.append(message)
            if len(done) == expected or message.get("msg") == "close_stream":
                break
    return done


def test_uploads_are_capped_and_the_annotator_ui_takes_none(clients, upload_cache):
    from app.web_guard import UploadPolicy

    boss, ann = clients("boss"), clients("ann")
    r = ann.post("/ui/gradio_api/upload", files={"files": ("p.jsonl", b'{"prompt": "x"}\n')})
    assert r.status_code == 403 and "takes no files" in r.json()["error"]
    too_big = b"x" * (UploadPolicy().max_file_bytes + 1)
    r = boss.post("/admin/gradio_api/upload", files={"files": ("big.jsonl", too_big)})
    assert r.status_code == 413, r.text
    assert not [f for f in files_in(upload_cache) if f.endswith("big.jsonl")]
    r = boss.post("/admin/gradio_api/upload", files={"files": ("p.jsonl", b'{"prompt": "x"}\n')})
    assert r.status_code == 200 and Path(r.json()[0]).is_relative_to(upload_cache)
    # Event payloads are small: a 2 MiB one is refused at the door, before Gradio parses it.
    huge = {"data": ["y" * (2 * 1024 * 1024)], "fn_index": 0, "session_hash": "x"}
    assert ann.post("/ui/gradio_api/queue/join", json=huge).status_code == 413


def test_disabling_a_user_closes_both_doors_at_once(ctx, clients):
    boss = clients("boss")
    assert boss.get("/ui/config").status_code == 200 and boss.get("/admin/config").status_code == 200
    ctx.store.users.set_disabled("boss", True)
    assert boss.get("/ui/config").status_code == 401 and boss.get("/admin/config").status_code == 401
    ctx.store.users.set_disabled("boss", False)  # the old session stays ended: log in again
    assert boss.get("/ui/config").status_code == 401
    assert clients("boss").get("/admin/config").status_code == 200


def test_disabled_then_enabled_at_once_the_old_session_stays_ended(accounts, clients):
    ann, admin = clients("ann"), clients(token=accounts["boss"][1])
    assert ann.get("/ui/config").status_code == 200
    assert admin.post("/api/users/ann/disable").status_code == 200  # no request from ann's browser in between...
    assert admin.post("/api/users/ann/enable").status_code == 200
    assert ann.get("/ui/config").status_code == 401  # ...and still her session ended with the disabling


def test_logout_ends_this_session_only(clients):
    first, second = clients("ann"), clients("ann")
    r = first.get("/ui/logout")
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    assert first.get("/ui/config").status_code == 401
    assert second.get("/ui/config").status_code == 200
