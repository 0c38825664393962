"""Stopping processes a test or benchmark started, by PID (psutil checks the start time: a recycled PID
is never hit)."""

import psutil


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_after(procs: list[psutil.Process], timeout: float) -> None:
    """Wait up to ``timeout`` s for ``procs`` to end, then SIGKILL the rest."""
    _, left = psutil.wait_procs(procs, timeout=timeout)
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=5)


def terminate(procs: list[psutil.Process], timeout: float) -> None:
    """SIGTERM, then SIGKILL what is left after ``timeout`` s."""
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    kill_after(procs, timeout)
