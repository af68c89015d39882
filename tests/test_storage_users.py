"""Users: secrets never stored in clear, password and token login, disabled users refused, clear errors."""

import duckdb
import pytest

from storage.db import Database
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
    assert store.users.verify_password("bob", password).name == "bob"
    assert store.users.by_token(token) is None  # disabling revoked it for good
    new = store.users.new_token("bob")
    assert store.users.by_token(new).name == "bob"


def test_a_token_issued_while_disabled_works_only_once_enabled(store):
    store.users.add("bob", "annotator")
    store.users.set_disabled("bob", True)
    token = store.users.new_token("bob")
    assert store.users.by_token(token) is None
    assert not store.users.set_disabled("bob", False).disabled
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
    with pytest.raises(Conflict, match="a user named 'alice' already exists$"):
        store.users.add("alice", "admin")
    with pytest.raises(Conflict, match="a user named 'ALICE' already exists as 'alice' \\(names are unique regardless"):
        store.users.add("ALICE", "admin")
    with pytest.raises(InvalidValue, match="role must be one of annotator, admin, got 'root'"):
        store.users.add("carol", "root")
    for bad in ["", "has space", "x" * 65, "semi;colon"]:
        with pytest.raises(InvalidValue, match="user name must be 1 to 64 characters"):
            store.users.add(bad, "annotator")
    with pytest.raises(NotFound, match="no user named 'nobody'"):
        store.users.set_disabled("nobody", True)
    with pytest.raises(NotFound):
        store.users.new_token("nobody")
    with pytest.raises(NotFound, match=r"no user named 'Alice' \(names match exactly: did you mean 'alice'\?\)"):
        store.users.set_password("Alice", "long enough")
    assert store.users.count() == 1


def test_names_match_exactly(store):
    alice, _, token = store.users.add("Alice", "annotator", password="correct horse")
    assert store.users.verify_password("Alice", "correct horse") == alice
    assert store.users.verify_password("alice", "correct horse") is None
    assert store.users.get("alice") is None


@pytest.mark.parametrize("password, length", [("x", 1), ("abc", 3), ("1234567", 7), ("", 0)])
def test_short_passwords_are_refused_everywhere(store, password, length):
    with pytest.raises(InvalidValue, match=f"^password must be at least 8 characters, got {length}$"):
        store.users.add("carol", "annotator", password=password)
    assert store.users.count() == 0
    store.users.add("dave", "annotator", password="12345678")  # exactly 8 is enough
    before = store.db.cursor().execute("SELECT password_hash FROM users").fetchone()
    with pytest.raises(InvalidValue, match=f"got {length}$"):
        store.users.set_password("dave", password)
    assert store.db.cursor().execute("SELECT password_hash FROM users").fetchone() == before
    assert store.users.verify_password("dave", "12345678") is not None


def test_overlong_and_non_string_passwords_are_refused(store):
    with pytest.raises(InvalidValue, match="password must be at most 256 characters, got 257"):
        store.users.add("carol", "annotator", password="x" * 257)
    with pytest.raises(InvalidValue, match="password must be a string, got int"):
        store.users.add("carol", "annotator", password=12345678)
    assert store.users.count() == 0


def test_set_password_generates_a_long_one_when_none_is_given(store):
    store.users.add("alice", "annotator")
    generated = store.users.set_password("alice")
    assert len(generated) >= 16
    assert store.users.verify_password("alice", generated).name == "alice"
    assert store.users.set_password("alice", "chosen one") == "chosen one"


def test_the_schema_itself_refuses_names_that_differ_only_in_case(tmp_path):
    with Store.open(tmp_path) as store:
        store.users.add("admin", "admin")
        with pytest.raises(duckdb.ConstraintException):  # the last line of defence, under the store's own check
            with store.db.write() as cur:
                cur.execute("INSERT INTO users (name, role, password_hash, token_hash) "
                            "VALUES ('ADMIN', 'admin', '', '')")
    with Store.open(tmp_path) as store:  # the index is in the file, not only in this process
        assert [u.name for u in store.users.list()] == ["admin"]


def _file_from_before_the_case_rule(path, names):
    """A data dir as a release before m009 left it, holding users whose names differ only in case."""
    db = Database(path / "prefloop.duckdb")
    with db.write() as cur:
        cur.execute("DROP INDEX users_name_ignoring_case")
        cur.execute("DELETE FROM _migrations WHERE name = 'm009_user_names_unique_ignoring_case'")
    with db.write() as cur:  # DuckDB keeps enforcing a dropped index until the DROP commits
        for name in names:
            cur.execute("INSERT INTO users (name, role, password_hash, token_hash) VALUES (?, 'admin', '', ?)",
                        [name, name])
    db.close()


def test_the_upgrade_names_the_clashing_users_and_changes_nothing(tmp_path):
    _file_from_before_the_case_rule(tmp_path, ["admin", "bob", "ADMIN", "Bob", "carol", "Admin"])
    with pytest.raises(Conflict, match=r"differ only in case: 'admin', 'ADMIN', 'Admin'; 'bob', 'Bob'\. Rename"):
        Store.open(tmp_path)
    con = duckdb.connect(str(tmp_path / "prefloop.duckdb"))  # the failed open released the file
    applied_names = {name for (name,) in con.execute("SELECT name FROM _migrations").fetchall()}
    assert "m009_user_names_unique_ignoring_case" not in applied_names
    for old, new in [("ADMIN", "root"), ("Admin", "ops"), ("Bob", "robert")]:
        con.execute("UPDATE users SET name = ? WHERE name = ?", [new, old])
    con.close()
    with Store.open(tmp_path) as store:
        assert sorted(u.name for u in store.users.list()) == ["admin", "bob", "carol", "ops", "robert", "root"]
        with pytest.raises(Conflict):
            store.users.add("CAROL", "annotator")
