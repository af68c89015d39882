"""`prefloop users ...`: add, list, passwd, token --rotate, disable, enable.

Each works on the DuckDB file directly, or, while `serve` holds it, through that server's admin REST API with the
local token in `server.json` (`app.remote`). Either way the store's rules apply (passwords of 8+ characters ...), so
a bad value gets the same message both ways.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable

from app.cli import CliError, data_dir, open_store_or_server
from storage.users import ROLES, check_new_password, generate_password


def add_users_commands(sub, command: Callable) -> None:
    """The `users` subcommands, added to the top-level parser's `sub` with cli.parser's `command` helper."""
    users = sub.add_parser("users", help="manage accounts").add_subparsers(required=True, metavar="ACTION")
    add = command("add", "create a user; prints the API token as the last line", run_add, users)
    add.add_argument("name")
    add.add_argument("--role", choices=list(ROLES), default="annotator")
    add.add_argument("--password", help="at least 8 characters (default: a random one, printed)")
    command("list", "list users", run_list, users)
    passwd = command("passwd", "set a user's password: asks twice on a terminal, else generates and prints one "
                     "(also the way back in when the admin password is lost)", run_passwd, users)
    passwd.add_argument("name")
    passwd.add_argument("--password", help="the new password, at least 8 characters (visible in shell history)")
    passwd.add_argument("--generate", action="store_true", help="generate one and print it, even on a terminal")
    token = command("token", "issue a new API token with --rotate (prints it as the last line; the old one stops "
                    "working at once). Tokens are stored hashed, so an existing one cannot be shown", run_token, users)
    token.add_argument("name")
    token.add_argument("--rotate", action="store_true", help="required: replace the token")
    disable = command("disable", "disable a user: no login, API token revoked, open sessions end", run_disable, users)
    disable.add_argument("name")
    enable = command("enable", "re-enable a user (the old token stays revoked: rotate it)", run_enable, users)
    enable.add_argument("name")


def run_add(args: argparse.Namespace) -> None:
    store, remote = open_store_or_server(data_dir(args))
    if remote:
        result = remote.add_user(args.name, args.role, args.password)
        name, role, password, token = result["name"], result["role"], result["password"], result["token"]
    else:
        with store:
            user, password, token = store.users.add(args.name, args.role, args.password)
            name, role = user.name, user.role
    print(f"created {role} {name!r}")
    if args.password is None:
        print(f"password: {password}")
    print(token)


def run_list(args: argparse.Namespace) -> None:
    store, remote = open_store_or_server(data_dir(args))
    if remote:
        rows = [(u["name"], u["role"], u["disabled"]) for u in remote.users()]
    else:
        with store:
            rows = [(u.name, u.role, u.disabled) for u in store.users.list()]
    for name, role, disabled in rows:
        print("\t".join([name, role] + (["disabled"] if disabled else [])))


def ask_new_password(name: str) -> str | None:
    """The new password typed twice on the terminal (not echoed); None (generate one) if the first is empty."""
    first = getpass.getpass(f"new password for {name!r} (at least 8 characters; Enter alone generates one): ")
    if not first:
        return None
    check_new_password(first)  # say so before asking again
    if getpass.getpass("the same password again: ") != first:
        raise CliError("the two passwords differ; nothing was changed")
    return first


def run_passwd(args: argparse.Namespace) -> None:
    if args.password is not None:
        password = check_new_password(args.password)
    elif not args.generate and sys.stdin.isatty():
        password = ask_new_password(args.name)
    else:
        password = None
    generated = password is None
    password = generate_password() if generated else password
    store, remote = open_store_or_server(data_dir(args))
    if remote:
        remote.set_password(args.name, password)
    else:
        with store:
            store.users.set_password(args.name, password)
    print(f"password of {args.name!r} changed")
    if generated:
        print(f"password: {password}")


def run_token(args: argparse.Namespace) -> None:
    if not args.rotate:
        raise CliError("API tokens are stored only as hashes, so an existing one cannot be shown; "
                       f"`prefloop users token {args.name} --rotate` issues a new one (the old one stops working)")
    store, remote = open_store_or_server(data_dir(args))
    if remote:
        token = remote.rotate_token(args.name)
    else:
        with store:
            token = store.users.new_token(args.name)
    print(f"new API token for {args.name!r} (the old one no longer works):")
    print(token)


def set_disabled(args: argparse.Namespace, disabled: bool) -> None:
    store, remote = open_store_or_server(data_dir(args))
    if remote:
        remote.set_disabled(args.name, disabled)
    else:
        with store:
            store.users.set_disabled(args.name, disabled)


def run_disable(args: argparse.Namespace) -> None:
    set_disabled(args, True)
    print(f"{args.name!r} disabled: they cannot log in, their API token is revoked and their sessions end")


def run_enable(args: argparse.Namespace) -> None:
    set_disabled(args, False)
    print(f"{args.name!r} enabled; their old API token stays revoked: "
          f"`prefloop users token {args.name} --rotate` issues a new one")
