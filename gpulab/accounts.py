"""One system account per hub user, when the platform runs as root (The Littlest JupyterHub's model).

A hub user ``alice`` runs as the account ``<Platform.account_prefix>alice`` (default ``gpulab-alice``),
or as the existing account ``Platform.accounts`` maps her to. The account is made on first use (a
spawn or a job start) with a 0700 home under ``Platform.home_root`` and a locked password: users
sign in to the hub, never to the machine. Both the hub's spawner and the job service's local
executor use this module, so a user's server, kernels, terminals and jobs all run as one account.

The platform's services that need no root (MLflow, the inference gateway, Triton) run as one more
account, ``Platform.service_account`` (default ``gpulab``), which no hub user maps to.
"""

import os
import pwd
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

# useradd's own default NAME_REGEX, without the trailing '$' it allows for machine accounts
ACCOUNT_NAME = re.compile(r"^[a-z_][a-z0-9_-]*$")
MAX_ACCOUNT_NAME = 32  # utmp's limit, which useradd enforces


class AccountError(Exception):
    """A hub user cannot be given (or mapped to) a system account; the message says why."""


@dataclass(frozen=True)
class Account:
    """A system account a user's processes run as."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: tuple[int, ...]  # supplementary groups

    def env(self) -> dict[str, str]:
        """The login variables of this account."""
        return {"USER": self.name, "LOGNAME": self.name, "HOME": self.home, "SHELL": self.shell}


@dataclass(frozen=True)
class AccountPolicy:
    """How hub users map to system accounts (from ``Platform``'s settings of the same names)."""

    account_prefix: str = "gpulab-"
    accounts: dict = field(default_factory=dict)  # hub user -> existing account
    home_root: str = "/home"
    service_account: str = "gpulab"  # the platform's services', never a user's

    @classmethod
    def from_platform(cls, platform) -> "AccountPolicy":
        return cls(platform.account_prefix, dict(platform.accounts), platform.home_root, platform.service_account)


def isolation_mode(platform) -> str:
    """``Platform.isolation`` in force: ``accounts`` as root by default, ``personal`` otherwise."""
    mode = platform.isolation or ("accounts" if os.geteuid() == 0 else "personal")
    if mode == "accounts" and os.geteuid() != 0:
        raise ConfigError(
            "Platform.isolation: 'accounts' needs gpulab up to run as root (it starts each user's "
            "processes as their own account); leave it unset for a personal platform"
        )
    return mode


def personal_refusal(owner: str) -> str:
    """Why a personal platform takes no other users, and what to do."""
    return (
        f"this is {owner}'s personal platform (gpulab up was not started as root, so users cannot be kept "
        "apart); start it as root, or set c.Platform.isolation = 'none' to share one account"
    )


def account_name(policy: AccountPolicy, user: str) -> str:
    """The system account name of hub user ``user``; AccountError if it cannot be one."""
    name = policy.accounts.get(user) or f"{policy.account_prefix}{user}"
    if len(name) > MAX_ACCOUNT_NAME:
        raise AccountError(
            f"user name {user!r}: its account name {name!r} is longer than {MAX_ACCOUNT_NAME} characters"
        )
    if not ACCOUNT_NAME.match(name):
        raise AccountError(
            f"user name {user!r}: {name!r} is not a valid account name (lower-case letters, digits, '-' and "
            "'_', starting with a letter)"
        )
    if name == policy.service_account:
        raise AccountError(f"user name {user!r}: {name!r} is the platform's service account (Platform.service_account)")
    return name


def _account(entry: pwd.struct_passwd) -> Account:
    groups = tuple(g for g in os.getgrouplist(entry.pw_name, entry.pw_gid) if g != entry.pw_gid)
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, entry.pw_shell or "/bin/sh", groups)


def lookup(policy: AccountPolicy, user: str) -> Account | None:
    """``user``'s account if it exists."""
    try:
        return _account(pwd.getpwnam(account_name(policy, user)))
    except KeyError:
        return None


def ensure(policy: AccountPolicy, user: str) -> Account:
    """``user``'s account, created (home 0700 under ``Platform.home_root``) if it does not exist yet.

    Blocking (it may run useradd): call it from a thread in async code.
    """
    name = account_name(policy, user)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if user in policy.accounts:
            raise AccountError(f"Platform.accounts maps {user!r} to {name!r}, which does not exist") from None
        entry = _create(name, Path(policy.home_root), f"gpulab user {user}")
    if entry.pw_uid == 0:
        raise AccountError(f"user name {user!r}: account {name!r} is root's; map the user to another account")
    home = Path(entry.pw_dir)
    if home.is_dir() and home.stat().st_uid == entry.pw_uid:
        os.chmod(home, 0o700)
    return _account(entry)


def ensure_service_account(policy: AccountPolicy) -> Account:
    """``Platform.service_account``, created as a system account (no login shell, home 0700 under
    ``Platform.home_root``) if it does not exist yet."""
    name = policy.service_account
    if not ACCOUNT_NAME.match(name) or len(name) > MAX_ACCOUNT_NAME:
        raise ConfigError(f"Platform.service_account: {name!r} is not a valid account name")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        try:
            entry = _create(name, Path(policy.home_root), "gpulab services", system=True)
        except AccountError as e:
            raise ConfigError(f"Platform.service_account: {e}") from None
    if entry.pw_uid == 0:
        raise ConfigError(f"Platform.service_account: {name!r} is root's; name an unprivileged account")
    return _account(entry)


def _create(name: str, home_root: Path, comment: str, system: bool = False) -> pwd.struct_passwd:
    if not home_root.exists():
        home_root.mkdir(parents=True)
        home_root.chmod(0o755)  # explicitly: gpulab up's umask is 077
    home = home_root / name
    kind = ["--system", "--shell", "/usr/sbin/nologin"] if system else ["--shell", "/bin/bash"]
    result = subprocess.run(
        [
            "useradd",
            *kind,
            "--create-home",
            "--home-dir",
            str(home),
            "--user-group",
            "--comment",
            comment,
            "--key",
            "UMASK=077",
            name,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise AccountError(f"could not create account {name!r} ({comment}): {result.stderr.strip()}")
    os.chmod(home, 0o700)
    return pwd.getpwnam(name)


def remove(policy: AccountPolicy, user: str, purge: bool = False) -> str | None:
    """Remove ``user``'s account if gpulab made it (mapped accounts stay); with ``purge`` its home too.

    Returns the name of the account removed, or None. Processes still running as it are killed first.
    """
    if user in policy.accounts:
        return None
    account = lookup(policy, user)
    if account is None:
        return None
    kill_processes(account.uid)
    result = subprocess.run(
        ["userdel", *(["--remove"] if purge else []), account.name], capture_output=True, text=True, check=False
    )
    if result.returncode not in (0, 12):  # 12: home could not be removed (already gone)
        raise AccountError(f"could not remove account {account.name!r}: {result.stderr.strip()}")
    return account.name


def kill_processes(uid: int) -> int:
    """SIGKILL every process running as ``uid``, by PID; how many there were."""
    import psutil

    killed = []
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.info["uids"] and proc.info["uids"].real == uid:
                proc.kill()
                killed.append(proc)
        except psutil.Error:
            continue
    psutil.wait_procs(killed, timeout=10)
    return len(killed)


def closed_to_others(path: str | os.PathLike) -> Path | None:
    """The first directory on the way to ``path`` that other accounts cannot enter (no o+x), or None.

    User accounts must reach the interpreter, gpulab's package and the data dir; a checkout under
    a 0700 directory (``/root``, ``mktemp -d``) would make every spawn fail with a bare EACCES.
    """
    p = Path(path).absolute()
    for d in [*reversed(p.parents), p] if p.is_dir() else reversed(p.parents):
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


def hand_over(path: Path, account: Account, mode: int = 0o700, from_root_only: bool = False) -> None:
    """``path``, a directory of ``mode`` (by default only ``account`` may enter it), owned by it with everything
    in it (made if missing; a tree left by an earlier run as another account is taken over, symlinks not
    followed; with ``from_root_only``, only what root owns: users' job dirs stay theirs).

    Blocking: call it from a thread in async code.
    """
    path.mkdir(parents=True, exist_ok=True)
    if path.lstat().st_uid != account.uid:
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                entry = os.path.join(root, name)
                if not from_root_only or os.lstat(entry).st_uid == 0:
                    os.lchown(entry, account.uid, account.gid)
        os.chown(path, account.uid, account.gid)
    path.chmod(mode)


def may_read(account: Account, path: Path) -> bool:
    """Whether ``account`` may read the file ``path`` by its mode bits (the directories above aside)."""
    st = path.stat()
    if st.st_uid == account.uid:
        return bool(st.st_mode & 0o400)
    if st.st_gid == account.gid or st.st_gid in account.groups:
        return bool(st.st_mode & 0o040)
    return bool(st.st_mode & 0o004)
