"""Users kept apart: their own passwords, their own OS accounts, and nothing of each other's to reach.

Real parts: `gpulab up` as root (JupyterHub, configurable-http-proxy, gpulab-jobs), spawned
JupyterLab servers and their kernels, local-executor jobs, real system accounts made by useradd
(removed when the platform stops), and `gpulab up` started as an ordinary account.
"""

import contextlib
import json
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from gpulab import cgroups
from gpulab.services.jobs.executors import launcher
from tests.support.gpulab_up import Platform
from tests.support.jobs import Client
from tests.support.login import password_login
from tests.support.net import next_loopback
from tests.support.probe import parse, probe_source
from tests.support.server_kernel import run_in_server_kernel

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="one account per user needs root (CI runs as root)")
SERVER_MEMORY, SERVER_CPUS = "2G", 1.5


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    work = tmp_path_factory.mktemp("isolation")
    # GPU device nodes made for the tests: NVIDIA's major 195, no driver behind them (this machine has no GPU)
    nodes = work / "dev"
    nodes.mkdir(mode=0o755)
    for name, minor in (("nvidia0", 0), ("nvidiactl", 255)):
        os.mknod(nodes / name, stat.S_IFCHR, os.makedev(195, minor))
        (nodes / name).chmod(0o666)
    hub = Platform(work / "data", host=next_loopback())
    hub.gpu_nodes = nodes
    hub.start(
        "c.JobQueue.tick_interval = 0.2\nc.Login.lockout_seconds = 600\nc.Platform.inference_service = True\n"
        f"c.Roles.group_roles = {{'gpu': ['gpulab-gpu']}}\nc.AccountSpawner.gpu_devices = '{nodes}/nvidia*'\n"
        f"c.Spawner.mem_limit = '{SERVER_MEMORY}'\nc.Spawner.cpu_limit = {SERVER_CPUS}\n"
    )
    yield hub
    hub.stop()


def users_cli(hub: Platform, *args: str, run_as: pwd.struct_passwd | None = None) -> subprocess.CompletedProcess:
    as_account = {"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": []} if run_as else {}
    return subprocess.run(
        [sys.executable, "-m", "gpulab", "users", *args, "--data-dir", str(hub.data_dir)],
        capture_output=True,
        text=True,
        env=hub.env(),
        timeout=120,
        check=False,
        **as_account,
    )


def printed_password(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    [password] = re.findall(r"^password: (\S+)$", result.stdout, re.MULTILINE)
    return password


def refusal(hub: Platform, user: str, password: str) -> str:
    """The sign-in page's message for a refused sign-in."""
    with pytest.raises(PermissionError):
        password_login(hub.url, user, password)
    s = requests.Session()
    s.get(hub.url + "/hub/login", timeout=30)
    r = s.post(
        hub.url + "/hub/login",
        data={"username": user, "password": password, "_xsrf": s.cookies["_xsrf"]},
        allow_redirects=False,
        timeout=30,
    )
    assert r.status_code == 200, r.status_code
    return r.text


def test_each_user_signs_in_with_their_own_password_only(hub):
    assert not (hub.data_dir / "secrets" / "user-password").exists()  # the shared password is gone
    ann = printed_password(users_cli(hub, "add", "ann"))
    ben = printed_password(users_cli(hub, "add", "ben", "--group", "ml"))
    assert ann != ben
    password_login(hub.url, "ann", ann)
    password_login(hub.url, "ben", ben)
    assert "Wrong user name or password." in refusal(hub, "ben", ann)
    assert "Wrong user name or password." in refusal(hub, "newcomer", ann)
    assert "is not a valid user name" in refusal(hub, "Ann Smith", ann)

    again = users_cli(hub, "add", "ann")
    assert again.returncode == 2 and "user ann exists" in again.stderr
    bad = users_cli(hub, "add", "Bad.Name")
    assert bad.returncode == 2 and "Bad.Name" in bad.stderr, bad.stderr
    listed = users_cli(hub, "list").stdout
    assert re.search(rf"^ann\s+no\s+-\s+{hub.account_prefix}ann\s", listed, re.MULTILINE), listed
    assert re.search(rf"^ben\s+no\s+ml\s+{hub.account_prefix}ben\s", listed, re.MULTILINE), listed

    new = printed_password(users_cli(hub, "passwd", "ann"))
    assert "Wrong user name or password." in refusal(hub, "ann", ann)
    password_login(hub.url, "ann", new)

    weak = hub.data_dir.parent / "weak-password"
    weak.write_text("password\n")
    weak.chmod(0o600)
    refused = users_cli(hub, "passwd", "ann", "--password-file", str(weak))
    assert refused.returncode == 2 and "password: " in refused.stderr and "common" in refused.stderr

    for _ in range(5):  # Login.allowed_failed_logins
        refusal(hub, "ben", "not-bens-password")
    assert "Too many failed sign-ins as ben" in refusal(hub, "ben", ben)  # even the right password waits
    ben = printed_password(users_cli(hub, "passwd", "ben"))  # a new password lifts the lockout
    password_login(hub.url, "ben", ben)

    hub.spawn("ben")
    account = f"{hub.account_prefix}ben"
    assert pwd.getpwnam(account).pw_dir.startswith(str(hub.home_root))
    removed = users_cli(hub, "remove", "ben", "--purge")
    assert removed.returncode == 0, removed.stderr
    assert account not in {e.pw_name for e in pwd.getpwall()}
    assert "Wrong user name or password." in refusal(hub, "ben", ben)


def wait_for_process(account: str, text: str, timeout: float = 30) -> psutil.Process:
    """The process of ``account`` whose command line has ``text`` (a job itself, not its runner)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in psutil.process_iter(["username", "cmdline"]):
            cmdline = " ".join(p.info["cmdline"] or [])
            if p.info["username"] == account and text in cmdline and "gpulab.runner" not in cmdline:
                return p
        time.sleep(0.2)
    raise AssertionError(f"no process of {account} running {text!r}")


def _secrets(hub: Platform, alice_server_env: dict, alice_job_env: dict) -> dict[str, str]:
    """Every secret alice and the platform hold, by where it came from."""
    out = {
        "alice's server token": alice_server_env["JUPYTERHUB_API_TOKEN"],
        "alice's job token": alice_job_env["GPULAB_JOB_TOKEN"],
        "admin token": hub.admin_token,
    }
    for path in [
        *(hub.data_dir / "hub").rglob("*token*"),
        hub.data_dir / "hub" / "jupyterhub_cookie_secret",
        hub.data_dir / "secrets" / "admin-password",
    ]:
        out[str(path)] = path.read_text().strip()
    return out


def test_kernels_and_jobs_reach_nothing_of_other_users_or_the_platform(hub):
    hub.create_user("alice")
    hub.create_user("bob")
    alice, bob = Client(hub, "alice"), Client(hub, "bob")
    alice_env = hub.server_env("alice")
    done = alice.submit(source="print('alice-private-log-line')\nopen('result.txt', 'w').write('alice-result')\n")
    assert alice.wait(done["id"])["state"] == "succeeded", alice.logs(done["id"])
    running = alice.submit(entrypoint=["python", "-c", "import time; time.sleep(300)"])
    alice.wait(running["id"], states=("running",))
    alice_job = wait_for_process(f"{hub.account_prefix}alice", "time.sleep(300)")
    alice_home = pwd.getpwnam(f"{hub.account_prefix}alice").pw_dir
    assert os.stat(alice_home).st_mode & 0o777 == 0o700
    notes = os.path.join(alice_home, "notes.txt")
    with open(notes, "w") as f:
        f.write("alice's notes")
    account = pwd.getpwnam(f"{hub.account_prefix}alice")
    os.chown(notes, account.pw_uid, account.pw_gid)

    job_dir = hub.data_dir / "jobs" / "alice" / done["id"]
    known = [str(p) for p in hub.data_dir.rglob("*") if p.is_file()] + [notes]
    assert str(job_dir / "attempt-1.log") in known and str(job_dir / "work" / "result.txt") in known
    [service] = [p for p in hub.descendants() if p.cmdline()[-2:] == ["-m", "gpulab.services.mlflow"]]
    mlflow = service.environ()["JUPYTERHUB_SERVICE_URL"].rstrip("/")
    hub.wait_for_mlflow(hub.token("alice"))
    assert (hub.data_dir / "mlflow" / "run" / "mlflow.sock").is_socket()  # there to be probed
    triton = [hub.data_dir / "triton" / name for name in ("grpc.sock:0", "http.sock", "metrics.sock")]
    deadline = time.monotonic() + 120
    while not all(path.exists() for path in triton):  # Triton's too
        assert time.monotonic() < deadline, "the embedded Triton did not start"
        time.sleep(0.5)
    targets = {
        "files": known,
        "trees": [str(hub.data_dir), alice_home],
        "sockets": [str(hub.data_dir / "mlflow" / "run" / "mlflow.sock"), *map(str, triton)],
        "urls": [
            f"{mlflow}/services/mlflow/api/2.0/mlflow/experiments/search?max_results=1",
            f"{hub.url}/services/mlflow/api/2.0/mlflow/experiments/search?max_results=1",
            f"{hub.url}/services/gpulab-infer/metrics",
        ],
    }
    secrets = _secrets(hub, alice_env, alice_job.environ())

    bob_server = hub.spawn("bob")
    results = {"kernel": parse(run_in_server_kernel(bob_server, hub.token("bob"), probe_source(targets)))}
    job = bob.submit(source=probe_source(targets))
    assert bob.wait(job["id"])["state"] == "succeeded", bob.logs(job["id"])
    results["job"] = parse(bob.logs(job["id"]))

    for where, result in results.items():
        print(f"{where}: {result['probes']} probes as {result['me']}: {len(result['findings'])} findings")
        assert result["me"] == f"{hub.account_prefix}bob", where
        assert result["findings"] == [], (where, result["findings"])
        seen = "\n".join(result["cmdlines"])
        assert [name for name, value in secrets.items() if value in seen] == [], where
        assert result["probes"] > len(known)
    alice.request("POST", f"/jobs/{running['id']}/cancel")


def test_without_root_only_the_starting_user_signs_in_and_adding_users_is_refused(tmp_path_factory):
    hub = Platform(tmp_path_factory.mktemp("personal") / "data", host=next_loopback())
    owner = f"{hub.account_prefix}owner"
    subprocess.run(["useradd", "--create-home", "--home-dir", str(hub.home_root / owner), owner], check=True)
    try:
        hub.data_dir.mkdir(parents=True)
        hub.start("c.Platform.mlflow_service = False\nc.Platform.jobs_service = False\n", run_as=pwd.getpwnam(owner))
        password = (hub.data_dir / "secrets" / "admin-password").read_text().strip()
        assert (hub.data_dir / "secrets" / "admin-password").stat().st_uid == pwd.getpwnam(owner).pw_uid
        password_login(hub.url, owner, password)  # the owner is the admin
        assert f"personal gpulab: only {owner} may sign in." in refusal(hub, "admin", password)

        added = users_cli(hub, "add", "friend", run_as=pwd.getpwnam(owner))
        assert added.returncode == 2, added.stdout
        assert f"this is {owner}'s personal platform" in added.stderr and "start it as root" in added.stderr
        assert "friend" not in {u["name"] for u in hub.api("GET", "/users").json()}
    finally:
        hub.stop()


def test_a_job_cannot_start_in_a_folder_its_owner_may_not_enter(hub):
    hub.create_user("carl")
    other = hub.user_dir("dora")  # in dora's 0700 home
    (other / "plans.txt").write_text("dora's plans")
    carl = Client(hub, "carl")
    job = carl.submit(entrypoint=["python", "-c", "import os; print(os.listdir('.'))"], working_dir=str(other))
    done = carl.wait(job["id"])
    log = carl.logs(job["id"])
    assert done["state"] == "failed" and "Permission denied" in log and "plans.txt" not in log, (done, log)


OPEN_GPU_NODES = """
import errno, os
for line in open("/proc/self/cgroup").read().splitlines():
    print("cgroup-" + line.split(":")[1], line.split(":", 2)[2])
print("cuda", repr(os.environ.get("CUDA_VISIBLE_DEVICES")))
for name in ("nvidia0", "nvidiactl"):
    try:
        os.close(os.open({nodes!r} + "/" + name, os.O_RDWR))
        print(name, "opened")
    except OSError as e:
        print(name, errno.errorcode[e.errno])
"""


def cgroup_dir(seen: dict, controller: str) -> Path:
    """The v1 cgroup directory for ``controller`` in the ``cgroup-<controllers> <path>`` lines a process printed."""
    [path] = [v for k, v in seen.items() if k.startswith("cgroup-") and controller in k[7:].split(",")]
    return cgroups.ROOT / controller / path.lstrip("/")


@pytest.mark.skipif(
    cgroups.version() != 1 or not os.access(cgroups.ROOT / "devices", os.W_OK),
    reason="needs cgroup v1's devices controller, writable (root)",
)
def test_servers_hold_their_limits_and_only_gpu_users_open_gpu_device_nodes(hub):
    """Kernels run in their server's cgroup: Spawner.mem_limit and cpu_limit hold there, and a user without
    custom:gpulab:gpu cannot open a GPU device node (EPERM from the devices cgroup; a node one may open
    answers ENXIO, as no driver is behind it). Stopping the server removes its group and what was left in it."""
    hub.create_user("gina")
    hub.create_user("gus", groups=["gpu"])
    code = OPEN_GPU_NODES.format(nodes=str(hub.gpu_nodes))
    seen = {}
    for user in ("gina", "gus"):
        output = run_in_server_kernel(hub.spawn(user), hub.token(user), code)
        seen[user] = dict(line.split(" ", 1) for line in output.strip().splitlines())
    print(seen)
    for name, user in seen.items():  # the kernel is in its server's group, with the server's limits
        assert (cgroup_dir(user, "memory") / "memory.limit_in_bytes").read_text().strip() == str(2 * 1024**3)
        cpu = cgroup_dir(user, "cpu")
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == str(int(SERVER_CPUS * 100_000)), cpu
        # named after the account, the machine's alone (another platform here has a user of the same hub id)
        assert cpu.name == cgroup_dir(user, "devices").name == f"server-{hub.account_prefix}{name}-default", cpu
    assert seen["gina"]["nvidia0"] == "EPERM" and seen["gina"]["nvidiactl"] == "EPERM", seen
    assert seen["gina"]["cuda"] == "''", seen
    assert seen["gus"]["nvidia0"] == "ENXIO" and seen["gus"]["nvidiactl"] == "ENXIO", seen

    account = pwd.getpwnam(f"{hub.account_prefix}gina").pw_uid
    left = subprocess.Popen(["sleep", "600"], user=account, start_new_session=True)  # left behind, outside Jupyter
    group = cgroup_dir(seen["gina"], "memory")
    (group / "cgroup.procs").write_text(str(left.pid))
    # the server of another platform's gina on this machine (her account there has its own prefix): left alone
    other = group.parent / "server-gtother-gina-default"
    other.mkdir()
    theirs = subprocess.Popen(["sleep", "600"], start_new_session=True)
    (other / "cgroup.procs").write_text(str(theirs.pid))
    try:
        hub.stop_server("gina")
        assert left.wait(timeout=30) == -9  # killed with the server's group
        assert not group.exists()
        assert theirs.poll() is None
    finally:
        theirs.kill()
        theirs.wait()
        other.rmdir()


def test_the_job_launcher_does_only_what_attempts_need_as_root(tmp_path):
    """The root half of the job service (what a taken-over job service could ask of it): it hands over only the
    service's own files, signals only attempts' process groups, and takes only refs as cgroup names."""
    service_uid = 65534  # the job service's account, for this launcher
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    config = {
        "state_dir": str(tmp_path),
        "service_uid": service_uid,
        "fd": theirs.fileno(),
        "policy": {"account_prefix": "gtlaunch-"},
    }
    proc = subprocess.Popen(
        [sys.executable, "-I", "-m", launcher.__name__, json.dumps(config)], pass_fds=[theirs.fileno()]
    )
    theirs.close()
    client = launcher.LauncherClient(mine, proc, str(tmp_path))
    ours = subprocess.Popen(["sleep", "60"], start_new_session=True)  # root's, in a group of its own
    orphaned = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 0.5"], start_new_session=True)
    orphaned_ref = launcher.ref_of(psutil.Process(orphaned.pid))
    try:
        log = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
        etc = os.open("/etc", os.O_RDONLY | os.O_DIRECTORY)  # root's: must never be given to a user's account
        request = {"owner": "mallory", "argv": ["true"], "cwd": "/", "env": {}}
        with pytest.raises(launcher.LaunchError, match="work dir is not a directory of the job service's account"):
            client.start(request, log, etc)
        assert os.stat("/etc").st_uid == 0
        with pytest.raises(launcher.LaunchError, match=f"process {ours.pid} is not an attempt's supervisor"):
            client.signal(launcher.ref_of(psutil.Process(ours.pid)), signal.SIGTERM)
        orphaned.wait()  # its leader gone, a root process left in its group
        with pytest.raises(launcher.LaunchError, match="has a root process and no attempt's supervisor"):
            client.signal(orphaned_ref, signal.SIGTERM)
        for ref in ("../../memory", f"{ours.pid}"):
            with pytest.raises(launcher.LaunchError, match="not an attempt's ref"):
                client.remove_cgroup(ref)
        assert ours.poll() is None
        assert client.signal(f"{2**22 + 1}:1.00", signal.SIGTERM) is False  # no such group
    finally:
        for fd in (log, etc):
            os.close(fd)
        client.close()
        os.killpg(orphaned.pid, signal.SIGKILL)
        ours.kill()
        ours.wait()
    assert proc.returncode == 0
    with contextlib.suppress(KeyError):
        pwd.getpwnam("gtlaunch-mallory")
        pytest.fail("the launcher made an account for a refused start")
