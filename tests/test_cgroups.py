"""cgroup v2's device rules, on this machine's kernel: its cpu and memory controllers are bound to v1
hierarchies, but the unified (v2) tree can be mounted beside them and its groups take eBPF device programs,
which is all these tests need. The GPU device nodes are made for the test (NVIDIA's major 195, no driver
behind them): a node the group may open answers ENXIO, one its program refuses EPERM."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gpulab import cgroups

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or "cgroup2" not in Path("/proc/filesystems").read_text(),
    reason="needs root and cgroup2 (CI runs as root)",
)

OPEN = """
import errno, os, sys
for path in sys.argv[1:]:
    try:
        os.close(os.open(path, os.O_RDONLY))
        print(os.path.basename(path), "opened")
    except OSError as e:
        print(os.path.basename(path), errno.errorcode[e.errno])
"""


@pytest.fixture
def unified(tmp_path):
    """The v2 tree, mounted for the test (one tree per machine: its groups outlive the mount)."""
    mount = tmp_path / "cgroup2"
    mount.mkdir()
    subprocess.run(["mount", "-t", "cgroup2", "none", str(mount)], check=True)
    try:
        yield mount
    finally:
        parent = mount / cgroups.own_groups().get("", "/").lstrip("/") / cgroups.PARENT
        try:
            parent.rmdir()
        except FileNotFoundError:
            pass
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def nodes(tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()
    for name, minor in (("nvidia0", 0), ("nvidia1", 1), ("nvidiactl", 255)):
        os.mknod(dev / name, 0o666 | stat.S_IFCHR, os.makedev(195, minor))
    os.mknod(dev / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return dev


def opens(group: cgroups.Cgroup, paths: list[Path]) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-c", OPEN, *map(str, paths)],
        preexec_fn=group.enter,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split() for line in out.splitlines())


def test_a_v2_group_refuses_the_gpu_device_nodes_it_was_not_given(unified, nodes):
    paths = sorted(nodes.iterdir())
    one_gpu = cgroups.Limits(deny_devices=cgroups.gpu_devices_denied(str(nodes / "nvidia*"), [0]))
    group = cgroups.Cgroup("test-one-gpu", one_gpu, root=unified)
    assert group.version == 2
    group.create()
    try:
        seen = opens(group, paths)
        assert seen == {"nvidia0": "ENXIO", "nvidia1": "EPERM", "nvidiactl": "ENXIO", "null": "opened"}, seen
    finally:
        group.remove()
    no_gpu = cgroups.Limits(deny_devices=cgroups.gpu_devices_denied(str(nodes / "nvidia*"), []))
    group = cgroups.Cgroup("test-no-gpu", no_gpu, root=unified)
    group.create()
    try:
        seen = opens(group, paths)
        assert seen == {"nvidia0": "EPERM", "nvidia1": "EPERM", "nvidiactl": "EPERM", "null": "opened"}, seen
        # mknod is refused too (v1's "rwm"): a user cannot make themselves another node for the same device
        mknod = f"import os; os.mknod({str(nodes / 'again')!r}, 0o666 | {stat.S_IFCHR}, os.makedev(195, 0))"
        child = subprocess.run(
            [sys.executable, "-c", mknod], preexec_fn=group.enter, capture_output=True, text=True, check=False
        )
        assert child.returncode == 1 and "PermissionError" in child.stderr, child.stderr
    finally:
        group.remove()
    assert not group.dirs["devices"].exists()
    outside = subprocess.run([sys.executable, "-c", OPEN, *map(str, paths)], capture_output=True, text=True, check=True)
    assert "EPERM" not in outside.stdout, outside.stdout  # the program is the group's, not the machine's


def test_a_v2_limit_whose_controller_is_not_offered_falls_back_naming_it(unified):
    """Here cpu and memory belong to v1: a v2 group cannot hold them, so the caller falls back to rlimits."""
    if "memory" in (unified / "cgroup.controllers").read_text().split():
        pytest.skip("this machine's v2 tree offers the memory controller")
    group = cgroups.Cgroup("test-memory", cgroups.Limits(memory=256 * cgroups.MiB), root=unified)
    error = group.create_or_fall_back()
    assert isinstance(error, OSError) and "controller memory not available" in str(error), error
    assert group.dirs == {}  # enter() applies RLIMIT_AS instead
