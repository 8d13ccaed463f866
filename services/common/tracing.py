"""Following a request across gateway, compute and store: request ids (always) and OpenTelemetry spans
(when an exporter is configured; off by default).

Every incoming call gets a request id (services/common/call_context.py) and, with tracing on, a SERVER span
whose parent is the trace context the caller put in the call's metadata (W3C `traceparent`). Calls a
service makes carry both on (`outgoing_metadata`). The gateway's batches mix many requests: a batch's span
is a child of its first request and links to the others.

`--tracing` / HMI_TRACING: `off` (default), `otlp` (the OpenTelemetry SDK's OTLP/gRPC exporter, configured
by the standard OTEL_EXPORTER_OTLP_* variables), `otlp:HOST:PORT` (a collector there, plaintext), `console`
(spans on stderr) or `file:PATH` (one JSON span per line, appended; what the tests read). The packages come
with the `tracing` extra (`pip install 'hmi[tracing]'`).
"""
from __future__ import annotations

import contextlib
import json
import threading
from typing import Any, Iterable, Iterator

import grpc

from services.common.call_context import (
    REQUEST_ID_KEY,
    current_request_id,
    incoming_request_id,
    reset_request_id,
    set_request_id,
)
from services.common.health import is_health_method
from services.common.interception import run_inside

_tracer = None                          # an opentelemetry Tracer once setup_tracing configured one
_SKIPPED = ("/grpc.reflection.",)


def setup_tracing(service: str, exporter: str) -> None:
    """Installs a tracer provider for this process (`exporter` as described above)."""
    global _tracer
    exporter = (exporter or "off").strip()
    if exporter.lower() in ("", "off", "none"):
        _tracer = None
        return
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
    except ImportError:
        raise SystemExit("--tracing needs the OpenTelemetry packages: pip install 'hmi[tracing]'") from None
    provider = TracerProvider(resource=Resource.create({"service.name": f"hmi-{service}"}))
    if exporter.startswith("file:"):
        provider.add_span_processor(SimpleSpanProcessor(_file_exporter(exporter[len("file:"):])))
    elif exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp" or exporter.startswith("otlp:"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        endpoint = exporter[len("otlp:"):] or None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)
                                                       if endpoint else OTLPSpanExporter()))
    else:
        raise SystemExit(f"--tracing {exporter!r}: use off, otlp, otlp:HOST:PORT, console or file:PATH")
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("hmi")


def enabled() -> bool:
    return _tracer is not None


def shutdown_tracing() -> None:
    """Flushes spans still buffered (at exit)."""
    if _tracer is not None:
        from opentelemetry import trace
        provider = trace.get_tracer_provider()
        if hasattr(provider, "shutdown"):
            provider.shutdown()


def _file_exporter(path: str):
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class JsonLinesExporter(SpanExporter):
        """One JSON object per finished span, appended to a file (several processes may share it)."""

        def __init__(self) -> None:
            self._lock = threading.Lock()

        def export(self, spans) -> SpanExportResult:
            lines = "".join(json.dumps(json.loads(span.to_json()), separators=(",", ":")) + "\n" for span in spans)
            with self._lock, open(path, "a", encoding="utf-8") as out:
                out.write(lines)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            return None

    return JsonLinesExporter()


# ---- what crosses threads and processes ---------------------------------------------------------

def capture() -> Any:
    """The current trace context (None with tracing off), to start spans from on another thread."""
    if _tracer is None:
        return None
    from opentelemetry import context
    return context.get_current()


def outgoing_metadata(request_ids: str | None = None, span: Any = None) -> list[tuple[str, str]]:
    """Metadata for a call this service makes: the request id(s) and the trace context (of `span` when given,
    else the current one)."""
    metadata = []
    request_id = request_ids if request_ids is not None else current_request_id()
    if request_id:
        metadata.append((REQUEST_ID_KEY, request_id))
    if _tracer is not None:
        from opentelemetry import propagate, trace
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span) if span is not None else None)
        metadata.extend(carrier.items())
    return metadata


def start_client_span(name: str, parents: Iterable[Any] = ()) -> Any:
    """A CLIENT span for a call made on behalf of the requests whose contexts are `parents` (child of the
    first, linked to the rest); None with tracing off. End it with `end_span`."""
    if _tracer is None:
        return None
    from opentelemetry import trace
    contexts = [p for p in parents if p is not None]
    links = []
    for other in contexts[1:16]:
        span_context = trace.get_current_span(other).get_span_context()
        if span_context.is_valid:
            links.append(trace.Link(span_context))
    return _tracer.start_span(name, context=contexts[0] if contexts else None, kind=trace.SpanKind.CLIENT,
                              links=links)


def end_span(span: Any, code: grpc.StatusCode | None = None) -> None:
    if span is None:
        return
    if code is not None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            from opentelemetry.trace import Status, StatusCode
            span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


@contextlib.contextmanager
def span(name: str, **attributes) -> Iterator[Any]:
    """An INTERNAL span around a block (a no-op with tracing off)."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


# ---- the server side ----------------------------------------------------------------------------

class CallContext(grpc.ServerInterceptor):
    """Every handler runs with its call's request id (logs show it) and, with tracing on, inside a SERVER span
    that continues the caller's trace."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or is_health_method(method) or method.startswith(_SKIPPED):
            return handler
        metadata = tuple(handler_call_details.invocation_metadata or ())
        return run_inside(handler, lambda context: _serving(method, metadata, context))


@contextlib.contextmanager
def _serving(method: str, metadata, context) -> Iterator[None]:
    token = set_request_id(incoming_request_id(metadata))
    try:
        if _tracer is None:
            yield
            return
        from opentelemetry import propagate, trace
        parent = propagate.extract({key: value for key, value in metadata if isinstance(value, str)})
        with _tracer.start_as_current_span(method.lstrip("/"), context=parent, kind=trace.SpanKind.SERVER,
                                           record_exception=False, set_status_on_exception=False) as current:
            current.set_attribute("hmi.request_id", current_request_id())
            try:
                yield
            finally:
                code = _code_of(context)
                current.set_attribute("rpc.grpc.status_code", code.value[0])
                if code != grpc.StatusCode.OK:
                    from opentelemetry.trace import Status, StatusCode
                    current.set_status(Status(StatusCode.ERROR, code.name))
    finally:
        try:
            reset_request_id(token)
        except ValueError:      # a stream closed from another context: that context ends with it
            pass


def _code_of(context) -> grpc.StatusCode:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - a context without code() (in-process calls): count as OK
        code = None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
