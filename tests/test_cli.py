"""The CLI on a real data dir, alone and while a server holds the DuckDB file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from app.cli import main
from storage.store import Store


def test_users_add_prints_the_token_last(tmp_path, capsys):
    assert main(["users", "add", "alice", "--role", "annotator", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "created annotator 'alice'" and out[1].startswith("password: ")
    with Store.open(tmp_path) as store:
        assert store.users.by_token(out[-1]).name == "alice"


def test_prompts_import_good_and_bad_files(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "one"}\n{"prompt": "two"}\n{"prompt": "one"}\n')
    assert main(["prompts", "import", str(good), "--data-dir", str(tmp_path / "d")]) == 0
    assert "imported 2 prompts" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt\nfine\n\"\"\nalso fine\n")
    assert main(["prompts", "import", str(bad), "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "nothing imported" in err and "bad.csv" in err and "line 3" in err
    with Store.open(tmp_path / "d") as store:
        assert store.prompts.count() == 2
    assert main(["prompts", "import", str(bad), "--skip-invalid", "--data-dir", str(tmp_path / "d")]) == 0
    assert "imported 2 prompts" in capsys.readouterr().out


def test_export_writes_jsonl(tmp_path, capsys):
    out = tmp_path / "dpo.jsonl"
    assert main(["export", "--format", "dpo", "--out", str(out), "--data-dir", str(tmp_path / "d")]) == 0
    assert out.exists() and "wrote 0 dpo rows" in capsys.readouterr().out


def cli(data_dir, *args) -> subprocess.CompletedProcess:
    """The CLI in another process, as a user would run it next to a server."""
    return subprocess.run([sys.executable, "-m", "app.cli", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture
def held(ctx, server):
    """The data dir held by a running server (this process), with its server.json written."""
    from app.server import write_server_file

    write_server_file(ctx.config, server.url, ctx.local_token)
    return ctx


def test_cli_goes_through_the_server_that_holds_the_data_dir(held, tmp_path):
    data_dir = held.config.data_dir
    assert oct(os.stat(held.config.server_file).st_mode & 0o777) == "0o600"
    done = cli(data_dir, "users", "add", "carol", "--role", "annotator")
    assert done.returncode == 0, done.stderr
    assert held.store.users.by_token(done.stdout.strip().splitlines()[-1]).name == "carol"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "A brand new prompt?"}) + "\n")
    done = cli(data_dir, "prompts", "import", str(prompts))
    assert done.returncode == 0 and "imported 1 prompts" in done.stdout, done.stderr
    out = tmp_path / "kto.jsonl"
    done = cli(data_dir, "export", "--format", "kto", "--out", str(out))
    assert done.returncode == 0 and out.exists(), done.stderr


def test_cli_says_plainly_who_holds_the_file(held):
    held.config.server_file.unlink()
    done = cli(held.config.data_dir, "users", "add", "dave")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "prefloop.duckdb" in done.stderr and "server" in done.stderr
