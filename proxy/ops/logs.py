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
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring as json_string  # what json.dumps(ensure_ascii=False) uses

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
        # a list, not a generator: join is faster with one, and this runs for every access line
        return f"{self.path}?" + "&".join([f"{pair.partition('=')[0]}=…" for pair in self.query.split("&")])


def log_access(exchange: Exchange, *, with_query_values: bool) -> None:
    """Write the access line of ``exchange``; the caller has checked ``access_log`` is on at INFO.

    ``setup_logging`` picks how: straight into the batched stderr buffer when that is
    where the line would end up anyway, through ``logging`` otherwise.
    """
    _write_access(exchange, with_query_values)


def _log_record(exchange: Exchange, with_query_values: bool) -> None:
    """The access line as a log record, for any logging set-up (pytest's caplog, other handlers).

    Also the reference the direct lines must match byte for byte (tests/test_access_log.py).
    """
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


AccessWriter = Callable[[Exchange, bool], None]
_write_access: AccessWriter = _log_record  # chosen by setup_logging


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


def _per_second(pattern: str, convert: Callable[[float], time.struct_time]) -> Callable[[float], str]:
    """``strftime`` of the current second, redone only when the second changes.

    Formatting the date for every record is a large part of what logging costs an
    access line; once a second it is nothing. The cache is one tuple, so a reader
    never pairs one second with another second's text.
    """
    latest = (-1, "")

    def text(now: float) -> str:
        nonlocal latest
        second = int(now)
        if latest[0] != second:
            latest = (second, time.strftime(pattern, convert(second)))
        return latest[1]

    return text


_local_second = _per_second("%Y-%m-%d %H:%M:%S", time.localtime)  # logging.Formatter's asctime
_utc_second = _per_second("%Y-%m-%dT%H:%M:%S", time.gmtime)  # JsonFormatter's time
_TEXT_TAG = f" INFO {access_log.name}: "
_JSON_TAG = f'"level": "info", "logger": {json_string(access_log.name)}'


def _millis(now: float) -> int:
    """Milliseconds past the second, computed as ``LogRecord.msecs`` is (from ``time.time()``)."""
    return int((now - int(now)) * 1000)


def _text_line(exchange: Exchange, with_query_values: bool, now: float) -> str:
    """What ``logging.Formatter`` makes of ``_log_record``'s record (the format of ``setup_logging``)."""
    first_byte = exchange.upstream_first_byte
    ttfb = f"{round(first_byte * 1000, 2)}ms" if first_byte is not None else "-"
    error = f" error={exchange.error_kind}" if exchange.error_kind else ""
    return (
        f"{_local_second(now)},{_millis(now):03d}{_TEXT_TAG}{exchange.route} {exchange.method} "
        f"{exchange.logged_path(with_query_values)} {exchange.status} {round(exchange.duration * 1000, 2):.1f}ms "
        f"in={exchange.bytes_in} out={exchange.bytes_out} ttfb={ttfb} creds={exchange.credentials}{error}\n"
    )


def _json_line(exchange: Exchange, with_query_values: bool, now: float) -> str:
    """What ``JsonFormatter`` makes of ``_log_record``'s record, without building a dict for ``json.dumps``.

    Numbers are written as ``json.dumps`` writes them (``repr``); durations are always finite.
    """
    first_byte = exchange.upstream_first_byte
    ttfb = repr(round(first_byte * 1000, 2)) if first_byte is not None else "null"
    error = f', "error": {json_string(exchange.error_kind)}' if exchange.error_kind else ""
    return (
        f'{{"time": "{_utc_second(now)}.{_millis(now):03d}Z", {_JSON_TAG}, "route": {json_string(exchange.route)}, '
        f'"method": {json_string(exchange.method)}, "path": {json_string(exchange.logged_path(with_query_values))}, '
        f'"status": {exchange.status}, "duration_ms": {round(exchange.duration * 1000, 2)!r}, '
        f'"bytes_in": {exchange.bytes_in}, "bytes_out": {exchange.bytes_out}, "upstream_ttfb_ms": {ttfb}, '
        f'"credentials": {json_string(exchange.credentials)}{error}}}\n'
    )


def _direct_writer(handler: BatchedStderrHandler, line: Callable[[Exchange, bool, float], str]) -> AccessWriter:
    """Append access lines to ``handler``'s buffer under its lock, as its ``emit`` would, minus the log record.

    Checks on every line, cheaply, that ``handler`` is still the root's only handler:
    anything added since ``setup_logging`` (pytest's caplog) gets its records again.
    """
    root = logging.getLogger()

    def write(exchange: Exchange, with_query_values: bool) -> None:
        handlers = root.handlers
        if len(handlers) != 1 or handlers[0] is not handler:
            _log_record(exchange, with_query_values)
            return
        text = line(exchange, with_query_values, time.time())
        with handler.lock:  # type: ignore[union-attr]  # always set by Handler.__init__
            try:  # noqa: SIM105  # contextlib.suppress would double the cost of this block
                handler.stream.write(text)
            except (OSError, ValueError):  # stderr gone or closed: lose the line, not the request
                pass

    return write


def _sole_handler(logger: logging.Logger) -> logging.Handler | None:
    """The handler, if just one, that a record of ``logger`` reaches (``Logger.callHandlers``' walk)."""
    handlers: list[logging.Handler] = []
    node: logging.Logger | None = logger
    while node is not None:
        handlers += node.handlers
        node = node.parent if node.propagate else None
    return handlers[0] if len(handlers) == 1 else None


def _choose_access_writer(handler: logging.Handler, log_format: str) -> AccessWriter:
    """Direct lines when ``handler`` is batched and the only place access records go, unfiltered."""
    if (
        not isinstance(handler, BatchedStderrHandler)
        or _sole_handler(access_log) is not handler
        or access_log.filters
        or access_log.disabled
    ):
        return _log_record
    return _direct_writer(handler, _json_line if log_format == "json" else _text_line)


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
    global _write_access
    _write_access = _choose_access_writer(handler, log_format)
