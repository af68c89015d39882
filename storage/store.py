"""The Store: one DuckDB file and the tables the app reads and writes, each behind a small class."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Self

from storage.arena import ArenaVotes
from storage.db import Database
from storage.errors import StorageError
from storage.items import Items
from storage.labels import Labels
from storage.prompts import Prompts
from storage.runs import Runs
from storage.settings import Settings
from storage.suggestions import Suggestions
from storage.users import Users
from storage.versions import Versions

DB_FILENAME = "prefloop.duckdb"
STARTER_PROMPTS = "starter_prompts.jsonl"
DIR_MODE = 0o700  # the data dir holds labels, account hashes and server.json's token: the owner's alone


def make_data_dir(data_dir: Path) -> Path:
    """`data_dir`, created 0700 whatever the umask when missing (an existing one keeps the mode its owner gave it;
    the DuckDB file inside is made 0600 at every open). StorageError when the path is not a usable directory."""
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, mode=DIR_MODE)
        os.chmod(data_dir, DIR_MODE)  # mkdir's mode is masked by the umask
    except FileExistsError:
        if not data_dir.is_dir():
            raise StorageError(f"the data dir {data_dir} exists and is not a directory") from None
    except OSError as e:
        raise StorageError(f"cannot create the data dir {data_dir}: {e.strerror or e}") from None
    return data_dir


class Store:
    """Everything prefloop keeps in one DuckDB file; safe to share between the threads of one process (open one
    Store per file: DuckDB lets only one process hold the file, see DataDirBusy)."""

    def __init__(self, path: Path) -> None:
        self.db = Database(path)
        self.users = Users(self.db)
        self.prompts = Prompts(self.db)
        self.items = Items(self.db)
        self.labels = Labels(self.db)
        self.versions = Versions(self.db)
        self.runs = Runs(self.db)
        self.settings = Settings(self.db)
        self.suggestions = Suggestions(self.db)
        self.arena = ArenaVotes(self.db)

    @classmethod
    def open(cls, data_dir: Path) -> Store:
        """The store in `data_dir` (created 0700 if missing): the file `data_dir/prefloop.duckdb` (0600)."""
        return cls(make_data_dir(data_dir) / DB_FILENAME)

    @property
    def path(self) -> Path:
        return self.db.path

    def seed_starter_prompts(self) -> int:
        """Add the shipped starter prompts if there are no prompts yet (so a fresh app has work); returns how many."""
        if self.prompts.count():
            return 0
        lines = resources.files("storage").joinpath(STARTER_PROMPTS).read_text(encoding="utf-8").splitlines()
        texts = [json.loads(line)["prompt"] for line in lines if line.strip()]
        return self.prompts.add(texts, source="starter").added

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
