"""Settings: small admin-editable strings (annotator guidelines ...), kept in the DuckDB file with the labels."""

from __future__ import annotations

from storage.db import Database
from storage.errors import InvalidValue


class Settings:
    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, key: str, default: str | None = None) -> str | None:
        row = self.db.cursor().execute("SELECT value FROM settings WHERE key = ?", [key]).fetchone()
        return default if row is None else row[0]

    def set(self, key: str, value: str) -> None:
        if not isinstance(key, str) or not key:
            raise InvalidValue(f"setting key must be a non-empty string, got {key!r}")
        if not isinstance(value, str):
            raise InvalidValue(f"setting {key!r} must be a string, got {type(value).__name__}")
        with self.db.write() as cur:
            cur.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", [key, value])

    def all(self) -> dict[str, str]:
        return dict(self.db.cursor().execute("SELECT key, value FROM settings ORDER BY key").fetchall())
