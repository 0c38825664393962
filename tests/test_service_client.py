"""The one client of gpulab's hub services (``gpulab.service.client``), the same for kernels (blocking) and users'
servers (forwarding on tornado's loop): where a service is, what every request carries, how errors come back.
Against a real HTTP server on loopback; the services behind it are tested end to end elsewhere."""

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpulab import tracing
from gpulab.net import free_port
from gpulab.service.client import APIError, HubServiceClient, NotConfigured, Unreachable
from tests.support.net import next_loopback


class Recorder(BaseHTTPRequestHandler):
    """Answers ``/ok`` with 200 and the request's headers, ``/refused`` with gpulab's error body."""

    def _answer(self):
        if self.path.startswith("/api/ok"):
            status, body = 200, {"headers": dict(self.headers), "path": self.path}
        else:
            status, body = 403, {"error": {"code": "forbidden", "message": "not yours", "field": "resources.gpus"}}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def service():
    server = ThreadingHTTPServer((next_loopback(), 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{server.server_address[0]}:{server.server_address[1]}/api"
    server.shutdown()
    server.server_close()


def run(coroutine):
    """Run ``coroutine`` on a loop of its own in this thread (the caller's span stays current)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


def test_where_a_service_is_comes_from_the_hub_and_a_missing_variable_is_named():
    client = HubServiceClient.from_env(
        "gpulab-jobs", {"GPULAB_JOBS_URL": "http://hub/services/gpulab-jobs/api/v1/", "JUPYTERHUB_API_TOKEN": "t"}
    )
    assert (client.name, client.url, client.token) == ("gpulab-jobs", "http://hub/services/gpulab-jobs/api/v1", "t")
    with pytest.raises(NotConfigured, match="GPULAB_INFER_URL is not set"):
        HubServiceClient.from_env("gpulab-infer", {"JUPYTERHUB_API_TOKEN": "t"})
    with pytest.raises(NotConfigured, match="JUPYTERHUB_API_TOKEN is not set"):
        HubServiceClient.from_env("gpulab-jobs", {"GPULAB_JOBS_URL": "http://hub/"})


def test_both_paths_send_the_token_and_the_trace_context(service):
    tracing.setup_tracing("gpulab-test")
    client = HubServiceClient("gpulab-jobs", service, "secret-token")
    with tracing.tracer(__name__).start_as_current_span("caller") as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
        blocking = client.request("GET", "/ok?x=1").json()
        forwarded = json.loads(run(client.fetch("GET", "/ok", headers={"X-Forwarded-For": "10.0.0.9"})).body)
    for answer in (blocking, forwarded):
        headers = {k.lower(): v for k, v in answer["headers"].items()}
        assert headers["authorization"] == "token secret-token", headers
        assert trace_id in headers["traceparent"], headers
    assert blocking["path"] == "/api/ok?x=1"
    assert {k.lower(): v for k, v in forwarded["headers"].items()}["x-forwarded-for"] == "10.0.0.9"


def test_a_refusal_raises_in_kernels_and_comes_back_as_it_is_when_forwarded(service):
    client = HubServiceClient("gpulab-jobs", service, "t")
    with pytest.raises(APIError) as refused:
        client.request("POST", "/refused", json={})
    error = refused.value
    assert (error.status, error.code, error.field) == (403, "forbidden", "resources.gpus")
    assert str(error) == "not yours; ask an admin for GPU access, or request no GPUs"
    response = run(client.fetch("POST", "/refused", body=b"{}"))
    assert response.code == 403 and json.loads(response.body)["error"]["code"] == "forbidden"
    assert client.breaker.snapshot()["state"] == "closed"  # the service answered: not an outage


async def test_a_service_that_does_not_answer_is_named_and_opens_the_circuit_of_the_forwarding_path():
    url = f"http://{next_loopback()}:{free_port()}/services/gpulab-jobs/api/v1"
    client = HubServiceClient("gpulab-jobs", url, "t")
    with pytest.raises(Unreachable, match=r"gpulab-jobs is unreachable at http://127\.0\.[0-9.]+:\d+/services"):
        client.request("GET", "/jobs")
    for _ in range(client.breaker.failure_threshold):
        with pytest.raises(Unreachable, match="gpulab-jobs is unreachable"):
            await client.fetch("GET", "/jobs")
    with pytest.raises(Unreachable, match=r"gpulab-jobs at .* is unavailable \(circuit open"):
        await client.fetch("GET", "/jobs")
