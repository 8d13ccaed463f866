"""One log format for every service, to stderr: text (time, service, level, logger, request id, message) or,
with `--log-format json` / HMI_LOG_FORMAT=json, one JSON object per line with the same fields (plus the
trace id when tracing is on), for log collectors."""
from __future__ import annotations

import json
import logging
import os
import time

from services.common.call_context import current_request_id

LOG_FORMATS = ("text", "json")


class RequestIds(logging.Filter):
    """Adds the request id of the call being handled (empty outside calls) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id()
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "service": self.service, "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            entry["request_id"] = request_id
        trace_id = _trace_id()
        if trace_id:
            entry["trace_id"] = trace_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _trace_id() -> str:
    from services.common import tracing
    if not tracing.enabled():
        return ""
    from opentelemetry import trace
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def setup_logging(service: str, log_format: str | None = None) -> logging.Logger:
    level = os.environ.get("HMI_LOG_LEVEL", "INFO").upper()
    log_format = (log_format or os.environ.get("HMI_LOG_FORMAT") or "text").lower()
    if log_format not in LOG_FORMATS:
        raise SystemExit(f"--log-format {log_format!r}: use text or json")
    handler = logging.StreamHandler()
    handler.addFilter(RequestIds())
    if log_format == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {service} %(levelname)s %(name)s%(request_tag)s: %(message)s"))
        handler.addFilter(_RequestTag())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level, logging.INFO))
    return logging.getLogger(f"hmi.{service}")


class _RequestTag(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        request_id = getattr(record, "request_id", "")
        record.request_tag = f" [{request_id}]" if request_id else ""
        return True
