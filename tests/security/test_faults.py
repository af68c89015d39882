"""Issue 8, item 6: faults end in one clear line or a clean stop, never in a traceback or a dead end.

A damaged adapter of the deployed version at start-up, SIGTERM, a taken port, a full disk, a damaged DuckDB file,
`export --out` into nowhere, world-readable files, and `prompts import` over the server's body and count caps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from processes import alive, children, wait_for

from app.cli import main
from app.server import RunningServer, create_app, free_port, open_context, write_server_file
from storage.items import AnswerRecord
from storage.store import Store

SUBPROCESS_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFLOOP_DEVICE": "cpu", "PREFLOOP_MAX_NEW_TOKENS": "8"}


def prefloop(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """The CLI in another process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=SUBPROCESS_ENV)


@pytest.fixture
def api_server(ctx):
    """The REST API alone (no UI) on a free port, serving `ctx`."""
    running = RunningServer(create_app(ctx, with_ui=False), "127.0.0.1", 0).start()
    yield running
    running.stop()


# -- a damaged adapter of the deployed version -------------------------------------------------------------------

def test_a_damaged_deployed_adapter_falls_back_to_the_newest_loadable_ancestor(ctx, add_version, serve_config):
    v1 = add_version()
    ctx.deployments.deploy(v1)
    v2 = add_version()
    ctx.deployments.deploy(v2)
    ctx.stop()
    ctx.store.close()
    adapter = serve_config.versions_dir / f"v{v2}" / "adapter"
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00garbage, not safetensors" * 40)

    said: list[str] = []
    reopened = open_context(serve_config, announce=said.append)  # no exception: it serves the ancestor
    try:
        assert reopened.deployments.serving == v1
        assert reopened.store.versions.deployed().version == v1
        broken = reopened.store.versions.get(v2)
        assert broken.status == "rolled_back"
        assert "adapter could not be loaded" in broken.reason and str(adapter) in broken.reason
        assert len(said) == 1 and f"version {v2}" in said[0] and f"serving version {v1}" in said[0]
        assert "\n" not in said[0] and "Traceback" not in said[0]
        reopened.policy.sample("Say hi.", 2, serve_config.sampling, v1, seed=0)  # the fallback model really answers
    finally:
        reopened.stop()
        reopened.store.close()

    # The ancestor's adapter missing too: the base model serves, and v1 is marked the same way.
    import shutil

    shutil.rmtree(serve_config.versions_dir / f"v{v1}" / "adapter")
    said.clear()
    reopened = open_context(serve_config, announce=said.append)
    try:
        assert reopened.deployments.serving == 0 and reopened.store.versions.deployed().version == 0
        assert reopened.store.versions.get(v1).status == "rolled_back"
        assert "does not exist" in reopened.store.versions.get(v1).reason
        assert len(said) == 1 and "serving version 0" in said[0]
    finally:
        reopened.stop()
        reopened.store.close()


# -- SIGTERM -------------------------------------------------------------------------------------------------------

def start_serve(data_dir: Path, model: Path, log: Path, own_group: bool = False) -> tuple[subprocess.Popen, str]:
    """`prefloop serve` as a process; `own_group`: in a process group of its own, as a terminal's foreground job
    or a systemd unit is, so that a test can signal the whole group as they do."""
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--data-dir", str(data_dir), "--port",
                                 str(port), "--model", str(model)], env=SUBPROCESS_ENV, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=own_group)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
        try:
            return httpx.get(f"{url}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 300, "the server to start")  # generous: a loaded 2-core machine imports torch slowly
    return proc, url


# SIGTERM to the server alone (`kill PID`, `docker stop`), and to its whole process group (systemd's default
# KillMode=control-group; a terminal's Ctrl+C reaches the group alike), the round and the policy worker included.
# The round once died of that signal before the server cancelled it: recorded "failed", with a traceback in the log.
# It now runs in a session of its own.
@pytest.mark.parametrize("to_group", [False, True], ids=["to-the-server", "to-the-group"])
def test_sigterm_stops_serve_cleanly_and_cancels_the_round(tmp_path, tiny_model_dir, to_group):
    data_dir = tmp_path / "data"
    with Store.open(data_dir) as store:  # a few rankings, so the round has human pairs to train on
        store.seed_starter_prompts()
        admin = store.users.add("boss", "admin", "boss-password")[2]
        annotator = store.users.add("ann", "annotator", "ann-password")[0].user_id
        for prompt in store.prompts.least_sampled(4):
            answers = [AnswerRecord(" ".join(["w"] * (j + 1)), j + 1, "eos", -1.0) for j in range(4)]
            item = store.items.add(prompt.prompt_id, 0, {"k": 4}, answers)
            store.labels.add_ranking(item.item_id, annotator, [a.answer_id for a in item.answers])
    log = tmp_path / "serve.log"
    proc, url = start_serve(data_dir, tiny_model_dir, log, own_group=to_group)
    try:
        boss = {"authorization": f"Bearer {admin}"}
        assert httpx.post(f"{url}/api/prompts", headers=boss, json={"prompts": ["Kept after SIGTERM?"]},
                          timeout=30).status_code == 201
        for path in (data_dir / "server.json", data_dir / "prefloop.duckdb", data_dir / "prefloop.duckdb.wal"):
            if path.exists():  # the WAL exists only between checkpoints
                assert path.stat().st_mode & 0o777 == 0o600, path
        assert data_dir.stat().st_mode & 0o777 == 0o700
        run_id = httpx.post(f"{url}/api/train", headers=boss, timeout=30,
                            json={"steps": 500, "batch_size": 2, "max_new_tokens": 8}).json()["run_id"]
        wait_for(lambda: httpx.get(f"{url}/api/runs/{run_id}", headers=boss).json()["progress"] > 0, 300,
                 "the round to be training")
        spawned = children(proc.pid)  # the round and the policy worker

        if to_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    output = log.read_text()
    assert "Traceback" not in output and "stopped (SIGTERM)" in output
    assert not (data_dir / "server.json").exists()
    assert not (data_dir / "prefloop.duckdb.wal").exists()  # checkpointed and closed
    wait_for(lambda: not any(alive(pid) for pid in spawned), 30, "the round to end with its server")
    with Store.open(data_dir) as store:
        run = store.runs.get(run_id)
        assert (run.status, run.error) == ("cancelled", "cancelled: the server stopped")
        assert "Kept after SIGTERM?" in [p.text for p in store.prompts.least_sampled(10_000)]


# -- a taken port --------------------------------------------------------------------------------------------------

def test_serve_on_a_taken_port_fails_at_once_with_one_line(tmp_path, tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = prefloop("serve", "--data-dir", str(tmp_path / "data"), "--port", str(port),
                        "--model", str(tiny_model_dir))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == f"prefloop: port {port} is in use on 127.0.0.1; pick another with --port"
    assert "open http" not in done.stdout  # no URL printed for a server that never started
    assert not (tmp_path / "data").exists()  # it failed before any work: no data dir, no model loaded


def test_running_server_serves_on_the_socket_it_bound(ctx):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        from app.listen import StartupError

        with pytest.raises(StartupError, match="is in use"):
            RunningServer(create_app(ctx, with_ui=False), "127.0.0.1", taken.getsockname()[1])


# -- a full disk ---------------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MiB filesystem (tmpfs), which fills up; skipped where mounting is not permitted."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or done.returncode})")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_full_disk_answers_507_writes_nothing_and_recovers(small_disk, serve_config):
    from dataclasses import replace

    config = replace(serve_config, data_dir=small_disk / "data")
    context = open_context(config)
    running = RunningServer(create_app(context, with_ui=False), "127.0.0.1", 0).start()
    try:
        client = httpx.Client(base_url=running.url, headers={"authorization": f"Bearer {context.local_token}"},
                              timeout=60)
        before = context.store.prompts.count()
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler = small_disk / "filler"
        filler.write_bytes(b"\0" * (free - 128 * 1024))  # leave 128 KiB: less than the prompts below need
        prompts = [f"prompt {i}: " + "x" * 2000 for i in range(400)]  # ~800 kB
        r = client.post("/api/prompts", json={"prompts": prompts})
        assert r.status_code == 507, r.text
        assert "disk" in r.json()["error"] and "full" in r.json()["error"]
        assert "internal error" not in r.json()["error"]
        assert context.store.prompts.count() == before  # rolled back
        filler.unlink()
        r = client.post("/api/prompts", json={"prompts": prompts})  # space again: the same store works
        assert r.status_code == 201 and r.json()["added"] == 400
        client.close()
    finally:
        running.stop()
        context.stop()
        context.store.close()


# -- a damaged DuckDB file -----------------------------------------------------------------------------------------

def test_a_damaged_duckdb_file_is_one_line_naming_it(tmp_path, capsys):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = data_dir / "prefloop.duckdb"
    db.write_bytes(os.urandom(64 * 1024))
    assert main(["users", "list", "--data-dir", str(data_dir)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(db) in err and "damaged" in err
    assert "Traceback" not in err


def test_serve_on_a_damaged_duckdb_file_is_one_line_naming_it(tmp_path, tiny_model_dir, capsys):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = data_dir / "prefloop.duckdb"
    db.write_bytes(b"not a database at all\n" * 100)
    assert main(["serve", "--data-dir", str(data_dir), "--port", "0", "--model", str(tiny_model_dir)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(db) in err and "damaged" in err and "Traceback" not in err
    assert db.read_bytes() == b"not a database at all\n" * 100  # left as it was, for the owner to recover


# -- export --out into nowhere ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["missing-dir/labels.jsonl", "."])
def test_export_to_a_missing_directory_or_onto_a_directory_is_one_line(tmp_path, capsys, where):
    out = tmp_path / "out"
    out.mkdir()
    target = out / where
    assert main(["export", "--format", "dpo", "--out", str(target), "--data-dir", str(tmp_path / "data")]) == 3
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--out" in err and "Traceback" not in err
    assert list(out.iterdir()) == []  # no .partial, no temporary file, no directory made
    assert not (tmp_path / "data").exists()  # refused before the store was opened


def test_remote_export_leaves_no_partial_file_when_the_write_fails(ctx, api_server, tmp_path):
    from app.remote import RemoteServer

    remote = RemoteServer(api_server.url, ctx.local_token)
    out = tmp_path / "out.jsonl"
    out.mkdir()  # os.replace onto a directory fails after the .partial is written
    with pytest.raises(OSError):
        remote.export("rankings", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out.jsonl"]


# -- file modes ----------------------------------------------------------------------------------------------------

def test_a_new_data_dir_and_duckdb_file_are_private_whatever_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with Store.open(tmp_path / "data") as store:
            store.seed_starter_prompts()
        assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
        assert (tmp_path / "data" / "prefloop.duckdb").stat().st_mode & 0o777 == 0o600
        os.chmod(tmp_path / "data" / "prefloop.duckdb", 0o644)  # made by an older prefloop
        Store.open(tmp_path / "data").close()
        assert (tmp_path / "data" / "prefloop.duckdb").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(previous)


def test_server_json_is_0600_even_over_a_leftover_temporary_file(serve_config):
    serve_config.data_dir.mkdir(parents=True)
    leftover = serve_config.server_file.with_suffix(".tmp")
    leftover.write_text("{}")
    os.chmod(leftover, 0o644)
    write_server_file(serve_config, "http://127.0.0.1:1", "secret")
    assert serve_config.server_file.stat().st_mode & 0o777 == 0o600


# -- prompts import through a running server -----------------------------------------------------------------------

def test_import_chunks_stay_under_the_servers_limits():
    from app.api import PromptsBody
    from app.remote import CHUNK_BYTES, CHUNK_PROMPTS, prompt_chunks
    from app.server import MAX_BODY_BYTES

    max_prompts = next(m.max_length for m in PromptsBody.model_fields["prompts"].metadata if hasattr(m, "max_length"))
    assert CHUNK_BYTES < MAX_BODY_BYTES and CHUNK_PROMPTS <= max_prompts
    prompts = [f"é{i}" * 50 for i in range(30_000)]
    chunks = list(prompt_chunks(prompts))
    assert all(len(c) <= CHUNK_BYTES for c in chunks)
    decoded = [json.loads(c)["prompts"] for c in chunks]
    assert all(len(d) <= CHUNK_PROMPTS for d in decoded)
    assert [p for d in decoded for p in d] == prompts  # every prompt once, in file order


def test_prompts_import_through_a_running_server_over_both_caps(ctx, api_server, tmp_path):
    write_server_file(ctx.config, api_server.url, ctx.local_token)
    starter = ctx.store.prompts.least_sampled(1)[0].text
    prompts = [f"Imported prompt number {i}: " + "y" * 200 for i in range(12_000)]  # > 10,000 and > 2 MiB
    rows = [*prompts, prompts[3], starter]  # a duplicate of the first chunk in the last, and one already stored
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    assert path.stat().st_size > 2 * 1024 * 1024
    before = ctx.store.prompts.count()
    done = prefloop("prompts", "import", str(path), "--data-dir", str(ctx.config.data_dir))
    assert done.returncode == 0, done.stderr
    assert f"imported 12000 prompts from {path} (2 duplicates skipped, 0 invalid rows skipped)" in done.stdout
    assert ctx.store.prompts.count() == before + 12_000
