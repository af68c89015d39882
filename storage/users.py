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
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
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
        Conflict if the name exists."""
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise InvalidValue(f"user name must be 1 to 64 characters of A-Z a-z 0-9 _ . @ -, got {name!r}")
        if role not in ROLES:
            raise InvalidValue(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if password is None:
            password = secrets.token_urlsafe(12)
        elif not isinstance(password, str) or not password:
            raise InvalidValue("password must be a non-empty string")
        token = secrets.token_urlsafe(32)
        password_hash = hash_password(password)  # outside the write lock: scrypt is slow on purpose
        with self.db.write() as cur:
            if cur.execute("SELECT 1 FROM users WHERE name = ?", [name]).fetchone():
                raise Conflict(f"a user named {name!r} already exists")
            row = cur.execute(
                f"INSERT INTO users (name, role, password_hash, token_hash) VALUES (?, ?, ?, ?) RETURNING {_COLUMNS}",
                [name, role, password_hash, hash_token(token)],
            ).fetchone()
        return _user(row), password, token

    def verify_password(self, name: str, password: str) -> User | None:
        """The user if `password` is theirs and they are not disabled, else None."""
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
        return _user(self.db.cursor().execute(f"SELECT {_COLUMNS} FROM users WHERE name = ?", [name]).fetchone())

    def get_by_id(self, user_id: int) -> User | None:
        return _user(self.db.cursor().execute(f"SELECT {_COLUMNS} FROM users WHERE user_id = ?", [user_id]).fetchone())

    def list(self) -> list[User]:
        rows = self.db.cursor().execute(f"SELECT {_COLUMNS} FROM users ORDER BY user_id").fetchall()
        return [_user(row) for row in rows]

    def set_disabled(self, name: str, disabled: bool) -> None:
        """Disable (or re-enable) a user: a disabled user can neither log in nor use their token."""
        with self.db.write() as cur:
            if not cur.execute("UPDATE users SET disabled = ? WHERE name = ? RETURNING 1", [disabled, name]).fetchone():
                raise NotFound(f"no user named {name!r}")

    def set_password(self, name: str, password: str) -> None:
        """Replace `name`'s password."""
        if not isinstance(password, str) or not password:
            raise InvalidValue("password must be a non-empty string")
        password_hash = hash_password(password)
        with self.db.write() as cur:
            if not cur.execute(
                "UPDATE users SET password_hash = ? WHERE name = ? RETURNING 1", [password_hash, name]
            ).fetchone():
                raise NotFound(f"no user named {name!r}")

    def new_token(self, name: str) -> str:
        """A fresh API token for `name`; the old one stops working."""
        token = secrets.token_urlsafe(32)
        with self.db.write() as cur:
            updated = cur.execute(
                "UPDATE users SET token_hash = ? WHERE name = ? RETURNING 1", [hash_token(token), name]
            ).fetchone()
            if not updated:
                raise NotFound(f"no user named {name!r}")
        return token

    def count(self) -> int:
        return self.db.cursor().execute("SELECT count(*) FROM users").fetchone()[0]
