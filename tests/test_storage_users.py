"""Users: secrets never stored in clear, password and token login, disabled users refused, clear errors."""

import pytest

from storage.errors import Conflict, InvalidValue, NotFound
from storage.store import Store


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path) as store:
        yield store


def test_password_and_token_are_never_stored_in_clear(store):
    _, password, token = store.users.add("alice", "annotator")
    assert len(password) >= 12 and len(token) >= 32
    rows = store.db.cursor().execute("SELECT * FROM users").fetchall()
    dump = repr(rows)
    assert password not in dump and token not in dump
    password_hash = store.db.cursor().execute("SELECT password_hash FROM users").fetchone()[0]
    assert password_hash.startswith("scrypt$")


def test_password_login(store):
    alice, _, _ = store.users.add("alice", "admin", password="correct horse")
    assert store.users.verify_password("alice", "correct horse") == alice
    assert store.users.verify_password("alice", "wrong") is None
    assert store.users.verify_password("nobody", "correct horse") is None
    store.users.set_password("alice", "battery staple")
    assert store.users.verify_password("alice", "correct horse") is None
    assert store.users.verify_password("alice", "battery staple") == alice


def test_token_login_and_rotation(store):
    alice, _, token = store.users.add("alice", "annotator")
    assert store.users.by_token(token) == alice
    assert store.users.by_token("not-a-token") is None
    new = store.users.new_token("alice")
    assert store.users.by_token(token) is None
    assert store.users.by_token(new) == alice


def test_disabled_users_are_refused(store):
    _, password, token = store.users.add("bob", "annotator")
    store.users.set_disabled("bob", True)
    assert store.users.verify_password("bob", password) is None
    assert store.users.by_token(token) is None
    assert store.users.get("bob").disabled
    store.users.set_disabled("bob", False)
    assert store.users.by_token(token).name == "bob"


def test_lookups_and_listing(store):
    alice, _, _ = store.users.add("alice", "annotator")
    bob, _, _ = store.users.add("bob@lab", "admin")
    assert store.users.get("alice") == alice
    assert store.users.get("carol") is None
    assert store.users.get_by_id(bob.user_id) == bob
    assert store.users.get_by_id(999) is None
    assert store.users.list() == [alice, bob]
    assert store.users.count() == 2


def test_bad_names_roles_and_duplicates(store):
    store.users.add("alice", "annotator")
    with pytest.raises(Conflict, match="a user named 'alice' already exists"):
        store.users.add("alice", "admin")
    with pytest.raises(InvalidValue, match="role must be one of annotator, admin, got 'root'"):
        store.users.add("carol", "root")
    for bad in ["", "has space", "x" * 65, "semi;colon"]:
        with pytest.raises(InvalidValue, match="user name must be 1 to 64 characters"):
            store.users.add(bad, "annotator")
    with pytest.raises(NotFound, match="no user named 'nobody'"):
        store.users.set_disabled("nobody", True)
    with pytest.raises(NotFound):
        store.users.new_token("nobody")
    assert store.users.count() == 1
