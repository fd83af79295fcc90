"""What the union and the banks share for Prometheus: a registry with the process's own metrics, and
the HTTP endpoint that serves it.

Each server process has a registry of its own (several unions in one test process do not collide),
and every such registry carries the standard process metrics (CPU, memory, open files:
`process_*`), the garbage collector's (`python_gc_*`) and the interpreter's version (`python_info`),
which is what an operator looks at first when a process misbehaves.
"""

from __future__ import annotations

import asyncio
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    start_http_server,
)


def process_registry() -> CollectorRegistry:
    """A registry of its own, with the process, garbage-collector and platform collectors in it.

    The collectors are the library's default ones (they read this process, whichever registry
    asks), so registering them again costs nothing."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, GC_COLLECTOR, PLATFORM_COLLECTOR):
        registry.register(collector)
    return registry


class MetricsEndpoint:
    """prometheus_client's HTTP server (a thread of its own) for one registry."""

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        self._host = host.strip("[]")
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(int(port), addr=self._host, registry=registry)

    @property
    def address(self) -> str:
        """host:port as bound (the port chosen when 0 was asked for)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self._server.server_port}"

    async def close(self) -> None:
        # shutdown() waits for the serving loop to notice (it polls twice a second).
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()
        await asyncio.to_thread(self._thread.join)
