"""The CLI on a real data dir, alone and while a server holds the DuckDB file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from importlib import metadata

import pytest

from app import cli_serve
from app.cli import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main, parser
from app.config import ServeConfig
from learner.sampling import SamplingParams
from storage.items import AnswerRecord
from storage.store import Store

SETTINGS = [(cls, f) for cls in (ServeConfig, SamplingParams) for f in fields(cls) if f.name not in cli_serve.NOT_FLAGS]


@pytest.fixture
def data_dir(tmp_path):
    """An existing data dir with its DuckDB file (what `prefloop serve` or `prefloop init` leaves)."""
    Store.open(tmp_path / "data").close()
    return tmp_path / "data"


@pytest.fixture
def ranked_dir(data_dir):
    """The data dir with one ranking of three answers: 3 DPO pairs."""
    with Store.open(data_dir) as store:
        user, _, _ = store.users.add("alice", "annotator", "alice-password")
        (prompt_id,) = store.prompts.add(["Hi? Ünïcode."]).prompt_ids
        item = store.items.add(prompt_id, 0, {}, [AnswerRecord(text, 1, "eos", -1.0) for text in ("a", "b", "ç")])
        store.labels.add_ranking(item.item_id, user.user_id, [a.answer_id for a in item.answers])
    return data_dir


def test_version_is_the_installed_package_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"prefloop {metadata.version('prefloop')}"


def test_users_add_prints_the_token_last(data_dir, capsys):
    assert main(["users", "add", "alice", "--role", "annotator", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "created annotator 'alice'" and out[1].startswith("password: ")
    with Store.open(data_dir) as store:
        assert store.users.by_token(out[-1]).name == "alice"


def test_prompts_import_good_and_bad_files(tmp_path, data_dir, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "one"}\n{"prompt": "two"}\n{"prompt": "one"}\n')
    assert main(["prompts", "import", str(good), "--data-dir", str(data_dir)]) == EXIT_OK
    assert "imported 2 prompts" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt\nfine\n\"\"\nalso fine\n")
    assert main(["prompts", "import", str(bad), "--data-dir", str(data_dir)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "nothing imported" in err and "bad.csv" in err and "line 3" in err
    with Store.open(data_dir) as store:
        assert store.prompts.count() == 2
    assert main(["prompts", "import", str(bad), "--skip-invalid", "--data-dir", str(data_dir)]) == EXIT_OK
    assert "imported 2 prompts" in capsys.readouterr().out


def test_export_writes_jsonl(data_dir, tmp_path, capsys):
    out = tmp_path / "dpo.jsonl"
    assert main(["export", "--format", "dpo", "--out", str(out), "--data-dir", str(data_dir)]) == 0
    assert out.exists() and "wrote 0 dpo rows" in capsys.readouterr().out


def test_export_to_stdout_writes_only_the_rows_there(ranked_dir, capsysbinary):
    assert main(["export", "--format", "dpo", "--out", "-", "--data-dir", str(ranked_dir)]) == EXIT_OK
    captured = capsysbinary.readouterr()
    rows = [json.loads(line) for line in captured.out.decode("utf-8").splitlines()]
    assert len(rows) == 3 and rows[0]["prompt"] == [{"role": "user", "content": "Hi? Ünïcode."}]
    assert {r["chosen"][0]["content"] for r in rows} == {"a", "b"}
    assert captured.err.decode().strip() == "wrote 3 dpo rows to stdout"
    assert not (ranked_dir.parent / "-").exists()


# -- a data dir that is not there ----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [
    ["users", "list"], ["users", "add", "bob"], ["users", "passwd", "bob", "--password", "long enough"],
    ["prompts", "import", "PROMPTS"], ["export", "--format", "kto", "--out", "-"], ["snapshot", "--out", "SNAP"],
])
@pytest.mark.parametrize("made", ["missing", "empty dir"])
def test_commands_refuse_a_data_dir_without_a_store_and_create_nothing(tmp_path, capsys, command, made):
    typo = tmp_path / "prefloop-dta"
    if made == "empty dir":
        typo.mkdir()
    (tmp_path / "p.jsonl").write_text('{"prompt": "one"}\n')
    argv = [str(tmp_path / "p.jsonl") if a == "PROMPTS" else str(tmp_path / "snap") if a == "SNAP" else a
            for a in command]
    assert main([*argv, "--data-dir", str(typo)]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and str(typo) in captured.err and "prefloop init" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["p.jsonl"] + (["prefloop-dta"] * (made != "missing")))
    assert made == "missing" or list(typo.iterdir()) == []


def test_init_creates_an_empty_store_with_an_admin_once(tmp_path, capsys):
    path = tmp_path / "new"
    assert main(["init", "--data-dir", str(path)]) == EXIT_OK
    out = capsys.readouterr().out
    token = out.strip().splitlines()[-1].split("API token: ")[1]
    with Store.open(path) as store:
        assert store.users.by_token(token).role == "admin" and store.prompts.count() == 0
    assert path.stat().st_mode & 0o777 == 0o700
    assert main(["init", "--data-dir", str(path)]) == EXIT_OK
    assert "already exists; nothing changed" in capsys.readouterr().out
    with Store.open(path) as store:
        assert store.users.count() == 1


# -- serve's flags -------------------------------------------------------------------------------------------------
def test_serve_help_names_every_setting_its_variable_and_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: nothing wrapped
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    blocks: list[str] = []  # one per option: its invocation, then its help (on the next line when it is long)
    for x in capsys.readouterr().out.splitlines():
        if x.startswith("  -"):
            blocks.append(x.strip())
        elif blocks and x.startswith("   "):
            blocks[-1] += " " + x.strip()
    for cls, f in SETTINGS:
        flag = "--" + f.name.replace("_", "-")
        (line,) = [b for b in blocks if b.startswith((flag + " ", flag + ","))]
        default = cli_serve.shown(getattr(cls(), f.name))
        assert f"default {default} (env PREFLOOP_{f.name.upper()}): " in line, line
        reason = line.split("): ", 1)[1]
        assert len(reason.split()) >= 4, f"{cls.__name__}.{f.name} has no reason comment beside its default"
    assert any(b.startswith("--data-dir") and "PREFLOOP_DATA_DIR" in b for b in blocks)


def other_value(cls, f):
    """A valid value that is not the field's default, as a flag argument (None: a boolean flag)."""
    default = getattr(cls(), f.name)
    if isinstance(default, bool):
        return None
    if f.name in cli_serve.CHOICES:
        return [c for c in cli_serve.CHOICES[f.name] if c != default][-1]
    if isinstance(default, int):
        return str(default + 1)
    if isinstance(default, float):
        return str(default / 2)
    return f"other-{f.name}"


def test_every_setting_is_a_flag_that_reaches_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFLOOP_K", "7")
    monkeypatch.setenv("PREFLOOP_OVERLAP", "3")
    argv = ["serve", "--data-dir", str(tmp_path)]
    for cls, f in SETTINGS:
        value = other_value(cls, f)
        flag = "--" + f.name.replace("_", "-")
        default = getattr(cls(), f.name)
        argv += [flag if default is not True else "--no-" + flag[2:]] + ([value] if value is not None else [])
    config = cli_serve.serve_config(parser().parse_args(argv))
    for cls, f in SETTINGS:
        got = getattr(config.sampling if cls is SamplingParams else config, f.name)
        value = other_value(cls, f)
        assert str(got) == value if value is not None else got is not getattr(cls(), f.name), f.name
    assert config.k == 5  # the flag wins over PREFLOOP_K
    assert cli_serve.serve_config(parser().parse_args(["serve"])).overlap == 3  # the variable over the default


# -- exit codes ----------------------------------------------------------------------------------------------------
def test_exit_codes_tell_usage_from_bad_input_from_failure(tmp_path, data_dir, capsys, monkeypatch):
    assert main(["users", "list", "--data-dir", str(data_dir)]) == EXIT_OK
    for argv in (["export", "--format", "xml", "--out", "x"], ["users"], ["serve", "--port", "http"],
                 ["serve", "--max-staleness", "3"], ["nonsense"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == EXIT_USAGE, argv
    assert "renamed --max-item-staleness" in capsys.readouterr().err
    for argv in (["serve", "--k", "1"], ["serve", "--backend", "openai"]):  # refused before any port or model
        assert main([*argv, "--data-dir", str(tmp_path / "never")]) == EXIT_USAGE
        assert capsys.readouterr().err.count("\n") == 1
    monkeypatch.setenv("PREFLOOP_K", "four")
    assert main(["users", "list", "--data-dir", str(data_dir)]) == EXIT_USAGE
    assert capsys.readouterr().err.startswith("prefloop: k must be ")
    monkeypatch.delenv("PREFLOOP_K")
    assert main(["export", "--format", "dpo", "--out", str(tmp_path), "--data-dir", str(data_dir)]) == EXIT_BAD_INPUT
    assert main(["prompts", "import", str(tmp_path / "absent.jsonl"), "--data-dir", str(data_dir)]) == EXIT_BAD_INPUT
    assert main(["simulate", "--url", "http://127.0.0.1:9", "--token=x"]) == EXIT_FAILURE  # nothing listens on 9
    assert not (tmp_path / "never").exists()


def test_exit_codes_reach_the_shell(tmp_path):
    run = [sys.executable, "-m", "app.cli"]
    assert subprocess.run([*run, "export"], capture_output=True).returncode == EXIT_USAGE
    done = subprocess.run([*run, "users", "list", "--data-dir", str(tmp_path / "x")], capture_output=True, text=True)
    assert done.returncode == EXIT_BAD_INPUT and "Traceback" not in done.stderr


# -- snapshot ------------------------------------------------------------------------------------------------------
def test_snapshot_writes_what_a_round_reads(ranked_dir, tmp_path, capsys):
    from learner.round import read_snapshot

    out = tmp_path / "snap"
    assert main(["snapshot", "--out", str(out), "--data-dir", str(ranked_dir)]) == EXIT_OK
    printed = capsys.readouterr().out
    snapshot = read_snapshot(out)
    assert len(snapshot.pairs) == 3 and snapshot.meta["parent_version"] == 0
    assert snapshot.meta["base_model"] == str(ranked_dir / "models" / "smollm2")
    assert f"python -m learner.round --snapshot {out} --base {ranked_dir / 'models' / 'smollm2'}" in printed
    assert main(["snapshot", "--out", str(out), "--data-dir", str(ranked_dir)]) == EXIT_BAD_INPUT
    assert "not an empty directory" in capsys.readouterr().err


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
    done = cli(data_dir, "export", "--format", "kto", "--out", "-")
    assert done.returncode == 0 and done.stdout == out.read_text(), done.stderr
    assert done.stderr.strip() == f"wrote {len(out.read_text().splitlines())} kto rows to stdout"
    ann = held.store.users.get("carol").user_id  # one ranking, so that a dataset has rows
    (prompt_id,) = held.store.prompts.add(["Ranked through the server?"]).prompt_ids
    item = held.store.items.add(prompt_id, 0, {}, [AnswerRecord(t, 1, "eos", -1.0) for t in ("x", "y")])
    held.store.labels.add_ranking(item.item_id, ann, [a.answer_id for a in item.answers])
    done = cli(data_dir, "export", "--format", "dpo", "--dataset", str(tmp_path / "hub"))
    assert done.returncode == 0 and "wrote 1 dpo rows" in done.stdout, done.stderr
    assert json.loads((tmp_path / "hub" / "data" / "train.jsonl").read_text())["chosen"][0]["content"] == "x"
    assert "| rows | 1 |" in (tmp_path / "hub" / "README.md").read_text()
    done = cli(data_dir, "snapshot", "--out", str(tmp_path / "snap"))  # needs the file itself
    assert done.returncode == EXIT_FAILURE and "stop the server" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "snap").exists()


def test_cli_says_plainly_who_holds_the_file(held):
    held.config.server_file.unlink()
    done = cli(held.config.data_dir, "users", "add", "dave")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "prefloop.duckdb" in done.stderr and "server" in done.stderr

