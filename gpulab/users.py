"""``gpulab users``: add, list, re-password and remove the users of the embedded password login.

It talks to the running hub's REST API (the address ``gpulab up`` wrote to ``<data dir>/hub/cli.json``)
with the ``gpulab-cli`` service's token, which only the account that started gpulab can read.
Passwords are set through the hub (:class:`gpulab.hub_config.auth.PasswordAPIHandler`), so the
hub's database is written by the hub alone.
"""

import argparse
import json
import os
import shutil
from pathlib import Path

import requests

from . import accounts
from .config import instances, load_config
from .errors import ConfigError
from .scopes import CLI_SERVICE
from .secrets import read_secret_file


class Hub:
    """The running hub of the platform whose data dir is ``data_dir``."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        try:
            runtime = json.loads((data_dir / "hub" / "cli.json").read_text())
            self.url, self.isolation, self.owner = runtime["url"], runtime["isolation"], runtime["owner"]
            token = read_secret_file(data_dir / "hub" / "services" / f"{CLI_SERVICE}.token", "gpulab users")
        except FileNotFoundError:
            raise ConfigError(f"no gpulab has run with data dir {data_dir}: start it with gpulab up") from None
        except PermissionError:
            raise ConfigError(
                f"cannot read {data_dir / 'hub'}: run gpulab users as the account that runs gpulab up"
            ) from None
        self._headers = {"Authorization": f"token {token.reveal()}"}

    def call(self, method: str, path: str, json=None, ok=(200, 201, 204), api: str = "/hub/api") -> requests.Response:
        """``path`` under the hub's REST API, or under another ``api`` behind the hub (a service's)."""
        try:
            r = requests.request(method, f"{self.url}{api}{path}", json=json, headers=self._headers, timeout=60)
        except requests.ConnectionError:
            raise ConfigError(f"the hub at {self.url} does not answer: is gpulab up running?") from None
        if r.status_code not in ok:
            raise ConfigError(_message(r) or f"{method} {path}: HTTP {r.status_code}")
        return r


def _message(r: requests.Response) -> str:
    """The error message of the hub's (``{"message"}``) or gpulab's (``{"error": {"message"}}``) answer."""
    try:
        body = r.json()
    except ValueError:
        return r.text.strip()
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    message = body.get("message") if isinstance(body, dict) else None
    return (message or r.text).strip()


def _password_from(path: str | None) -> str | None:
    return read_secret_file(path, "--password-file").reveal() if path else None


def _set_password(hub: Hub, name: str, password: str | None) -> None:
    if password is None:
        print(f"password: {hub.call('POST', f'/gpulab/users/{name}/password').json()['password']}")
    else:
        hub.call("PUT", f"/gpulab/users/{name}/password", json={"password": password})
        print(f"gpulab: password of {name} set from the file")


def add(hub: Hub, args) -> int:
    if hub.isolation == "personal":
        raise ConfigError(f"users add: {accounts.personal_refusal(hub.owner)}")
    password = _password_from(args.password_file)  # a bad file fails before anything is made
    r = hub.call("POST", f"/users/{args.name}", json={"admin": args.admin}, ok=(201, 409))
    if r.status_code == 409:
        raise ConfigError(f"user {args.name} exists: `gpulab users passwd {args.name}` gives it a new password")
    try:
        for group in args.group:
            hub.call("POST", f"/groups/{group}", ok=(201, 409))
            hub.call("POST", f"/groups/{group}/users", json={"users": [args.name]})
        _set_password(hub, args.name, password)
    except ConfigError:
        hub.call("DELETE", f"/users/{args.name}", ok=(204, 404))  # no user left without a password
        raise
    return 0


def list_users(hub: Hub, args) -> int:
    policy = accounts.AccountPolicy.from_platform(instances(load_config())["Platform"])
    rows = [("NAME", "ADMIN", "GROUPS", "ACCOUNT", "SERVER")]
    for user in sorted(hub.call("GET", "/users?limit=10000").json(), key=lambda u: u["name"]):
        account = accounts.account_name(policy, user["name"]) if hub.isolation == "accounts" else "(shared)"
        server = "running" if user.get("servers") else "-"
        rows.append((user["name"], "yes" if user["admin"] else "no", ",".join(user["groups"]) or "-", account, server))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def passwd(hub: Hub, args) -> int:
    _set_password(hub, args.name, _password_from(args.password_file))
    return 0


def remove(hub: Hub, args) -> int:
    hub.call("DELETE", f"/users/{args.name}")  # stops the server; the job service cancels the jobs
    print(f"gpulab: removed {args.name}; its jobs are being cancelled")
    if args.purge:
        if hub.isolation == "accounts":
            policy = accounts.AccountPolicy.from_platform(instances(load_config())["Platform"])
            if name := accounts.remove(policy, args.name, purge=True):
                print(f"gpulab: removed account {name} and its home")
        shutil.rmtree(hub.data_dir / "jobs" / args.name, ignore_errors=True)
        print(f"gpulab: removed {args.name}'s job files")
    return 0


def main(args) -> int:
    if args.data_dir:
        os.environ["GPULAB_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())
    data_dir = Path(instances(load_config())["Platform"].data_dir).expanduser().resolve()
    return args.action(Hub(data_dir), args)


def add_parser(sub) -> None:
    """``gpulab users ...`` on the ``gpulab`` parser's subcommands ``sub``."""
    p = sub.add_parser("users", help="users of the password login: add, list, passwd, remove")
    p.set_defaults(func=main)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", help="the platform's data dir (default: as gpulab up)")
    users = p.add_subparsers(dest="users_command", required=True)
    p_add = users.add_parser("add", parents=[common], help="create a user and print its generated password")
    p_add.add_argument("name")
    p_add.add_argument("--admin", action="store_true", help="make the user a hub and gpulab admin")
    p_add.add_argument("--group", action="append", default=[], metavar="G", help="add the user to group G (repeat)")
    p_add.add_argument("--password-file", metavar="F", help="0600 file with the password, instead of a generated one")
    p_add.set_defaults(action=add)
    users.add_parser("list", parents=[common], help="every user, their groups, account and server").set_defaults(
        action=list_users
    )
    p_passwd = users.add_parser("passwd", parents=[common], help="give a user a new password (printed once)")
    p_passwd.add_argument("name")
    p_passwd.add_argument("--password-file", metavar="F", help="0600 file with the new password")
    p_passwd.set_defaults(action=passwd)
    p_remove = users.add_parser(
        "remove", parents=[common], help="remove a user and cancel its jobs (files kept unless --purge)"
    )
    p_remove.add_argument("name")
    p_remove.add_argument("--purge", action="store_true", help="also remove the user's account, home and job files")
    p_remove.set_defaults(action=remove)
