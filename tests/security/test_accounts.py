"""Issue 8 items 2 and 5, accounts: 8-character passwords by every door, names unique regardless of case, password
reset and token rotation (CLI on the file and through a running server, REST, Admin tab), disabling revokes the token
for good, self-service password change needs the current password.

Each test reproduces what the attack report did against commit 4ca63a6 and asserts what must hold now.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from app.cli import main
from app.ui import admin
from storage.errors import Conflict, InvalidValue
from storage.store import Store

SHORT = "pw"  # what the report set through the Admin tab and the CLI: a 2-character password was accepted


def password_hash(ctx, name: str) -> str:
    return ctx.store.db.cursor().execute("SELECT password_hash FROM users WHERE name = ?", [name]).fetchone()[0]


def cli(data_dir, *args, **kwargs) -> subprocess.CompletedProcess:
    """The CLI in another process, as an operator runs it next to a server."""
    return subprocess.run([sys.executable, "-m", "app.cli", *args, "--data-dir", str(data_dir)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kwargs)


@pytest.fixture
def held(ctx, server):
    """The data dir held by a running server, with its server.json (URL + local admin token) written."""
    from app.server import write_server_file

    write_server_file(ctx.config, server.url, ctx.local_token)
    return ctx


# -- minimum password length ------------------------------------------------------------------------------------
def test_a_short_password_is_refused_by_the_cli_on_the_file(tmp_path, capsys):
    data = str(tmp_path / "data")
    Store.open(tmp_path / "data").close()  # the CLI refuses a data dir that holds no store
    assert main(["users", "add", "eve", "--password", "x", "--data-dir", data]) == 1
    assert capsys.readouterr().err.strip() == "prefloop: password must be at least 8 characters, got 1"
    assert main(["users", "add", "alice", "--password", "correct horse", "--data-dir", data]) == 0
    assert main(["users", "passwd", "alice", "--password", "abc", "--data-dir", data]) == 1
    assert capsys.readouterr().err.strip() == "prefloop: password must be at least 8 characters, got 3"
    assert main(["users", "token", "alice", "--data-dir", data]) == 1  # tokens are hashed: nothing to show
    assert "--rotate` issues a new one" in capsys.readouterr().err
    with Store.open(tmp_path / "data") as store:
        assert [u.name for u in store.users.list()] == ["alice"]
        assert store.users.verify_password("alice", "correct horse") is not None


def test_a_short_password_is_refused_by_rest(ctx, boss, ann, accounts):
    before = password_hash(ctx, "ann")
    for url, body in [("/api/users", {"name": "eve", "password": SHORT}),
                      ("/api/users/ann/password", {"password": SHORT})]:
        r = boss.post(url, json=body)
        assert r.status_code == 422 and r.json() == {"error": "password must be at least 8 characters, got 2"}
    r = ann.post("/api/me/password", json={"current_password": "ann-password", "new_password": SHORT})
    assert r.status_code == 422 and r.json() == {"error": "password must be at least 8 characters, got 2"}
    assert ctx.store.users.get("eve") is None and password_hash(ctx, "ann") == before


def test_a_short_password_is_refused_by_the_admin_tab(ctx, accounts):
    before = password_hash(ctx, "ann")
    with pytest.raises(InvalidValue, match="^password must be at least 8 characters, got 2$"):
        admin.add_user(ctx, "boss", "eve", "annotator", SHORT)
    with pytest.raises(InvalidValue, match="^password must be at least 8 characters, got 2$"):
        admin.reset_password(ctx, "boss", "ann", SHORT)
    assert ctx.store.users.get("eve") is None and password_hash(ctx, "ann") == before
    generated = admin.reset_password(ctx, "boss", "ann", "").text.splitlines()[-1].removeprefix("password: ")
    assert len(generated) >= 16 and ctx.store.users.verify_password("ann", generated) is not None


# -- names unique regardless of case ----------------------------------------------------------------------------
def test_a_name_differing_only_in_case_is_refused_everywhere(ctx, boss, accounts, tmp_path, capsys):
    r = boss.post("/api/users", json={"name": "BOSS", "role": "admin"})
    assert r.status_code == 409
    assert r.json()["error"] == "a user named 'BOSS' already exists as 'boss' (names are unique regardless of case)"
    with pytest.raises(Conflict, match="already exists as 'ann'"):
        admin.add_user(ctx, "boss", "Ann", "admin", None)
    assert [u.name for u in ctx.store.users.list()] == ["boss", "ann", "bob"]
    data = str(tmp_path / "other")
    Store.open(tmp_path / "other").close()  # the CLI refuses a data dir that holds no store
    assert main(["users", "add", "admin", "--role", "admin", "--data-dir", data]) == 0
    assert main(["users", "add", "ADMIN", "--role", "admin", "--data-dir", data]) == 1
    assert "already exists as 'admin'" in capsys.readouterr().err


def test_login_matches_the_name_exactly(ctx, accounts):
    assert ctx.authenticate_password("boss", "boss-password").name == "boss"
    assert ctx.authenticate_password("BOSS", "boss-password") is None


# -- token rotation and disabling -------------------------------------------------------------------------------
def test_a_rotated_token_stops_working_at_once(api, boss, accounts):
    old = api("ann")
    assert old.get("/api/me").status_code == 200
    r = boss.post("/api/users/ann/token")
    assert r.status_code == 200 and r.json()["name"] == "ann"
    assert old.get("/api/me").status_code == 401
    assert api(token=r.json()["token"]).get("/api/me").json() == {"name": "ann", "role": "annotator"}


def test_disabling_revokes_the_token_and_enabling_does_not_restore_it(api, boss, accounts):
    old = api("ann")
    assert boss.post("/api/users/ann/disable").json() == {"name": "ann", "disabled": True}
    assert old.get("/api/me").status_code == 401
    assert boss.post("/api/users/ann/enable").json() == {"name": "ann", "disabled": False}
    assert old.get("/api/me").status_code == 401  # the report: re-enabling restored the old token
    assert boss.post("/api/users/ann/disable", json={"disabled": False}).status_code == 200  # the older spelling
    assert old.get("/api/me").status_code == 401
    new = boss.post("/api/users/ann/token").json()["token"]
    assert api(token=new).get("/api/me").status_code == 200


def test_disabled_users_are_reported_disabled_by_the_store(ctx, accounts):
    """The UI guard ends a disabled user's Gradio sessions by looking each request's user up with `get`."""
    admin.set_user_disabled(ctx, "boss", "ann", True)
    assert ctx.store.users.get("ann").disabled
    assert ctx.store.users.by_token(accounts["ann"][1]) is None
    assert ctx.authenticate_password("ann", "ann-password") is None


def test_account_actions_are_admin_only(ctx, ann, api, accounts):
    before = password_hash(ctx, "boss")
    for url, body in [("/api/users/boss/password", {"password": "taken-over!"}), ("/api/users/boss/token", None),
                      ("/api/users/bob/enable", None), ("/api/users/bob/disable", None)]:
        assert ann.post(url, json=body).status_code == 403, url
        assert api().post(url, json=body).status_code == 401, url
    assert password_hash(ctx, "boss") == before
    assert api("boss").get("/api/me").status_code == 200 and not ctx.store.users.get("bob").disabled


def test_an_admin_resets_a_password_by_rest(ctx, boss, accounts):
    r = boss.post("/api/users/ann/password", json={"password": "a new secret"})
    assert r.json() == {"name": "ann"}
    assert ctx.authenticate_password("ann", "ann-password") is None
    assert ctx.authenticate_password("ann", "a new secret").name == "ann"
    generated = boss.post("/api/users/ann/password").json()["password"]
    assert ctx.authenticate_password("ann", generated).name == "ann"
    r = boss.post("/api/users/Ann/password", json={"password": "a new secret"})
    assert r.status_code == 404 and "did you mean 'ann'?" in r.json()["error"]


@contextmanager
def logged_in(server, name: str, password: str) -> Iterator[httpx.Client]:
    """A browser-like client with a session cookie from the shared login form."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        r = client.post("/ui/login", data={"username": name, "password": password})
        assert r.status_code == 200 and client.get("/ui/config").status_code == 200, r.text
        yield client


def test_a_new_password_ends_the_browser_sessions_opened_with_the_old_one(ctx, server, boss, ann, accounts):
    with logged_in(server, "bob", "bob-password") as bob:
        assert boss.post("/api/users/bob/password", json={"password": "reset-by-rest"}).status_code == 200
        assert bob.get("/ui/config").status_code == 401
    with logged_in(server, "bob", "reset-by-rest") as bob:
        admin.reset_password(ctx, "boss", "bob", "reset-by-the-admin-tab")
        assert bob.get("/ui/config").status_code == 401
    with logged_in(server, "ann", "ann-password") as ann_browser:
        r = ann.post("/api/me/password", json={"current_password": "ann-password", "new_password": "ann-changed-it"})
        assert r.status_code == 200 and ann_browser.get("/ui/config").status_code == 401
    with logged_in(server, "ann", "ann-changed-it"):
        pass


# -- self-service -----------------------------------------------------------------------------------------------
def test_changing_your_own_password_needs_the_current_one(ctx, ann, api, held):
    before = password_hash(ctx, "ann")
    r = ann.post("/api/me/password", json={"current_password": "guess-guess", "new_password": "mine-only-now"})
    assert r.status_code == 403 and r.json() == {"error": "the current password is wrong; nothing was changed"}
    assert password_hash(ctx, "ann") == before
    r = ann.post("/api/me/password", json={"current_password": "ann-password", "new_password": "mine-only-now"})
    assert r.status_code == 200 and r.json() == {"name": "ann"}
    assert ctx.authenticate_password("ann", "ann-password") is None
    assert ctx.authenticate_password("ann", "mine-only-now").name == "ann"
    assert ann.get("/api/me").status_code == 200  # a password change leaves the API token alone
    local = api(token=ctx.local_token)
    r = local.post("/api/me/password", json={"current_password": "x", "new_password": "whatever-long"})
    assert r.status_code == 403 and "belongs to no account" in r.json()["error"]


# -- the CLI through a running server (and admin recovery) ------------------------------------------------------
def test_the_cli_resets_passwords_and_rotates_tokens_through_the_running_server(held, api, accounts):
    data_dir = held.config.data_dir
    done = cli(data_dir, "users", "passwd", "boss")  # the lost-admin-password recovery: not a terminal, generated
    assert done.returncode == 0, done.stderr
    changed, generated = done.stdout.strip().splitlines()
    assert changed == "password of 'boss' changed" and generated.startswith("password: ")
    assert held.authenticate_password("boss", generated.removeprefix("password: ")).name == "boss"
    assert held.authenticate_password("boss", "boss-password") is None

    old = api("ann")
    done = cli(data_dir, "users", "token", "ann", "--rotate")
    assert done.returncode == 0, done.stderr
    assert old.get("/api/me").status_code == 401
    assert api(token=done.stdout.strip().splitlines()[-1]).get("/api/me").status_code == 200

    assert cli(data_dir, "users", "disable", "bob").returncode == 0 and held.store.users.get("bob").disabled
    assert api("bob").get("/api/me").status_code == 401
    done = cli(data_dir, "users", "enable", "bob")
    assert done.returncode == 0 and "stays revoked" in done.stdout
    assert api("bob").get("/api/me").status_code == 401
    listed = cli(data_dir, "users", "list")
    assert listed.returncode == 0 and listed.stdout.splitlines() == ["boss\tadmin", "ann\tannotator", "bob\tannotator"]


def read_until(stream, ending: bytes, timeout: float = 60) -> bytes:
    """Bytes from `stream` up to and including `ending` (a prompt); fails rather than hangs if it never comes."""
    seen, deadline = b"", time.monotonic() + timeout
    while not seen.endswith(ending):
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(stream.fileno(), 1) if ready else b""
        assert chunk, f"the prompt ending {ending!r} never came; got {seen!r}"
        seen += chunk
    return seen


def typed_at_prompts(data_dir, *lines: str) -> tuple[int, str, str]:
    """`users passwd alice` with a pseudo-terminal as stdin: each line is typed once its prompt is shown (getpass
    flushes what was typed before it turned echo off). Returns (exit code, stdout, stderr)."""
    controller, terminal = os.openpty()
    try:
        with subprocess.Popen([sys.executable, "-m", "app.cli", "users", "passwd", "alice", "--data-dir",
                               str(data_dir)], stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            prompts = []
            for line in lines:
                prompts.append(read_until(proc.stderr, b": "))
                os.write(controller, f"{line}\n".encode())
            out, err = proc.communicate(timeout=60)
            return proc.returncode, out.decode(), b"".join(prompts).decode() + err.decode()
    finally:
        os.close(terminal)
        os.close(controller)


def test_passwd_asks_twice_on_a_terminal(tmp_path):
    with Store.open(tmp_path) as store:
        store.users.add("alice", "annotator", "correct horse")
    code, _, err = typed_at_prompts(tmp_path, "battery staple", "battery stapel")
    assert code == 1 and "the two passwords differ; nothing was changed" in err
    assert "new password for 'alice'" in err and "the same password again" in err
    code, out, err = typed_at_prompts(tmp_path, "battery staple", "battery staple")
    assert code == 0 and out.strip() == "password of 'alice' changed", err
    with Store.open(tmp_path) as store:
        assert store.users.verify_password("alice", "battery staple") is not None
