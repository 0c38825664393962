"""``python -I -m gpulab.services.jobs.executors.supervisor STATE_DIR SPEC ARGV...``: one attempt's supervisor.

The leader of the attempt's process group, started by the local executor. It ignores the SIGTERM and
SIGINT sent to the whole group (so it outlives the job and records how it ended), makes the attempt's
cgroup with its ``cpus`` and ``memory`` (:mod:`gpulab.cgroups`), and starts the job in it; with isolation
'accounts' the child then becomes the job's account (uid, gid, groups, umask 077) and only then enters
its working dir, so a job cannot start where its owner may not go. It stays root itself: the job can
neither signal it nor write ``STATE_DIR``, where it writes ``<pid>-<start time>.exit`` (given to STATE_DIR's
owner, the job service's account): the exit status, and on a second line why the job ended when the memory
limit ended it.

SPEC (JSON): ``{"cpus", "memory", "deny_devices", "cwd", "account": {"uid", "gid", "groups"}}``, each optional.
"""

import json
import os
import signal
import subprocess
import sys

import psutil

from gpulab.cgroups import Cgroup, Limits, group_name


def _child_setup(cgroup: Cgroup, account: dict | None, cwd: str | None):
    def setup():  # in the child, after fork, before exec
        try:
            cgroup.enter()
            if account:
                os.setgroups([account["gid"], *account["groups"]])
                os.setgid(account["gid"])
                os.setuid(account["uid"])
                os.umask(0o077)
        except OSError as e:
            os.write(2, f"gpulab: cannot start the job: {e}\n".encode())
            os._exit(126)
        if cwd:
            try:
                os.chdir(cwd)
            except OSError as e:
                os.write(2, f"gpulab: cannot enter the working dir {cwd}: {e.strerror}\n".encode())
                os._exit(126)

    return setup


def main(argv: list[str]) -> int:
    state_dir, spec, job = argv[0], json.loads(argv[1]), argv[2:]
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)  # the whole group gets it: outlive the job, record its exit
    ref = f"{os.getpid()}:{psutil.Process().create_time():.2f}"  # the handle's ref, as the executor has it
    limits = Limits(spec.get("cpus"), spec.get("memory"), tuple(tuple(d) for d in spec.get("deny_devices", ())))
    cgroup = Cgroup(group_name(ref), limits)
    if error := cgroup.create_or_fall_back():
        devices = "; GPU device nodes are not filtered" if limits.deny_devices else ""
        print(
            f"gpulab: no cgroup for this job ({error}); limits apply as rlimits{devices}", file=sys.stderr, flush=True
        )
    reason = ""
    try:
        rc = subprocess.Popen(
            job, stdin=subprocess.DEVNULL, preexec_fn=_child_setup(cgroup, spec.get("account"), spec.get("cwd"))
        ).wait()  # noqa: PLW1509 (one thread)
    except OSError as e:
        print(f"gpulab: cannot start {job[0]!r}: {e}", file=sys.stderr, flush=True)
        rc = 127
    finally:
        if cgroup.dirs:
            if cgroup.oom_killed():
                reason = limits.reason_exceeded()
                print(f"gpulab: {reason}", file=sys.stderr, flush=True)
            cgroup.remove()
    path = os.path.join(state_dir, ref.replace(":", "-") + ".exit")
    with open(path + ".tmp", "w") as f:
        f.write(f"{rc}\n{reason}\n")
        if os.geteuid() == 0:  # started by the root launcher: the job service (STATE_DIR's owner) reads it
            st = os.stat(state_dir)
            os.fchown(f.fileno(), st.st_uid, st.st_gid)
    os.replace(path + ".tmp", path)
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
