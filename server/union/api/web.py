"""The union's HTTP port: cardlookup.v1 over Connect and gRPC-Web, and the person's web page.

One ASGI application on uvicorn, inside the union process next to the grpc.aio server:
requests under a service path go to that service's Connect application (api/connect.py),
`GET /` and the bundle's files come from the built page (clients/web/dist). The page's
index.html carries the policy numbers it states to the person as <meta> tags (PagePolicy), so it
says what this union is configured to do, with no inline script. Every answer
carries a strict Content-Security-Policy, and the API answers only the page's own origin
(plus those configured): a foreign page in the person's browser is refused, not served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import uvicorn

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Where `make web` puts the bundle, relative to the repository the union runs from.
DEFAULT_WEB_ROOT = Path(__file__).resolve().parents[3] / "clients" / "web" / "dist"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
    # Answers hold a person's data: no cache keeps them after the tab is closed.
    (b"cache-control", b"no-store"),
)
# What Connect and gRPC-Web clients send and must read across origins.
CORS_ALLOW_HEADERS = (
    "authorization, content-type, connect-protocol-version, connect-timeout-ms, "
    "connect-accept-encoding, connect-content-encoding, grpc-timeout, x-grpc-web, x-user-agent"
)
CORS_EXPOSE_HEADERS = "grpc-status, grpc-message, grpc-status-details-bin"
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
    ".webmanifest": "application/manifest+json",
}


class Service(Protocol):
    """An ASGI application answering the calls under one service path (api/connect.py)."""

    @property
    def path(self) -> str: ...

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...


@dataclass(frozen=True)
class PagePolicy:
    """The configured numbers the page states to the person (clients/web/src/main.ts reads them)."""

    # Natural days a report is kept after the day it was generated (RetentionPolicy.report_days).
    report_days: int
    # How long a bank that answered is not asked again for the person (LookupPolicy.requery_cooldown).
    requery_cooldown: timedelta

    def meta_tags(self) -> bytes:
        hours = self.requery_cooldown.total_seconds() / 3600
        return (
            f'<meta name="cardlookup-report-days" content="{self.report_days:d}" />\n'
            f'<meta name="cardlookup-requery-cooldown-hours" content="{hours:g}" />\n'
        ).encode()


def own_origins(address: str) -> frozenset[str]:
    """The origins the page itself has when served from `address` (host:port as bound)."""
    host, _, port = address.rpartition(":")
    origins = {f"http://{host}:{port}"}
    if host in ("127.0.0.1", "localhost", "[::1]"):
        origins |= {f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://[::1]:{port}"}
    return frozenset(origins)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class WebApp:
    """Routes one HTTP request to a Connect service or to the page, with the security headers."""

    def __init__(
        self,
        services: Iterable[Service],
        web_root: Path | None,
        allowed_origins: Iterable[str] = (),
        page_policy: PagePolicy | None = None,
    ) -> None:
        self._services = {service.path: service for service in services}
        self._web_root = web_root.resolve() if web_root is not None else None
        self.allowed_origins = frozenset(allowed_origins)
        self._page_policy = page_policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan work and no websockets: the union starts and stops its own parts
        path: str = scope["path"]
        service_path, _, _ = path.rpartition("/")
        service = self._services.get(service_path)
        if service is None:
            await self._static(scope, receive, _secured(send))
            return
        origin = _header(scope, b"origin")
        if origin is not None and origin not in self.allowed_origins:
            await _drain(receive)
            await _plain(_secured(send), 403, b"origin not allowed\n")
            return
        send = _secured(send, origin)
        if scope["method"] == "OPTIONS":
            await self._preflight(send, origin)
            return
        await service(scope, receive, send)

    async def _preflight(self, send: Send, origin: str | None) -> None:
        headers = [
            (b"access-control-allow-methods", b"POST, GET"),
            (b"access-control-allow-headers", CORS_ALLOW_HEADERS.encode()),
            (b"access-control-max-age", b"7200"),
        ]
        if origin is None:
            headers = []
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def _static(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await _drain(receive)
            await _plain(send, 405, b"method not allowed\n")
            return
        if self._web_root is None or not (self._web_root / "index.html").is_file():
            await _plain(send, 404, b"the web page is not built: run `make web`\n")
            return
        relative = scope["path"].lstrip("/") or "index.html"
        file = (self._web_root / relative).resolve()
        content_type = STATIC_TYPES.get(file.suffix)
        if content_type is None or not file.is_relative_to(self._web_root) or not file.is_file():
            await _plain(send, 404, b"not found\n")
            return
        body = await asyncio.to_thread(file.read_bytes)
        if file.name == "index.html" and self._page_policy is not None:
            # Without a policy (or a </head>) the page states no number rather than a wrong one.
            body = body.replace(b"</head>", self._page_policy.meta_tags() + b"</head>", 1)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


def _secured(send: Send, cors_origin: str | None = None) -> Send:
    """`send` with the security headers (and, for an allowed cross-origin caller, CORS) added."""

    async def secured(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", ()) if bytes(k).lower() != b"cache-control"]
            headers.extend(SECURITY_HEADERS)
            if cors_origin is not None:
                headers.extend(
                    [
                        (b"access-control-allow-origin", cors_origin.encode("latin-1")),
                        (b"access-control-expose-headers", CORS_EXPOSE_HEADERS.encode()),
                        (b"vary", b"Origin"),
                    ]
                )
            message = {**message, "headers": headers}
        await send(message)

    return secured


async def _drain(receive: Receive) -> None:
    """Read a refused request's body to its end: answering before it is read closes the connection
    under the client while it still writes, and it sees a reset instead of the answer."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _plain(send: Send, status: int, text: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": text})


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the union's event loop: the union's own signal handling stays in charge."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebEndpoint:
    """Serves a WebApp on host:port (port 0: any free port) until stopped."""

    def __init__(self, app: WebApp, listen: str) -> None:
        self._app = app
        self._listen = listen
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.address = ""

    async def start(self) -> None:
        host, _, port = self._listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(port)))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.setblocking(False)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
        self.address = f"{shown}:{bound_port}"
        # The page's own origin always, besides any the operator named.
        self._app.allowed_origins = self._app.allowed_origins | own_origins(self.address)
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            interface="asgi3",
            http="h11",
            ws="none",
            # The union's own logging: its "union started" line names this port. uvicorn says only
            # what went wrong, and keeps no access log (paths and peers are nobody's business).
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=5,
        )
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="union-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self, grace: float) -> None:
        if self._server is None or self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = max(1, int(grace))
        self._server.should_exit = True
        await asyncio.gather(self._task, return_exceptions=True)
