"""gpulab.tracing: propagation with an in-memory exporter; exporter choice in fresh processes."""

import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gpulab import tracing

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@pytest.fixture(scope="module")
def exporter():
    exporter = InMemorySpanExporter()
    tracing.setup_tracing("gpulab-tests", exporter=exporter)
    return exporter


def test_exporting_once_an_exporter_is_attached(exporter):
    assert tracing.exporting()  # hot paths (gpulab.infer) make their spans


def test_span_from_headers_continues_incoming_trace(exporter):
    headers = {"Traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"}
    with tracing.span_from_headers("tests", "handle request", headers):
        pass
    span = exporter.get_finished_spans()[-1]
    assert span.name == "handle request"
    assert span.kind is trace.SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT_SPAN_ID


def test_inject_adds_traceparent_of_current_span(exporter):
    with tracing.tracer("tests").start_as_current_span("client call") as span:
        headers = tracing.inject({"Accept": "application/json"})
    match = TRACEPARENT.match(headers["traceparent"])
    assert match, headers
    assert match.group(1, 2) == (
        format(span.get_span_context().trace_id, "032x"),
        format(span.get_span_context().span_id, "016x"),
    )
    assert int(match.group(3), 16) & 0x01  # sampled
    extracted = trace.get_current_span(tracing.extract(headers)).get_span_context()
    assert extracted.trace_id == span.get_span_context().trace_id
    assert headers["Accept"] == "application/json"


def test_inject_without_span_adds_nothing(exporter):
    assert tracing.inject({}) == {}


def test_setup_is_idempotent(exporter):
    provider = tracing.setup_tracing("another-name")
    assert provider is tracing.setup_tracing("gpulab-tests")
    assert trace.get_tracer_provider() is provider


def _run_fresh(code: str, **env: str) -> str:
    """Run ``code`` in a new interpreter with no OTEL_* variables except ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


def test_no_exporter_when_endpoint_unset():
    code = (
        "from gpulab.tracing import exporting, setup_tracing\n"
        "p = setup_tracing('t')\n"
        "print(len(p._active_span_processor._span_processors), exporting())\n"
    )
    assert _run_fresh(code) == "0 False"


def test_otlp_http_export_when_endpoint_set():
    requests = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            requests.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = (
            "from gpulab.tracing import setup_tracing, tracer\n"
            "p = setup_tracing('exported-service')\n"
            "with tracer('t').start_as_current_span('exported-span'): pass\n"
            "p.shutdown()\n"
        )
        _run_fresh(code, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    assert [(path, ctype) for path, ctype, _ in requests] == [("/v1/traces", "application/x-protobuf")]
    assert b"exported-span" in requests[0][2] and b"exported-service" in requests[0][2]
