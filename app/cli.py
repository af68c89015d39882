"""`prefloop`: serve, users (app/cli_users.py), prompts, export, simulate.

A command that needs the store opens the DuckDB file itself, unless a running server holds it (DuckDB lets one
process open a file): then it goes through that server's API with the local token in `server.json`, or, with no
server to reach, says plainly who holds the file.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from app.config import DEFAULT_DATA_DIR, build_config
from app.remote import RemoteError
from learner.errors import LearnerError
from storage.errors import DataDirBusy, PromptFileError, StorageError


class CliError(Exception):
    """A command that cannot be carried out; its message is printed and the exit code is 1 or 2."""


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except PromptFileError as exc:
        print(f"prefloop: nothing imported: {exc}", file=sys.stderr)
        return 2
    except (CliError, StorageError, LearnerError, RemoteError) as exc:
        print(f"prefloop: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="prefloop", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, help: str, run: Callable, parent=sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        p.add_argument("--data-dir", type=Path, default=None,
                       help=f"where the DuckDB file, models and versions live (default: ./{DEFAULT_DATA_DIR})")
        p.set_defaults(run=run)
        return p

    serve = command("serve", "start the app (UI at /ui, REST API at /api)", run_serve)
    serve.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 7860; 0 picks a free one)")
    serve.add_argument("--model", help="'smollm2' (default, shipped), a local HF model dir, or a cached hub id")
    serve.add_argument("--k", type=int, help="answers per item (default 4)")
    serve.add_argument("--overlap", type=int, help="distinct annotators per item (default 1)")
    serve.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, help="answer length cap (default 96)")
    serve.add_argument("--temperature", type=float, help="sampling temperature (default 0.8)")
    serve.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")

    from app.cli_users import add_users_commands  # add, list, passwd, token --rotate, disable, enable

    add_users_commands(sub, command)

    prompts = sub.add_parser("prompts", help="manage prompts").add_subparsers(required=True, metavar="ACTION")
    imp = command("import", "import prompts from JSONL ({\"prompt\": ...}), CSV or Parquet (a prompt column)",
                  run_prompts_import, prompts)
    imp.add_argument("file", type=Path)
    imp.add_argument("--skip-invalid", action="store_true", help="import the valid rows of a file with errors")

    exp = command("export", "write labels as JSONL: dpo / kto (TRL's formats) or raw rankings", run_export)
    exp.add_argument("--format", choices=["dpo", "kto", "rankings"], required=True)
    exp.add_argument("--out", type=Path, required=True)
    exp.add_argument("--plain", dest="style", action="store_const", const="plain", default="conversational",
                     help="dpo/kto: plain strings instead of TRL's chat messages (TRL then skips the chat template)")
    exp.add_argument("--drop-truncated", action="store_true",
                     help="leave out rows holding an answer cut off by max_new_tokens (finish_reason 'length')")

    from app.simulate import add_arguments as add_simulate_arguments  # httpx and the standard library only

    sim = sub.add_parser("simulate", help="simulated annotators ranking through a running server's REST API",
                         description="simulated annotators ranking through a running server's REST API")
    add_simulate_arguments(sim)
    sim.set_defaults(run=run_simulate)
    return top


def data_dir(args) -> Path:
    return build_config({"data_dir": args.data_dir}).data_dir


def run_serve(args) -> None:
    from app.listen import StartupError, bind_socket

    overrides = {k: getattr(args, k) for k in ("host", "port", "model", "k", "overlap", "max_new_tokens",
                                               "temperature", "device")}
    config = build_config({"data_dir": args.data_dir, **overrides})
    try:
        sock = bind_socket(config.host, config.port)  # before torch and gradio load: a taken port fails at once
        from app.server import serve

        serve(config, sock=sock)
    except StartupError as exc:
        raise CliError(str(exc)) from None


def open_store_or_server(path: Path):
    """(store, None) when the file is free; (None, RemoteServer) when a live server holds it."""
    from app.remote import RemoteServer
    from storage.store import Store

    try:
        return Store.open(path), None
    except DataDirBusy as busy:
        remote = RemoteServer.find(path)
        if remote is None:
            raise CliError(f"{busy} No server.json in {path}, so this command cannot go through the server; "
                           "stop the process that holds the file and try again.") from busy
        return None, remote


def run_prompts_import(args) -> None:
    from storage.imports import describe_import, import_prompt_file, read_prompt_file

    store, remote = open_store_or_server(data_dir(args))
    if remote:
        read = read_prompt_file(args.file, skip_invalid=args.skip_invalid)  # same validation, same messages
        result = remote.add_prompts(read.prompts)
        lines = [describe_import(str(args.file), result["added"], result["duplicates"], read.problems),
                 *(f"skipped: {p}" for p in read.problems)]
    else:
        with store:
            lines = import_prompt_file(store, args.file, skip_invalid=args.skip_invalid).report(str(args.file))
    print(lines[0])
    for line in lines[1:]:
        print(line, file=sys.stderr)


def check_out_file(out: Path) -> None:
    """Refuse an --out that cannot become a file, before the store is opened (nothing is left behind)."""
    if out.is_dir():
        raise CliError(f"--out {out} is a directory; name a file in it, e.g. --out {out / 'labels.jsonl'}")
    parent = out.parent
    if not parent.is_dir():
        raise CliError(f"--out {out}: the directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"--out {out}: no permission to write into {parent}")


def run_export(args) -> None:
    from storage.exports import export_jsonl

    check_out_file(args.out)
    store, remote = open_store_or_server(data_dir(args))
    try:
        if remote:
            rows = remote.export(args.format, args.out, args.style, args.drop_truncated)
        else:
            with store:
                rows = export_jsonl(store, args.format, args.out, args.style, args.drop_truncated)
    except OSError as exc:  # a full disk, say; both writers remove their temporary file
        raise CliError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    print(f"wrote {rows} {args.format} rows to {args.out}")


def run_simulate(args) -> int:
    from app.simulate import run

    return run(args)


if __name__ == "__main__":
    # `python -m app.cli` runs this file as __main__, a second module beside app.cli; delegate to app.cli, whose
    # CliError app/cli_users.py raises, so that main() catches it.
    from app.cli import main as app_cli_main

    sys.exit(app_cli_main())
