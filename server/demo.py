"""`make demo` / `make serve`: the union and all 16 banks as real processes on loopback.

Demo: start the banks (one process, 16 servers on 16 ports) and the union (its
own process), wait until every health check says SERVING, verify a seeded demo
person (the one-time code is read from the development SMS outbox), run one
lookup with live per-bank progress, print the masked report, and shut both
processes down with SIGTERM (graceful drain) — no stray processes.

Serve: the same servers, kept running until Ctrl-C, for grpcurl and the CLI.

Secure (`--secure`): a development PKI is created under `<data-dir>/pki` and the
union talks to the banks over mutual TLS (each bank's certificate names its
bank code); the union's own port stays plaintext on loopback for the client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.live import Live

from clients.cli import progress_table, report_table
from clients.client import CardLookupClient, CardLookupError
from server.common.dev_ca import create_dev_pki, union_client_tls
from server.population.catalogue import BANKS
from server.population.generator import DEMO_PEOPLE
from server.union.bank_gateway import ClientTls, bank_tls_name
from server.union.sms import read_one_time_code

console = Console()


class DemoFailed(Exception):
    """Something the person running the demo should read (one line, no traceback)."""


UNION_PORT = 50051
BANK_BASE_PORT = 50061
METRICS_PORT = 9464  # the union's /metrics under make serve (Prometheus exporters' customary range)
WEB_PORT = 8080  # the person's web page and the Connect API under make serve (docs/web-and-connect.md)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Like gRPC's own listener: a port in TIME_WAIT from the previous run is free to use.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def choose_ports() -> tuple[int, int]:
    """The documented ports if free (README's grpcurl examples use them), else any free block."""
    wanted = [UNION_PORT, *range(BANK_BASE_PORT, BANK_BASE_PORT + len(BANKS))]
    if all(_port_free(p) for p in wanted):
        return UNION_PORT, BANK_BASE_PORT
    for base in range(20000, 60000, 100):
        block = [base, *range(base + 10, base + 10 + len(BANKS))]
        if all(_port_free(p) for p in block):
            console.print(
                f"[yellow]ports {UNION_PORT}/{BANK_BASE_PORT}+ are busy; using {base}/{base + 10}+[/]"
            )
            return base, base + 10
    raise SystemExit("no free loopback ports")


@contextlib.contextmanager
def processes(
    data_dir: Path,
    union_port: int,
    bank_base: int,
    cooldown_hours: float,
    pki_dir: Path | None = None,
    metrics_port: int | None = None,
    web_port: int | None = None,
) -> Iterator[None]:
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    commands = {
        "banks": [
            sys.executable,
            "-m",
            "server.bank.main",
            "serve",
            "--all",
            "--base-port",
            str(bank_base),
            "--data-dir",
            str(data_dir / "banks"),
        ],
        "union": [
            sys.executable,
            "-m",
            "server.union.main",
            "serve",
            "--listen",
            f"127.0.0.1:{union_port}",
            "--data-dir",
            str(data_dir / "union"),
            "--bank-base-port",
            str(bank_base),
            "--requery-cooldown-hours",
            str(cooldown_hours),
        ],
    }
    if pki_dir is not None:
        commands["banks"] += ["--tls-dir", str(pki_dir)]
        commands["union"] += ["--bank-tls-dir", str(pki_dir)]
    if metrics_port is not None:
        commands["union"] += ["--metrics-listen", f"127.0.0.1:{metrics_port}"]
    if web_port is not None:
        commands["union"] += ["--http-listen", f"127.0.0.1:{web_port}"]
    running: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, command in commands.items():
            with (logs / f"{name}.log").open("ab") as log_file:
                running[name] = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
                    command, stdout=log_file, stderr=subprocess.STDOUT, env=env
                )
        yield
    finally:
        for process in running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in running.items():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                console.print(f"[red]{name} did not stop in time; killing it[/]")
                process.kill()
                process.wait()


def _health_channel(address: str, tls: ClientTls | None, tls_name: str) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(tls.root_ca, tls.private_key, tls.cert_chain)
    return grpc.aio.secure_channel(
        address, credentials, options=[("grpc.ssl_target_name_override", tls_name)]
    )


async def wait_serving(
    address: str, deadline: float, tls: ClientTls | None = None, tls_name: str = ""
) -> None:
    async with _health_channel(address, tls, tls_name) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise DemoFailed(f"{address} did not become healthy; see the logs in the data directory")
            await asyncio.sleep(0.2)


async def wait_all(union_port: int, bank_base: int, bank_tls: ClientTls | None = None) -> None:
    """Every server SERVING; with `bank_tls`, the banks are checked over mutual TLS as the union would."""
    deadline = time.monotonic() + 120
    await asyncio.gather(
        wait_serving(f"127.0.0.1:{union_port}", deadline),
        *(
            wait_serving(f"127.0.0.1:{bank_base + i}", deadline, bank_tls, bank_tls_name(bank.code))
            for i, bank in enumerate(BANKS)
        ),
    )


async def run_lookup(target: str, sms_outbox: Path, person_index: int) -> None:
    demo = DEMO_PEOPLE[person_index].person
    masked_id = f"{demo.resident_id_number[:4]}**********{demo.resident_id_number[-4:]}"
    console.rule(f"一键查卡 demo · {demo.name} · ID {masked_id}")
    async with CardLookupClient(target) as client:
        started = await client.start_verification(demo.name, demo.resident_id_number, demo.mobile_number)
        code = read_one_time_code(sms_outbox, demo.mobile_number)
        if code is None:
            raise DemoFailed("no one-time code arrived in the SMS outbox")
        console.print(
            f"1. verification: code sent by SMS to {started.masked_mobile_number} (read from the outbox)"
        )
        session = await client.complete_verification(started.verification_id, code)
        console.print(f"2. verified; session credential valid until {session.expire_time.ToJsonString()}")
        lookup = await client.create_lookup(request_id=uuid.uuid4().hex)
        console.print(f"3. {lookup.name} created; following its progress:")
        report_name = ""
        with Live(progress_table(lookup), console=console) as live:
            async for event in client.watch_lookup(lookup.name, stream_timeout=120):
                live.update(progress_table(event.lookup))
                if event.report_ready:
                    report_name = event.lookup.report
        report = await client.get_report(report_name)
        console.print()
        console.print("4. the masked report:")
        for table in report_table(report):
            console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--serve", action="store_true", help="keep the servers running until Ctrl-C")
    parser.add_argument("--data-dir", type=Path, default=Path("data/demo"))
    parser.add_argument("--person", type=int, default=0, help="index of the demo person (see README)")
    parser.add_argument(
        "--secure",
        action="store_true",
        help="mutual TLS between the union and the banks (development PKI in <data-dir>/pki)",
    )
    args = parser.parse_args(argv)
    # SIGTERM to the demo runs the same clean-up as Ctrl-C: the servers are stopped, never orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if not args.serve:
        # Each demo starts with a fresh union (the banks' seeded stores are kept: they never change).
        shutil.rmtree(args.data_dir / "union", ignore_errors=True)
    pki_dir: Path | None = None
    bank_tls: ClientTls | None = None
    if args.secure:
        pki_dir = args.data_dir / "pki"
        create_dev_pki(pki_dir)
        bank_tls = union_client_tls(pki_dir)
        console.print(f"union↔bank traffic uses mutual TLS (development PKI in {pki_dir})")
    union_port, bank_base = choose_ports()
    target = f"127.0.0.1:{union_port}"
    console.print(f"starting 16 banks on 127.0.0.1:{bank_base}-{bank_base + 15} and the union on {target} …")
    cooldown = 0 if not args.serve else 168
    # make serve also serves the union's Prometheus metrics, on the documented port if it is free.
    metrics_port = METRICS_PORT if args.serve and _port_free(METRICS_PORT) else None
    web_port = WEB_PORT if args.serve and _port_free(WEB_PORT) else None
    with processes(
        args.data_dir,
        union_port,
        bank_base,
        cooldown_hours=cooldown,
        pki_dir=pki_dir,
        metrics_port=metrics_port,
        web_port=web_port,
    ):
        try:
            asyncio.run(wait_all(union_port, bank_base, bank_tls))
        except DemoFailed as error:
            console.print(f"[red]demo failed:[/] {error}")
            return 1
        if args.serve:
            token = (args.data_dir / "union" / "admin.token").read_text().strip()
            console.print(f"[green]serving[/]: union {target}, banks {bank_base}-{bank_base + 15}")
            console.print(
                f"admin token: {token}   SMS outbox: {args.data_dir / 'union' / 'sms-outbox.jsonl'}"
            )
            if metrics_port is not None:
                console.print(f"metrics: curl -s 127.0.0.1:{metrics_port}/metrics | grep cardlookup_")
            if web_port is not None:
                console.print(f"web page: http://127.0.0.1:{web_port}/   (and the Connect API, for curl)")
            console.print(f"try: grpcurl -plaintext {target} list    (Ctrl-C stops everything)")
            # Block the signals first: sigwait then receives them instead of the default handlers
            # killing this process before it could stop its children.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        else:
            try:
                asyncio.run(run_lookup(target, args.data_dir / "union" / "sms-outbox.jsonl", args.person))
            except (DemoFailed, CardLookupError) as error:
                console.print(f"[red]demo failed:[/] {error}")
                return 1
    console.print("servers stopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
