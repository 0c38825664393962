"""A real IPython kernel (jupyter_client) for tests: run code, keep every iopub message."""

import queue
import time
from dataclasses import dataclass, field

from jupyter_client.manager import KernelManager


@dataclass
class Result:
    """What one execution produced: its reply and the iopub messages seen meanwhile (any parent)."""

    reply: dict
    messages: list[dict] = field(default_factory=list)
    msg_id: str = ""

    def own(self, msg_type: str) -> list[dict]:
        return [
            m["content"]
            for m in self.messages
            if m["msg_type"] == msg_type and m["parent_header"].get("msg_id") == self.msg_id
        ]

    def stream(self, name: str) -> str:
        return "".join(c["text"] for c in self.own("stream") if c["name"] == name)

    @property
    def stdout(self) -> str:
        return self.stream("stdout")

    @property
    def stderr(self) -> str:
        return self.stream("stderr")

    @property
    def errors(self) -> list[dict]:
        return self.own("error")

    def data(self, mime: str) -> list:
        return [c["data"][mime] for t in ("display_data", "execute_result") for c in self.own(t) if mime in c["data"]]


class Kernel:
    """``kernel_name`` started with ``env`` in ``cwd``; stop with :meth:`stop`."""

    def __init__(self, kernel_name: str = "python3", env: dict | None = None, cwd: str | None = None):
        self.km = KernelManager(kernel_name=kernel_name)
        started = time.monotonic()
        self.km.start_kernel(env=env, cwd=cwd)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.startup_seconds = time.monotonic() - started

    def run(self, code: str, timeout: float = 120) -> Result:
        msg_id = self.kc.execute(code)
        result = Result(reply={}, msg_id=msg_id)
        deadline = time.monotonic() + timeout
        idle = False
        while not idle:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no idle after {timeout}s running {code[:80]!r}") from None
            result.messages.append(msg)
            idle = (
                msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"
                and msg["parent_header"].get("msg_id") == msg_id
            )
        result.reply = self.kc.get_shell_msg(timeout=max(1, deadline - time.monotonic()))["content"]
        return result

    def stop(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)
