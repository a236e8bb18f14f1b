"""The HTTP edge: the API key, request-body limits and read timeouts, metrics per request, and the uvicorn
settings that close connections too slow to send their headers.

- The key (when one is set) guards every route but /health: the API, /metrics, /docs and /openapi.json. It is
  compared in constant time.
- A body is refused from its Content-Length before a byte of it is read (413), and read with a size cap and a
  deadline (`body_timeout`, then 408) before FastAPI parses it, so a client cannot make the server buffer or
  parse more than `max_body_bytes`, nor hold a request open by sending its body slowly.
- Headers: uvicorn has no header timeout (its keep-alive timeout only starts after a response), so a socket
  that opens and sends nothing, or drips its headers a byte at a time, would stay open for ever. The protocol
  below arms a timer when a connection opens or a new request's first byte arrives, and closes the
  connection when its headers are not in within `header_timeout`.
"""

import asyncio
import secrets
import time

from budgetthink.serve.api import APIError

OPEN_PATHS = {"/health"}  # what a client may reach without the key (load balancers' probes)


class Gate:
    """ASGI middleware: the API key, the body limits, and request counts and latency for /metrics."""

    def __init__(self, app, api_key: str | None, metrics, max_body_bytes: int, body_timeout: float):
        self.app, self.api_key, self.metrics = app, api_key, metrics
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout

    def authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        got = headers.get(b"authorization", b"").decode("latin-1")
        return got.startswith("Bearer ") and secrets.compare_digest(got[7:].strip().encode(), self.api_key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key and scope["path"] not in OPEN_PATHS and not self.authorized(scope):
                raise APIError(401, "missing or wrong API key; send it as 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
            if scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self.read_body(scope, receive)
            await self.app(scope, receive, send_status)
        except APIError as e:
            if e.status in (408, 413):  # the rest of the body is never read: the connection cannot be reused
                e.headers = {**(e.headers or {}), "Connection": "close"}
            await e.response()(scope, receive, send_status)
        finally:
            self.metrics.observe(scope["path"], status[0], time.perf_counter() - t0)

    async def read_body(self, scope, receive):
        """The whole body, within the size cap and the deadline; a `receive` that replays it, then goes on to
        the client's (so a disconnect is still seen)."""
        limit = self.max_body_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise self.too_large(int(length))
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(left, 0.001))
            except TimeoutError:
                raise APIError(408, f"the request body took over {self.body_timeout:g} s to arrive; send it at once",
                               code="request_timeout") from None
            if message["type"] == "http.disconnect":
                replay = [message]
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                raise self.too_large(size, at_least=True)
            if not message.get("more_body", False):
                replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replayed():
            return replay.pop() if replay else await receive()

        return replayed

    def too_large(self, size: int, at_least: bool = False) -> APIError:
        return APIError(413, f"the request body is {'over ' if at_least else ''}{size} bytes, above the server's limit "
                             f"of {self.max_body_bytes}; send less text (or raise --max-body-bytes)",
                        code="body_too_large")


def deadline_protocol(header_timeout: float):
    """uvicorn's HTTP protocol (httptools, else h11), closing connections whose headers are late."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools is optional in uvicorn
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class HeaderDeadline(Base):
        timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self.arm()

        def data_received(self, data):
            if self.timer is None and (self.cycle is None or self.cycle.response_complete):
                self.arm()  # the first byte of a new request on a kept-alive connection
            before = self.cycle
            super().data_received(data)
            if self.cycle is not before:  # the headers are in: the request's cycle has begun
                self.disarm()

        def connection_lost(self, exc):
            self.disarm()
            super().connection_lost(exc)

        def arm(self):
            self.disarm()
            self.timer = self.loop.call_later(header_timeout, self.late)

        def disarm(self):
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

        def late(self):
            self.timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, **kwargs):
    """uvicorn's settings for `app` (a create_app app): the header deadline, and graceful shutdown."""
    import uvicorn

    config = app.state.config
    return uvicorn.Config(app, host=host, port=port, http=deadline_protocol(config.header_timeout),
                          timeout_keep_alive=5, **kwargs)


def resolve_api_key(api_key: str | None = None, api_key_file: str | None = None, env: dict | None = None) -> str | None:
    """The key to require: `--api-key-file` (its first line), else `BUDGETTHINK_API_KEY`, else `--api-key` (which
    other users of the machine can read in `ps`); None serves without a key."""
    import os
    from pathlib import Path

    from budgetthink.errors import UserError

    env = os.environ if env is None else env
    if api_key is not None and api_key_file is not None:
        raise UserError("give the API key once: --api-key-file or --api-key, not both")
    if api_key_file is not None:
        path = Path(api_key_file)
        if not path.is_file():
            raise UserError(f"--api-key-file {path}: no such file; write the key into it (one line)")
        lines = path.read_text().splitlines()
        api_key = lines[0].strip() if lines else ""
        if not api_key:
            raise UserError(f"--api-key-file {path}: the file is empty; write the key on its first line")
        return api_key
    if api_key is None and env.get("BUDGETTHINK_API_KEY"):
        return env["BUDGETTHINK_API_KEY"].strip()
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty; give a key, or leave the option out to serve without one")
    return api_key
