"""Annotators and admins: names, roles, scrypt password hashes and API token hashes (never either secret in clear)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from storage.db import Database
from storage.errors import Conflict, InvalidValue, NotFound

ROLES = ("annotator", "admin")
# Names are stored as typed and matched exactly (login, lookups); unique regardless of case (migration
# m009_user_names_unique_ignoring_case), so 'ADMIN' can never sit beside 'admin' to be mistaken for it.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
# NIST SP 800-63B section 5.1.1.2: user-chosen passwords of at least 8 characters; issue 8 item 2.
MIN_PASSWORD_CHARS = 8
# Bounds the scrypt input (and matches the REST body cap); long passphrases still fit.
MAX_PASSWORD_CHARS = 256
# Generated passwords: 16 URL-safe characters, 96 random bits.
GENERATED_PASSWORD_BYTES = 12
# scrypt cost: n=2**14, r=8 is the interactive-login setting of the scrypt paper (and Python's docs); ~16 MiB, tens
# of ms on a laptop core.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


@dataclass(frozen=True)
class User:
    user_id: int
    name: str
    role: str
    disabled: bool


def hash_password(
    password: str, salt: bytes | None = None, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P
) -> str:
    """`scrypt$n$r$p$salt$hash` (hex), the parameters stored so a later cost change still verifies old hashes."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    """Whether `password` matches a `hash_password` string (constant-time compare)."""
    _, n, r, p, salt, digest = stored.split("$")
    again = hash_password(password, bytes.fromhex(salt), int(n), int(r), int(p))
    return hmac.compare_digest(again.rsplit("$", 1)[1], digest)


def check_new_password(password: object) -> str:
    """`password` if it may be set; InvalidValue naming the problem otherwise. Every way to set one comes here."""
    if not isinstance(password, str):
        raise InvalidValue(f"password must be a string, got {type(password).__name__}")
    if len(password) < MIN_PASSWORD_CHARS:
        raise InvalidValue(f"password must be at least {MIN_PASSWORD_CHARS} characters, got {len(password)}")
    if len(password) > MAX_PASSWORD_CHARS:
        raise InvalidValue(f"password must be at most {MAX_PASSWORD_CHARS} characters, got {len(password)}")
    return password


def generate_password() -> str:
    return secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)


def hash_token(token: str) -> str:
    # Tokens are 256 random bits, so a fast unsalted hash is enough: nothing to brute-force.
    return hashlib.sha256(token.encode()).hexdigest()


# Verified against when the name is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = hash_password("not a password", salt=b"\0" * 16)

_COLUMNS = "user_id, name, role, disabled"


def _user(row: tuple | None) -> User | None:
    return None if row is None else User(int(row[0]), row[1], row[2], bool(row[3]))


class Users:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, name: str, role: str, password: str | None = None) -> tuple[User, str, str]:
        """A new user; returns (user, password, token), generating the password when None.
        Conflict if the name exists, in any case ('ADMIN' beside 'admin')."""
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise InvalidValue(f"user name must be 1 to 64 characters of A-Z a-z 0-9 _ . @ -, got {name!r}")
        if role not in ROLES:
            raise InvalidValue(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        password = generate_password() if password is None else check_new_password(password)
        token = secrets.token_urlsafe(32)
        password_hash = hash_password(password)  # outside the write lock: scrypt is slow on purpose
        with self.db.write() as cur:
            taken = cur.execute("SELECT name FROM users WHERE lower(name) = lower(?)", [name]).fetchone()
            if taken:
                same = "" if taken[0] == name else f" as {taken[0]!r} (names are unique regardless of case)"
                raise Conflict(f"a user named {name!r} already exists{same}")
            row = cur.execute(
                f"INSERT INTO users (name, role, password_hash, token_hash) VALUES (?, ?, ?, ?) RETURNING {_COLUMNS}",
                [name, role, password_hash, hash_token(token)],
            ).fetchone()
        return _user(row), password, token

    def verify_password(self, name: str, password: str) -> User | None:
        """The user if `password` is theirs and they are not disabled, else None. The name must match exactly."""
        if not isinstance(name, str) or not isinstance(password, str):
            return None
        row = self.db.cursor().execute(f"SELECT {_COLUMNS}, password_hash FROM users WHERE name = ?", [name]).fetchone()
        ok = check_password(password, row[4] if row else _DUMMY_HASH)
        user = _user(row[:4]) if row else None
        return user if ok and user is not None and not user.disabled else None

    def by_token(self, token: str) -> User | None:
        """The user holding API token `token`, None if none or disabled."""
        if not isinstance(token, str):
            return None
        row = self.db.cursor().execute(
            f"SELECT {_COLUMNS} FROM users WHERE token_hash = ?", [hash_token(token)]
        ).fetchone()
        user = _user(row)
        return user if user is not None and not user.disabled else None

    def get(self, name: str) -> User | None:
        """The user named exactly `name` (disabled ones too: check `.disabled`), None if none."""
        return _user(self.db.cursor().execute(f"SELECT {_COLUMNS} FROM users WHERE name = ?", [name]).fetchone())

    def get_by_id(self, user_id: int) -> User | None:
        return _user(self.db.cursor().execute(f"SELECT {_COLUMNS} FROM users WHERE user_id = ?", [user_id]).fetchone())

    def list(self) -> list[User]:
        rows = self.db.cursor().execute(f"SELECT {_COLUMNS} FROM users ORDER BY user_id").fetchall()
        return [_user(row) for row in rows]

    def set_disabled(self, name: str, disabled: bool) -> User:
        """Disable (or re-enable) a user. Disabling also revokes their API token for good: re-enabling does not bring
        it back, `new_token` issues the next one. (UI sessions end because every request looks the user up.)"""
        with self.db.write() as cur:
            self._must_exist(cur, name)
            if disabled:  # the hash of a token nobody was told: no token matches until `new_token`
                cur.execute("UPDATE users SET disabled = true, token_hash = ? WHERE name = ?",
                            [hash_token(secrets.token_urlsafe(32)), name])
            else:
                cur.execute("UPDATE users SET disabled = false WHERE name = ?", [name])
            return _user(cur.execute(f"SELECT {_COLUMNS} FROM users WHERE name = ?", [name]).fetchone())

    def set_password(self, name: str, password: str | None = None) -> str:
        """Replace `name`'s password with `password`, or a generated one when None; returns the password set."""
        password = generate_password() if password is None else check_new_password(password)
        password_hash = hash_password(password)  # outside the write lock: scrypt is slow on purpose
        with self.db.write() as cur:
            self._must_exist(cur, name)
            cur.execute("UPDATE users SET password_hash = ? WHERE name = ?", [password_hash, name])
        return password

    def new_token(self, name: str) -> str:
        """A fresh API token for `name` (shown once: only its hash is kept); the old one stops working at once."""
        token = secrets.token_urlsafe(32)
        with self.db.write() as cur:
            self._must_exist(cur, name)
            cur.execute("UPDATE users SET token_hash = ? WHERE name = ?", [hash_token(token), name])
        return token

    def count(self) -> int:
        return self.db.cursor().execute("SELECT count(*) FROM users").fetchone()[0]

    @staticmethod
    def _must_exist(cur, name: str) -> None:
        """NotFound unless a user is named exactly `name`; the message names the spelling that exists, if any."""
        if cur.execute("SELECT 1 FROM users WHERE name = ?", [name]).fetchone():
            return
        other = cur.execute("SELECT name FROM users WHERE lower(name) = lower(?)", [str(name)]).fetchone()
        hint = f" (names match exactly: did you mean {other[0]!r}?)" if other else ""
        raise NotFound(f"no user named {name!r}{hint}")
