"""The HTTP front: how client requests are parsed, and how broken ones are refused.

aiohttp serves the clients; three of its defaults do not suit a signing proxy,
and it has no option for them, so ``install()`` swaps in two subclasses:

* its C parser (llhttp) refuses raw UTF-8 in a request line, which curl sends
  for ``?q=café``: the Python parser keeps the bytes, and ``forwarding``
  percent-encodes them (or answers 400 when they are not UTF-8);
* a request head that is too large is answered 400; RFC 9110 has 414 for a
  request line and 431 for header fields, which tell the client what to fix;
* every malformed request was logged at ERROR with a traceback (any client
  could fill the log), and an error message carrying non-UTF-8 bytes could
  not even be sent, turning a 400 into a 500.

Refusals here are JSON like every other answer of the proxy's own.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web, web_protocol, web_server
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParserPy

from .forwarding import error_response

log = logging.getLogger("signing_proxy.front")

# Statuses for a request head that is too large, by where the limit was hit.
URI_TOO_LONG = 414
HEADERS_TOO_LARGE = 431


class _RequestParser(HttpRequestParserPy):
    """aiohttp's Python request parser, telling a too-long request line from too-large headers."""

    def feed_data(self, data: bytes, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().feed_data(data, *args, **kwargs)
        except LineTooLong as error:
            if self._payload_parser is None:  # still in the head, not a chunk-size line of a body
                error.code = HEADERS_TOO_LARGE if self._lines else URI_TOO_LONG
            raise
        except BadHttpMessage as error:
            if str(error.message).startswith("Too many headers"):
                error.code = HEADERS_TOO_LARGE
            raise


class _RequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, answering malformed requests in JSON and logging them at debug."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        log.debug("refused a malformed request from %s: %s", request.remote, exc)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already under way when the request turned out malformed")
        code = exc.code if exc.code in (URI_TOO_LONG, HEADERS_TOO_LARGE) else 400
        text = str(exc.message).encode("utf-8", "backslashreplace").decode("utf-8")
        advice = {
            URI_TOO_LONG: "the request line is too long (limit 8190 bytes)",
            HEADERS_TOO_LARGE: "the request headers are too large (8190 bytes a line, 128 fields)",
        }.get(code, "malformed HTTP request")
        response = error_response(code, f"{advice}: {text[:300]}", "bad_request")
        response.force_close()
        return response


def install() -> None:
    """Use the parser and connection handler above for every aiohttp server in this process."""
    web_protocol.HttpRequestParser = _RequestParser  # type: ignore[misc]
    web_server.RequestHandler = _RequestHandler  # type: ignore[misc]
