"""The HTTP layer under the app: uvicorn, with three changes that clients and service managers rely on.

- Malformed HTTP (a bad Content-Length, broken headers) is answered with an OpenAI error body
  (JSON, status 400) instead of uvicorn's plain-text one.
- A connection that has not finished sending its request headers within `header_timeout`
  seconds gets a 408 and is closed, so clients holding partial headers cannot pile up connections.
- SIGTERM drains the open requests (uvicorn's graceful shutdown) and then `serve` returns
  normally, so the process exits 0 rather than re-raising the signal (status 143).
"""
from __future__ import annotations

import contextlib
import json
import signal

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


def error_bytes(status: int, reason: str, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 response carrying an OpenAI error body; the connection closes after it."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    return head + body


class Protocol(H11Protocol):
    header_timeout = 10.0               # seconds for a new connection's first request headers

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self._header_timer is not None:   # a request's headers are in
            self._header_timer.cancel()
            self._header_timer = None

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is None and not self.transport.is_closing():
            self.transport.write(error_bytes(408, "Request Timeout", "the request headers did not arrive in "
                                             f"{self.header_timeout:g} s", "request_timeout"))
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self.transport.write(error_bytes(400, "Bad Request", f"malformed HTTP request: {msg}", "invalid_http"))
        self.transport.close()


class Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            try:
                yield
            finally:        # a drained SIGTERM is a clean stop, not a death by signal
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def serve(app, host: str, port: int, shutdown_timeout: float, header_timeout: float = 10.0) -> None:
    protocol = type("Protocol", (Protocol,), {"header_timeout": header_timeout})
    config = uvicorn.Config(app, host=host, port=port, http=protocol, timeout_graceful_shutdown=shutdown_timeout,
                            log_level="info")
    Server(config).run()
