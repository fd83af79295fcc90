"""What every server in this project shares: health checking, reflection, TLS, graceful shutdown.

`GrpcServer` wraps a `grpc.aio.Server` so that the union and each bank start
and stop the same way (the grpc examples' pattern): health SERVING once the
port is bound (and while the server can do its work: see `follow_serving`),
NOT_SERVING first on shutdown, then `stop(grace)` so in-flight calls drain.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.common.request_guard import RequestGuard

log = logging.getLogger(__name__)

# Requests are small; refuse anything large before it is parsed (bad input never hurts).
MAX_RECEIVE_MESSAGE_BYTES = 64 * 1024
MAX_SEND_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS server; with `client_ca` set, clients must present a certificate."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None


@dataclass(frozen=True)
class ClientTls:
    """PEM files for the union's client side of mutual TLS towards the banks."""

    root_ca: bytes
    cert_chain: bytes
    private_key: bytes
    # Bank code → the name its certificate carries, where it is not shapes.bank_tls_name(code).
    server_names: Mapping[str, str] = field(default_factory=dict)


def server_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ]


class GrpcServer:
    """One aio server with health and reflection, bound to one address."""

    def __init__(
        self,
        address: str,
        service_names: Iterable[str],
        register: Callable[[grpc.aio.Server], None],
        tls: TlsFiles | None = None,
        interceptors: Sequence[Any] = (),
        observers: Sequence[Any] = (),
    ) -> None:
        self._requested_address = address
        self._service_names = list(service_names)
        self._server = grpc.aio.server(
            options=server_options(),
            # The guard comes first so that even refused or admitted calls never see unparsed garbage;
            # only observers (metrics, access log), which never read a request, come before it.
            interceptors=[*observers, RequestGuard(), *interceptors],
        )
        register(self._server)
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )
        self._tls = tls
        self.port = 0
        self._serving: Callable[[], bool] = lambda: True
        self._stopping = False
        self._health_updates: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        host = self._requested_address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        if self._tls is None:
            self.port = self._server.add_insecure_port(self._requested_address)
        else:
            credentials = grpc.ssl_server_credentials(
                [(self._tls.private_key, self._tls.cert_chain)],
                root_certificates=self._tls.client_ca,
                require_client_auth=self._tls.client_ca is not None,
            )
            self.port = self._server.add_secure_port(self._requested_address, credentials)
        if self.port == 0:
            raise OSError(f"could not bind {self._requested_address}")
        await self._server.start()
        await self.set_serving(self._serving())
        log.info("listening", extra={"address": self.address, "services": self._service_names})

    def follow_serving(self, serving: Callable[[], bool]) -> None:
        """Whether the server can do its work (read at start and on `serving_changed`): its
        health says NOT_SERVING while this is False, not only while it shuts down."""
        self._serving = serving

    def serving_changed(self) -> None:
        """Bring health in line with `follow_serving`'s answer, now, from event-loop code that
        cannot wait (e.g. a setter). Each update reads the answer when it runs, so the last one
        leaves the latest state."""

        async def update() -> None:
            await self.set_serving(self._serving())

        task = asyncio.get_running_loop().create_task(update(), name="health-update")
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def set_serving(self, serving: bool) -> None:
        # "" is the whole server's status, which is what grpcurl and load balancers ask for.
        for name in ["", *self._service_names]:
            await self.set_status(name, serving)

    async def set_status(self, name: str, serving: bool) -> None:
        """The health status of one named part (e.g. a dependency the server reports on)."""
        if self._stopping and serving:
            return  # a late update never undoes the NOT_SERVING that shutdown announced
        await self._health.set(
            name,
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING,
        )

    async def stop(self, grace: float = 5.0) -> None:
        """Graceful shutdown: tell health checkers first, then drain in-flight calls."""
        self._stopping = True
        await self.set_serving(False)
        await self._server.stop(grace)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


# Allocations between young-generation collections (CPython's default is 700), then how many of
# those per middle-generation one, and middle per full one. See tune_garbage_collection.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_garbage_collection() -> None:
    """Call once a server has started. Its startup objects (modules, descriptors, the catalogue:
    ~108,000 in the union) are frozen out of the collector's sight, and the young generation is
    collected every 50,000 allocations instead of 700.

    Why: under load the default thresholds run the cycle collector thousands of times a minute,
    and each full collection pauses every call in flight, while almost all of a server's garbage
    is freed by reference counting; the collector only finds the few cycles (tracebacks,
    finished tasks), and finds them as well at this rhythm. docs/performance.md has the figures."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def wait_for_shutdown_signal() -> None:
    """Return when SIGINT or SIGTERM arrives (so `finally` blocks can stop servers gracefully)."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
