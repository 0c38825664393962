"""Run code in a kernel of a user's spawned JupyterLab server, over its REST and websocket API,
as JupyterLab does: the kernel runs where and as whom the user's server runs."""

import json
import time
import uuid

import requests
import websocket


def run_in_server_kernel(server_url: str, token: str, code: str, timeout: float = 120) -> str:
    """Start a kernel in the server at ``server_url`` (``.../user/<name>/``), run ``code``, return its stdout."""
    headers = {"Authorization": f"token {token}"}
    r = requests.post(f"{server_url}api/kernels", json={"name": "python3"}, headers=headers, timeout=60)
    r.raise_for_status()
    kernel_id = r.json()["id"]
    ws_url = server_url.replace("http", "ws", 1) + f"api/kernels/{kernel_id}/channels"
    ws = websocket.create_connection(ws_url, header=[f"Authorization: token {token}"], timeout=timeout)
    try:
        msg_id = uuid.uuid4().hex
        ws.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "msg_type": "execute_request",
                        "username": "test",
                        "session": uuid.uuid4().hex,
                        "version": "5.3",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "channel": "shell",
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": False,
                        "user_expressions": {},
                        "allow_stdin": False,
                    },
                }
            )
        )
        out, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and content["name"] == "stdout":
                out.append(content["text"])
            elif kind == "error":
                raise RuntimeError("\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(out)
        raise TimeoutError(f"kernel did not finish in {timeout}s")
    finally:
        ws.close()
        requests.delete(f"{server_url}api/kernels/{kernel_id}", headers=headers, timeout=60)
