"""`prefloop`: serve (flags: app/cli_serve.py), init, users (app/cli_users.py), prompts, export, snapshot, simulate.

A command that needs the store opens the DuckDB file itself, unless a running server holds it (DuckDB lets one
process open a file): then it goes through that server's API with the local token in `server.json`, or, with no
server to reach, says plainly who holds the file. Only `serve` and `init` create a data dir: the others refuse one
that holds no DuckDB file, so a typo is an error rather than an empty store.

Exit codes: 0 done; 1 the command could not be carried out (a server unreachable or refusing, the file held by
another process, a full disk, a value the store refuses); 2 usage (argparse's: an unknown flag, a missing or
malformed argument; a setting out of range); 3 bad input: a file or directory named on the command line that cannot
be used (a prompts file with errors, a data dir that does not exist, an --out that cannot be written); 4 `simulate`
stopped at its --timeout before its labels were stored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from app.config import DEFAULT_DATA_DIR, build_config
from app.remote import RemoteError
from learner.errors import ConfigError, LearnerError
from storage import directory_taken
from storage.errors import DataDirBusy, PromptFileError, StorageError
from storage.store import DB_FILENAME

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_BAD_INPUT = 0, 1, 2, 3  # the scheme: this module's docstring


class CliError(Exception):
    """A command that cannot be carried out; its message is printed as one line, and the exit code is 1."""

    exit_code = EXIT_FAILURE


class UsageError(CliError):
    """A command line (or PREFLOOP_* variable) that is wrong: exit 2, as argparse's own errors."""

    exit_code = EXIT_USAGE


class BadInput(CliError):
    """A file or directory named on the command line that cannot be used: exit 3."""

    exit_code = EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args) or EXIT_OK
    except PromptFileError as exc:
        print(f"prefloop: nothing imported: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CliError as exc:
        print(f"prefloop: {exc}", file=sys.stderr)
        return exc.exit_code
    except (StorageError, LearnerError, RemoteError) as exc:
        print(f"prefloop: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:  # `prefloop export --out - | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def version() -> str:
    try:
        return metadata.version("prefloop")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="prefloop", description=__doc__.splitlines()[0],
                                  epilog="exit codes: 0 done, 1 failed, 2 usage error, 3 bad input file or directory, "
                                         "4 simulate timed out")
    top.add_argument("--version", action="version", version=f"prefloop {version()}")
    sub = top.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, help: str, run: Callable, parent=sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        p.add_argument("--data-dir", type=Path, default=None,
                       help=f"default ./{DEFAULT_DATA_DIR} (env PREFLOOP_DATA_DIR): where the DuckDB file, models "
                            "and versions live")
        p.set_defaults(run=run)
        return p

    from app.cli_serve import add_serve_arguments  # a flag for every ServeConfig and SamplingParams field

    serve = command("serve", "start the app (UI at /ui, REST API at /api)", run_serve)
    serve.epilog = "Flags win over PREFLOOP_* variables, which win over the defaults (app/config.py)."
    add_serve_arguments(serve)
    command("init", "create an empty data dir and its admin account (no model, no starter prompts), so that "
            "`prompts import` and `users add` can prepare it before the first serve", run_init)

    from app.cli_users import add_users_commands  # add, list, passwd, token --rotate, disable, enable

    add_users_commands(sub, command)

    prompts = sub.add_parser("prompts", help="manage prompts").add_subparsers(required=True, metavar="ACTION")
    imp = command("import", "import prompts from JSONL ({\"prompt\": ...}), CSV or Parquet (a prompt column)",
                  run_prompts_import, prompts)
    imp.add_argument("file", type=Path)
    imp.add_argument("--skip-invalid", action="store_true", help="import the valid rows of a file with errors")

    exp = command("export", "write labels as JSONL (a file, stdout, or a Hugging Face dataset directory): dpo / kto "
                  "(TRL's formats) or raw rankings", run_export)
    exp.add_argument("--format", choices=["dpo", "kto", "rankings"], required=True)
    where = exp.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="the JSONL file to write, or - for stdout")
    where.add_argument("--dataset", type=Path, metavar="DIR",
                       help="a new (or empty) directory: a Hugging Face dataset, the rows in data/train.jsonl and a "
                            "dataset card (README.md) that `datasets.load_dataset(DIR)` reads")
    exp.add_argument("--plain", dest="style", action="store_const", const="plain", default="conversational",
                     help="dpo/kto: plain strings instead of TRL's chat messages (TRL then skips the chat template)")
    exp.add_argument("--drop-truncated", action="store_true",
                     help="leave out rows holding an answer cut off by max_new_tokens (finish_reason 'length')")

    snap = command("snapshot", "write the Parquet snapshot a round trains on (the input of `python -m "
                   "learner.round --snapshot DIR`) from the DuckDB file", run_snapshot)
    snap.add_argument("--out", type=Path, required=True, help="a new (or empty) directory")
    snap.add_argument("--max-label-staleness", type=int, default=None,
                      help="keep only labels sampled within N deployed versions (default: every label, as the "
                           "server's rounds do: the learner filters by its own max_label_staleness)")
    snap.add_argument("--model", default=None,
                      help="default smollm2 (env PREFLOOP_MODEL): the base model the server runs (recorded in "
                           "meta.json)")

    from app.simulate import add_arguments as add_simulate_arguments  # httpx and the standard library only

    sim = sub.add_parser("simulate", help="simulated annotators ranking through a running server's REST API",
                         description="simulated annotators ranking through a running server's REST API")
    add_simulate_arguments(sim)
    sim.set_defaults(run=run_simulate)
    return top


def configured(overrides: dict):
    """build_config, with a bad PREFLOOP_* variable or value reported as a usage error."""
    try:
        return build_config(overrides)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def data_dir(args) -> Path:
    """The data dir of a command other than serve and init: it must hold the DuckDB file already."""
    path = configured({"data_dir": args.data_dir}).data_dir
    if not (path / DB_FILENAME).is_file():
        if not path.exists():
            problem = "does not exist"
        elif not path.is_dir():
            problem = "is not a directory"
        else:
            problem = f"holds no {DB_FILENAME}"
        raise BadInput(f"the data dir {path} {problem}; give the one `prefloop serve` uses (--data-dir), or create "
                       f"one with `prefloop init --data-dir {path}`")
    return path


def run_serve(args) -> None:
    from app.cli_serve import serve_config
    from app.listen import StartupError, bind_socket

    config = serve_config(args)
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
        raise BadInput(f"--out {out} is a directory; name a file in it, e.g. --out {out / 'labels.jsonl'}")
    parent = out.parent
    if not parent.is_dir():
        raise BadInput(f"--out {out}: the directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"--out {out}: no permission to write into {parent}")


def run_export(args) -> None:
    from storage.exports import export_jsonl

    to_stdout = str(args.out) == "-"
    if args.dataset is not None:
        check_out_dir(args.dataset, "--dataset")
    elif not to_stdout:
        check_out_file(args.out)
    store, remote = open_store_or_server(data_dir(args))

    def write_rows(path: Path) -> int:
        if remote:
            return remote.export(args.format, path, args.style, args.drop_truncated)
        with store:
            return export_jsonl(store, args.format, path, args.style, args.drop_truncated)

    try:
        if to_stdout:
            rows = export_to_stdout(store, remote, args)
        elif args.dataset is not None:
            from storage.dataset import DATA_FILE, write_dataset

            rows = write_dataset(args.dataset, args.format, args.style, args.drop_truncated, write_rows)
            print(f"wrote {rows} {args.format} rows to {args.dataset / DATA_FILE} and its dataset card to "
                  f"{args.dataset / 'README.md'}; load it with datasets.load_dataset({str(args.dataset)!r})")
            return
        else:
            rows = write_rows(args.out)
    except BrokenPipeError:
        raise
    except OSError as exc:  # a full disk, say; every writer removes what it left half-written
        raise CliError(f"cannot write {args.out or args.dataset}: {exc.strerror or exc}") from None
    where = "stdout" if to_stdout else args.out
    print(f"wrote {rows} {args.format} rows to {where}", file=sys.stderr if to_stdout else sys.stdout)


def export_to_stdout(store, remote, args) -> int:
    """The export's JSON lines on stdout, and nothing else there (the count goes to stderr)."""
    from storage.exports import iter_export

    sys.stdout.flush()
    out = sys.stdout.buffer  # bytes: UTF-8 whatever the locale says
    if remote:
        content = remote.export_bytes(args.format, args.style, args.drop_truncated)
        out.write(content)
        rows = content.count(b"\n")
    else:
        with store:
            rows = 0
            for row in iter_export(store, args.format, args.style, args.drop_truncated):
                out.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
                rows += 1
    out.flush()
    return rows


def run_init(args) -> None:
    from app.server import first_run
    from storage.store import Store

    path = configured({"data_dir": args.data_dir}).data_dir
    if (path / DB_FILENAME).exists():
        print(f"{path / DB_FILENAME} already exists; nothing changed")
        return
    with Store.open(path) as store:
        name, password, token = first_run(store)
    print(f"created {path / DB_FILENAME} (no prompts yet: `prefloop prompts import FILE`; the first serve adds the "
          "starter prompts only to an empty pool)")
    print("created the admin account (shown once):")
    print(f"    user: {name}\n    password: {password}\n    API token: {token}")


def check_out_dir(out: Path, flag: str) -> None:
    """Refuse a directory to write that exists with something in it (a new one is made with its parents)."""
    if directory_taken(out):
        raise BadInput(f"{flag} {out} already exists and is not an empty directory; name a new one")


def run_snapshot(args) -> None:
    from storage.exports import write_snapshot

    check_out_dir(args.out, "--out")
    path = data_dir(args)
    store, remote = open_store_or_server(path)
    if remote:
        raise CliError(f"the server at {remote.url} holds {path / DB_FILENAME}, and a snapshot reads the file itself: "
                       f"stop the server and run this again, or start a round from Admin -> Train (each round keeps "
                       f"its snapshot in {path / 'runs'}/run-N/snapshot)")
    model = configured({"data_dir": path, "model": args.model})
    # As learner.model.resolve_model (which would load torch) finds it: the shipped default converted under models/.
    base = model.models_dir / "smollm2" if model.model == "smollm2" else Path(model.model)
    with store:
        parent = store.versions.deployed()
        meta = write_snapshot(store, args.out, parent.version, str(base), args.max_label_staleness)
    counts = ", ".join(f"{n} {name}" for name, n in meta["counts"].items())
    print(f"wrote snapshot {args.out} ({counts}; parent version {parent.version}); train a round on it with:")
    print(f"    python -m learner.round --snapshot {args.out} --base {base}"
          + (f" --parent {parent.path}" if parent.version != 0 and parent.path else "") + " --out NEW_VERSION_DIR")


def run_simulate(args) -> int:
    from app.simulate import run

    return run(args)


if __name__ == "__main__":
    # `python -m app.cli` runs this file as __main__, a second module beside app.cli; delegate to app.cli, whose
    # CliError app/cli_users.py raises, so that main() catches it.
    from app.cli import main as app_cli_main

    sys.exit(app_cli_main())
