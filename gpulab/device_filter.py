"""cgroup v2's device rules: an eBPF program that refuses the device nodes a job or server may not open, what
cgroup v1's ``devices.deny`` does.

v2 has no devices file: on every open and mknod of a device node the kernel runs the
``BPF_PROG_TYPE_CGROUP_DEVICE`` programs attached to the process's cgroup and its ancestors, and refuses
(EPERM) unless all of them allow it. gpulab assembles the program itself, as runc and systemd do: five
instructions per denied node, loaded with the ``bpf`` syscall through ctypes, so the host needs no libbpf,
bcc or clang. It is attached with ``BPF_F_ALLOW_MULTI``, so it runs beside whatever the platform's own envelope
(systemd, a container runtime) attached above, and the cgroup keeps it: it goes when the cgroup is removed.
"""

import ctypes
import os
import platform
import struct
from pathlib import Path

SYSCALL_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280}  # little-endian machines, as the encoding below
BPF_PROG_LOAD, BPF_PROG_ATTACH = 5, 8
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 2
ATTR_SIZE = 128  # bytes of ``union bpf_attr`` passed: enough for both commands, the rest zero as the kernel wants
DEVICE_TYPE = {"b": 1, "c": 2}  # BPF_DEVCG_DEV_BLOCK, BPF_DEVCG_DEV_CHAR
LOG_SIZE = 64 * 1024

# Opcodes (linux/bpf_common.h): load a u32 from the context, and with an immediate, jump-if-not-equal, move, and.
LDX_W, JNE_K, MOV64_K, AND64_K, EXIT = 0x61, 0x55, 0xB7, 0x57, 0x95


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def program(deny: tuple) -> bytes:
    """The instructions: refuse (return 0) an access to any ``(kind, major, minor)`` in ``deny``, allow the rest.

    The context is ``struct bpf_cgroup_dev_ctx {u32 access_type; u32 major; u32 minor;}``, the device type in
    the low 16 bits of ``access_type``. Every access (read, write, mknod) to a denied node is refused, as v1's
    ``rwm``."""
    out = [_insn(LDX_W, 2, 1, 0), _insn(AND64_K, 2, imm=0xFFFF), _insn(LDX_W, 3, 1, 4), _insn(LDX_W, 4, 1, 8)]
    for kind, major, minor in deny:
        out += [
            _insn(JNE_K, 2, off=4, imm=DEVICE_TYPE[kind]),
            _insn(JNE_K, 3, off=3, imm=major),
            _insn(JNE_K, 4, off=2, imm=minor),
            _insn(MOV64_K, 0, imm=0),
            _insn(EXIT),
        ]
    out += [_insn(MOV64_K, 0, imm=1), _insn(EXIT)]
    return b"".join(out)


def _bpf(command: int, attr: bytes) -> int:
    number = SYSCALL_BPF.get(platform.machine())
    if number is None:
        raise OSError(38, f"cgroup v2 device rules: no bpf syscall number known for {platform.machine()}")
    buf = ctypes.create_string_buffer(attr, ATTR_SIZE)
    result = ctypes.CDLL(None, use_errno=True).syscall(number, command, buf, ATTR_SIZE)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


def deny_devices(group: Path, deny: tuple) -> None:
    """Attach a program refusing ``deny`` to the v2 cgroup ``group``; OSError (with the verifier's log when the
    kernel refuses the program) where it cannot, for the caller to fall back and report."""
    code = program(deny)
    insns, license_, log = (
        ctypes.create_string_buffer(code, len(code)),
        ctypes.create_string_buffer(b"GPL"),
        ctypes.create_string_buffer(LOG_SIZE),
    )
    load = struct.pack(
        "<IIQQIIQII16sII",
        BPF_PROG_TYPE_CGROUP_DEVICE,
        len(code) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(license_),
        1,
        LOG_SIZE,
        ctypes.addressof(log),
        0,
        0,
        b"gpulab_devices",
        0,
        BPF_CGROUP_DEVICE,
    )
    try:
        prog = _bpf(BPF_PROG_LOAD, load)
    except OSError as e:
        verifier = log.value.decode(errors="replace").strip()
        raise OSError(
            e.errno, f"loading the device program: {e.strerror}" + (f": {verifier}" if verifier else "")
        ) from None
    try:
        target = os.open(group, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _bpf(BPF_PROG_ATTACH, struct.pack("<IIIII", target, prog, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI, 0))
        finally:
            os.close(target)
    finally:
        os.close(prog)  # the cgroup holds its own reference
