"""OpenTelemetry setup shared by every gpulab process.

Call :func:`setup_tracing` once at process start; use :func:`tracer` to make
spans, :func:`inject` on outgoing HTTP headers and :func:`span_from_headers`
around incoming requests so one trace spans hub, services and workers.
"""

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_lock = threading.Lock()
_provider: TracerProvider | None = None
_exporting = False


def setup_tracing(service_name: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """Install the process-wide tracer provider and the W3C TraceContext propagator.

    Spans go to an OTLP/HTTP collector (batched) when ``OTEL_EXPORTER_OTLP_ENDPOINT``
    (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, and nowhere otherwise; spans
    are still created so trace context propagates. ``exporter`` (e.g. tests'
    ``InMemorySpanExporter``) is attached with a synchronous processor.

    Idempotent: later calls return the first provider (``service_name`` of the
    first call wins) and only attach ``exporter`` if one is given.
    """
    global _provider, _exporting
    with _lock:
        if _provider is None:
            _provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
            if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
                _exporting = True
            trace.set_tracer_provider(_provider)
            propagate.set_global_textmap(TraceContextTextMapPropagator())
        if exporter is not None:
            _provider.add_span_processor(SimpleSpanProcessor(exporter))
            _exporting = True
        return _provider


def exporting() -> bool:
    """Whether this process's spans go anywhere (an OTLP collector, a test's exporter). Hot paths make spans only
    then: an SDK span that goes nowhere still costs tens of microseconds."""
    return _exporting


def tracer(name: str) -> trace.Tracer:
    """Return a tracer from the global provider (a no-op one before setup)."""
    return trace.get_tracer(name)


def inject(headers: dict) -> dict:
    """Add ``traceparent`` for the current span to ``headers`` (in place) and return it."""
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str]) -> Context:
    """Return the context carried by ``headers`` (case-insensitive ``traceparent``)."""
    return propagate.extract({k.lower(): v for k, v in headers.items()})


@contextmanager
def span_from_headers(tracer_name: str, span_name: str, headers: Mapping[str, str]) -> Iterator[trace.Span]:
    """Run the block in a current SERVER span, child of the incoming ``traceparent`` if any."""
    with tracer(tracer_name).start_as_current_span(
        span_name, context=extract(headers), kind=trace.SpanKind.SERVER
    ) as span:
        yield span
