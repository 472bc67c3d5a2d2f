"""Logging: set-up, the access log line, and JSON output.

One access line per request, written when it ends: time, route, method,
path (query keys only at info; values too at debug, since they may carry
personal data), status, duration, bytes, upstream time to first byte, and the
credential source with its access key id prefix. Never a secret: the line is
built from an ``Exchange`` record that holds none.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

access_log = logging.getLogger("signing_proxy.access")
# Libraries kept at warning whatever log_level says: botocore at debug prints request
# bodies, which carry passwords, secret hashes and tokens.
NOISY_LOGGERS = ("botocore", "boto3", "urllib3")


@dataclass(slots=True)
class Exchange:
    """What one request did, filled in as it goes; read by the access log and metrics."""

    method: str
    route: str = "-"
    path: str = "-"
    query: str = ""
    status: int = 499  # until an answer is sent: the client went away (the handler was cancelled)
    duration: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_first_byte: float | None = None
    credentials: str = "-"
    error_kind: str | None = None
    client_gone: bool = False  # the client closed its connection before the whole answer was sent

    def logged_path(self, with_query_values: bool) -> str:
        if not self.query:
            return self.path
        if with_query_values:
            return f"{self.path}?{self.query}"
        keys = (pair.partition("=")[0] for pair in self.query.split("&"))
        return f"{self.path}?" + "&".join(f"{key}=…" for key in keys)


def log_access(exchange: Exchange, *, with_query_values: bool) -> None:
    first_byte = exchange.upstream_first_byte
    fields = {
        "route": exchange.route,
        "method": exchange.method,
        "path": exchange.logged_path(with_query_values),
        "status": exchange.status,
        "duration_ms": round(exchange.duration * 1000, 2),
        "bytes_in": exchange.bytes_in,
        "bytes_out": exchange.bytes_out,
        "upstream_ttfb_ms": round(first_byte * 1000, 2) if first_byte is not None else None,
        "credentials": exchange.credentials,
    }
    if exchange.error_kind:
        fields["error"] = exchange.error_kind
    access_log.info(
        "%s %s %s %s %.1fms in=%d out=%d ttfb=%s creds=%s%s",
        fields["route"], fields["method"], fields["path"], fields["status"], fields["duration_ms"],
        fields["bytes_in"], fields["bytes_out"],
        f"{fields['upstream_ttfb_ms']}ms" if first_byte is not None else "-",
        fields["credentials"], f" error={exchange.error_kind}" if exchange.error_kind else "",
        extra={"access": fields},
    )  # fmt: skip


class JsonFormatter(logging.Formatter):
    """One JSON object a line; access lines carry their fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if access is not None:
            entry.update(access)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class BatchedStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines to stderr, written in batches: one system call per batch instead of one per line.

    Under load the access log alone would otherwise cost a write per request.
    ``flush_soon`` runs on the event loop and empties the buffer within
    ``FLUSH_INTERVAL``; a full buffer and the end of the process flush too.
    """

    def __init__(self) -> None:
        raw = io.FileIO(os.dup(sys.stderr.fileno()), "w")
        super().__init__(io.TextIOWrapper(io.BufferedWriter(raw, 1 << 16), encoding="utf-8", errors="backslashreplace"))
        atexit.register(self.flush_now)

    def flush(self) -> None:
        """Called by ``emit`` after every line: deliberately nothing (see ``flush_now``)."""

    def flush_now(self) -> None:
        with contextlib.suppress(ValueError, OSError):  # closed at interpreter exit
            self.acquire()
            try:
                self.stream.flush()
            finally:
                self.release()


FLUSH_INTERVAL = 0.2


async def flush_periodically() -> None:
    """Empty batched log buffers every ``FLUSH_INTERVAL`` while the server runs."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, BatchedStderrHandler)]
    try:
        while handlers:
            await asyncio.sleep(FLUSH_INTERVAL)
            for handler in handlers:
                handler.flush_now()
    finally:
        for handler in handlers:
            handler.flush_now()


def setup_logging(level: str, log_format: str = "text", *, batched: bool = False) -> None:
    """Log to stderr at ``level`` in ``log_format``; ``batched`` for the long-running server."""
    handler = BatchedStderrHandler() if batched else logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # aiohttp's own access and server logs would duplicate ours (and print full URLs).
    logging.getLogger("aiohttp").setLevel(max(logging.WARNING, root.level))
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
