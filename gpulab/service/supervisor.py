"""One way to keep a service's child processes running: Triton, nginx, ``mlflow server``, extra gateway processes.

:class:`Supervisor` starts each :class:`Child`, watches it from the event loop, and when one exits logs its exit
status and the end of its log and starts it again: at once after a run of at least ``healthy_after`` seconds,
else after 1, 2, 4 ... ``max_delay`` seconds while it keeps failing early. On shutdown it stops every child by
its PID (the child's stop signal, then SIGKILL to its process group after a timeout). Nothing here blocks the
event loop: processes are started with ``Popen`` (fast) and waited for in threads or by polling.
"""

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


class ChildFailed(Exception):
    """A child exited before it was ready, or was not ready in time."""


@dataclass
class Child:
    """A process a service keeps running.

    ``spawn`` starts it (a ``Popen``; called on the event loop's thread, which lives as long as the service, so a
    child tied to its parent with ``PR_SET_PDEATHSIG`` stays up); ``ready``, when given, returns once the new
    process serves (raising :class:`ChildFailed` if it exits first); ``log_tail`` gives the end of its log for the
    exit message. A child started with ``start_new_session`` has its process group killed when it is stopped or
    found dead (``group``), so that workers a killed master leaves behind go too."""

    name: str
    spawn: Callable[[], subprocess.Popen]
    ready: Callable[[subprocess.Popen], Awaitable[None]] | None = None
    log_tail: Callable[[], str] | None = None
    stop_signal: int = signal.SIGTERM
    group: bool = False
    proc: subprocess.Popen | None = field(default=None, init=False)
    started_at: float = field(default=0.0, init=False)
    delay: float = field(default=0.0, init=False)


class Supervisor:
    def __init__(
        self, log: logging.Logger, healthy_after: float = 10.0, max_delay: float = 30.0, poll_interval: float = 0.5
    ):
        self.log = log
        self.healthy_after, self.max_delay, self.poll_interval = healthy_after, max_delay, poll_interval
        self.children: list[Child] = []
        self._stopping = False

    async def start(self, child: Child, retry: bool = False) -> bool:
        """Start ``child``, wait until it is ready, and supervise it from then on (:meth:`run`). If it does not
        get ready: :class:`ChildFailed` (nothing is left running), or with ``retry`` the failure is logged, False
        returned, and :meth:`run` starts it again, backing off, as it would after an exit."""
        try:
            await self._launch(child)
        except ChildFailed as e:
            if not retry:
                raise
            self.log.error("%s", e)
        self.children.append(child)
        return child.proc.poll() is None

    async def _launch(self, child: Child) -> None:
        child.proc = child.spawn()
        child.started_at = time.monotonic()
        if child.ready is not None:
            try:
                await child.ready(child.proc)
            except BaseException:
                await self._halt(child, timeout=5.0)
                raise

    def next_delay(self, child: Child, now: float) -> float:
        """The wait before starting ``child`` again: none after a healthy run, else doubling up to the cap."""
        if now - child.started_at >= self.healthy_after:
            return 0.0
        return min(self.max_delay, max(1.0, child.delay * 2))

    async def run(self) -> None:
        """Restart children that exit, until cancelled or :meth:`stop`."""
        due: dict[int, float] = {}
        while not self._stopping:
            await asyncio.sleep(self.poll_interval)
            now = time.monotonic()
            for child in list(self.children):
                if self._stopping or child.proc is None or child.proc.poll() is None:
                    continue
                key = id(child)
                if key not in due:
                    child.delay = self.next_delay(child, now)
                    due[key] = now + child.delay
                    self._kill_group(child)
                    tail = child.log_tail() if child.log_tail else ""
                    self.log.error(
                        "%s (pid %d) exited with status %s; starting it again in %.0f s%s",
                        child.name,
                        child.proc.pid,
                        child.proc.returncode,
                        child.delay,
                        f"; its log ends:\n{tail}" if tail else "",
                    )
                if now >= due[key]:
                    del due[key]
                    try:
                        await self._launch(child)
                        self.log.info("%s started again (pid %d)", child.name, child.proc.pid)
                    except (ChildFailed, OSError) as e:
                        self.log.error("%s did not start: %s", child.name, e)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop every child by PID: its stop signal, SIGKILL (to its group) after ``timeout``."""
        self._stopping = True
        await asyncio.gather(*(self._halt(child, timeout) for child in self.children))

    async def _halt(self, child: Child, timeout: float) -> None:
        proc = child.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(child.stop_signal)
            try:
                await asyncio.to_thread(proc.wait, timeout)
            except subprocess.TimeoutExpired:
                self.log.warning("%s (pid %d) did not stop in %.0f s: killing it", child.name, proc.pid, timeout)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.to_thread(proc.wait)
        self._kill_group(child)

    @staticmethod
    def _kill_group(child: Child) -> None:
        if child.group and child.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, signal.SIGKILL)


async def wait_until(
    check: Callable[[], Awaitable[bool]],
    proc: subprocess.Popen,
    timeout: float,
    what: str,
    log_tail: Callable[[], str] | None = None,
    interval: float = 0.2,
) -> None:
    """Return once ``check()`` is true; :class:`ChildFailed` if ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = log_tail() if log_tail else ""
            raise ChildFailed(f"{what} exited with status {proc.returncode}" + (f":\n{tail}" if tail else ""))
        if await check():
            return
        if time.monotonic() > deadline:
            raise ChildFailed(f"{what} was not ready in {timeout:.0f} s")
        await asyncio.sleep(interval)
