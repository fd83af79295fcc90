"""`make demo` / `make serve`: the union and all 16 banks as real processes on loopback.

Demo: start the banks (one process, 16 servers on 16 ports) and the union (its
own process), wait until every health check says SERVING, verify a seeded demo
person (the one-time code is read from the development SMS outbox), run one
lookup with live per-bank progress, print the masked report, and shut both
processes down with SIGTERM (graceful drain) — no stray processes.

Serve: the same servers, kept running until Ctrl-C, for grpcurl and the CLI. A server that
dies is reported at once (with the end of its log) and the others are stopped: the command
exits non-zero rather than leaving half a stack running.

One data directory serves one of these at a time: a demo would start from a fresh union and
so delete a running stack's admin token, keys and lookups, so while `make serve` runs, `make
demo` (and `make reset`) on its data directory refuse. Reset (`--reset`) deletes the data
directory's demo state: the banks' stores (cards closed or frozen by card actions are
seeded afresh), injected faults, the union's data, logs and the development PKI.

Secure (`--secure`): a development PKI is created under `<data-dir>/pki` and the
union talks to the banks over mutual TLS (each bank's certificate names its
bank code); the union's own port stays plaintext on loopback for the client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.live import Live

from clients.cli import progress_table, report_table
from clients.client import TERMS_VERSION, CardLookupClient, CardLookupError
from server.common.dev_ca import create_dev_pki, union_client_tls
from server.common.dir_lock import DirectoryServing, nobody_serving_from
from server.common.grpc_runtime import ClientTls
from server.common.shapes import bank_tls_name
from server.population.catalogue import BANKS
from server.population.generator import DEMO_PEOPLE
from server.union.sms import read_one_time_code

console = Console()
T = TypeVar("T")


class DemoFailed(Exception):
    """Something the person running the demo should read (one line, no traceback)."""


UNION_PORT = 50051
BANK_BASE_PORT = 50061
METRICS_PORT = 9464  # the union's /metrics under make serve (Prometheus exporters' customary range)
WEB_PORT = 8080  # the person's web page and the Connect API under make serve (docs/web-and-connect.md)
BANK_METRICS_PORT = 9465  # the bank process's (ops/prometheus/prometheus.yml scrapes both)
# The configuration files the servers start from; the flags below add what changes per run (ports
# that were free, the data directory, TLS, the demo's re-query cooldown).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
UNION_CONFIG = CONFIG_DIR / "union.example.toml"
BANK_CONFIG = CONFIG_DIR / "bank.example.toml"
LOCK_FILE = ".in-use"  # in the data directory: who uses it now (a demo, make serve)
LOG_LINES_SHOWN = 5  # of a server that died


@contextlib.contextmanager
def data_dir_in_use(data_dir: Path, user: str) -> Iterator[None]:
    """Hold `data_dir` for this process (an advisory lock the kernel lets go when it ends, however).

    Raises DemoFailed naming the holder when another demo, serve or reset has it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / LOCK_FILE).open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise DemoFailed(
                f"{data_dir} is in use by {holder}; stop it first (Ctrl-C), or give this one a data "
                "directory of its own with --data-dir"
            ) from None
        handle.truncate(0)
        handle.write(f"{user} (pid {os.getpid()})\n")
        handle.flush()
        yield


@contextlib.contextmanager
def _no_union_serving(union_dir: Path) -> Iterator[None]:
    try:
        with nobody_serving_from(union_dir):
            yield
    except DirectoryServing as error:
        raise DemoFailed(str(error)) from None


class Stack:
    """The server processes `processes()` started, by name."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def dead(self) -> list[str]:
        """What happened to each server that is no longer running, with the end of its log."""
        return [
            self._obituary(name, process)
            for name, process in self.running.items()
            if process.poll() is not None
        ]

    def _obituary(self, name: str, process: subprocess.Popen[bytes]) -> str:
        code = process.returncode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        log_path = self.logs / f"{name}.log"
        try:
            tail = log_path.read_text(errors="replace").splitlines()[-LOG_LINES_SHOWN:]
        except OSError:
            tail = []
        shown = "".join(f"\n    {line[:300]}" for line in tail)
        return (
            f"{name} {how}; the end of {log_path}:{shown}" if tail else f"{name} {how} ({log_path} is empty)"
        )

    async def watch(self, interval: float = 0.2) -> NoReturn:
        """Raise DemoFailed as soon as a server is no longer running."""
        while True:
            if dead := self.dead():
                raise DemoFailed("\n".join(dead))
            await asyncio.sleep(interval)


async def while_all_run(stack: Stack, work: Coroutine[Any, Any, T]) -> T:
    """`work`, given up with DemoFailed the moment one of the servers dies."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(stack.watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        watcher.result()  # raises DemoFailed
        raise AssertionError("unreachable: the watcher only ends by raising")
    finally:
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


def serve_until_stopped(stack: Stack) -> int:
    """Wait for Ctrl-C or SIGTERM (0), or for a server to die (1: reported at once)."""
    stop = {signal.SIGINT, signal.SIGTERM}
    # Blocked, these arrive through sigtimedwait instead of killing this process before it could stop
    # its children; SIGCHLD wakes it the moment a child ends (the timeout is a fallback).
    signal.pthread_sigmask(signal.SIG_BLOCK, stop | {signal.SIGCHLD})
    while True:
        received = signal.sigtimedwait(stop | {signal.SIGCHLD}, 1.0)
        if received is not None and received.si_signo in stop:
            return 0
        if dead := stack.dead():
            if signal.sigpending() & stop:
                return 0  # Ctrl-C reached the servers first (they are in the same process group)
            console.print("[red]a server stopped unexpectedly; stopping the others:[/]")
            for obituary in dead:
                console.print(obituary, markup=False, highlight=False)
            return 1


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
    bank_metrics_port: int | None = None,
    population: int | None = None,
    web_port: int | None = None,
) -> Iterator[Stack]:
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    commands = {
        "banks": [
            sys.executable,
            "-m",
            "server.bank",
            "serve",
            "--all",
            "--config",
            str(BANK_CONFIG),
            "--base-port",
            str(bank_base),
            "--data-dir",
            str(data_dir / "banks"),
        ],
        "union": [
            sys.executable,
            "-m",
            "server.union",
            "serve",
            "--config",
            str(UNION_CONFIG),
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
    # An endpoint whose port is taken (or a demo's) is off: "" overrides the file's address.
    commands["union"] += ["--metrics-listen", f"127.0.0.1:{metrics_port}" if metrics_port is not None else ""]
    commands["banks"] += [
        "--metrics-listen",
        f"127.0.0.1:{bank_metrics_port}" if bank_metrics_port is not None else "",
    ]
    if population is not None:
        commands["banks"] += ["--population", str(population)]
        commands["union"] += ["--population-size", str(population)]
    stack = Stack(logs)
    running = stack.running
    commands["union"] += ["--http-listen", f"127.0.0.1:{web_port}" if web_port is not None else ""]
    try:
        for name, command in commands.items():
            with (logs / f"{name}.log").open("ab") as log_file:
                running[name] = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
                    command, stdout=log_file, stderr=subprocess.STDOUT, env=env
                )
        yield stack
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
        # The demo person agrees to the terms; a real application shows them first (the CLI does).
        lookup = await client.create_lookup(request_id=uuid.uuid4().hex, consent_terms_version=TERMS_VERSION)
        console.print(f"3. terms {TERMS_VERSION} accepted; {lookup.name} created; following its progress:")
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


def reset(data_dir: Path) -> int:
    """Delete the demo state under `data_dir` (never anything outside it, such as .venv)."""
    with data_dir_in_use(data_dir, "make reset"), _no_union_serving(data_dir / "union"):
        removed = [path.name for path in sorted(data_dir.iterdir()) if path.name != LOCK_FILE]
        for path in data_dir.iterdir():
            if path.name == LOCK_FILE:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    (data_dir / LOCK_FILE).unlink(missing_ok=True)
    what = ", ".join(removed) if removed else "nothing"
    console.print(
        f"demo state in {data_dir} reset (removed: {what}); the banks are seeded afresh at the next start"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--serve", action="store_true", help="keep the servers running until Ctrl-C")
    parser.add_argument(
        "--reset",
        action="store_true",
        help="delete the demo state in the data directory (banks' card changes, faults, the union's data)",
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data/demo"))
    parser.add_argument("--person", type=int, default=0, help="index of the demo person (see README)")
    parser.add_argument(
        "--secure",
        action="store_true",
        help="mutual TLS between the union and the banks (development PKI in <data-dir>/pki)",
    )
    parser.add_argument(
        "--population",
        type=int,
        default=None,
        help="size of the synthetic population (default: the servers' own, 20000)",
    )
    args = parser.parse_args(argv)
    # SIGTERM to the demo runs the same clean-up as Ctrl-C: the servers are stopped, never orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.reset:
            return reset(args.data_dir)
        with data_dir_in_use(args.data_dir, "make serve" if args.serve else "make demo"):
            return run(args)
    except DemoFailed as error:
        console.print(f"[red]{'reset' if args.reset else 'demo'} failed:[/] {error}", highlight=False)
        return 1


def run(args: argparse.Namespace) -> int:
    if not args.serve:
        # Each demo starts with a fresh union (the banks' seeded stores are kept: they never change),
        # unless a union started by hand serves from that directory (config/union.example.toml
        # points there too).
        with _no_union_serving(args.data_dir / "union"):
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
    # make serve also serves Prometheus metrics, on the documented ports if they are free.
    metrics_port = METRICS_PORT if args.serve and _port_free(METRICS_PORT) else None
    bank_metrics_port = BANK_METRICS_PORT if args.serve and _port_free(BANK_METRICS_PORT) else None
    web_port = WEB_PORT if args.serve and _port_free(WEB_PORT) else None
    with processes(
        args.data_dir,
        union_port,
        bank_base,
        cooldown_hours=cooldown,
        pki_dir=pki_dir,
        metrics_port=metrics_port,
        bank_metrics_port=bank_metrics_port,
        population=args.population,
        web_port=web_port,
    ) as stack:
        asyncio.run(while_all_run(stack, wait_all(union_port, bank_base, bank_tls)))
        if args.serve:
            token = (args.data_dir / "union" / "admin.token").read_text().strip()
            console.print(f"[green]serving[/]: union {target}, banks {bank_base}-{bank_base + 15}")
            console.print(
                f"admin token: {token}   SMS outbox: {args.data_dir / 'union' / 'sms-outbox.jsonl'}"
            )
            # A documented port that was taken is said, not silently dropped.
            taken = "[yellow]off[/]: 127.0.0.1:{} is in use by another program"
            if metrics_port is not None:
                console.print(f"metrics: curl -s 127.0.0.1:{metrics_port}/metrics | grep cardlookup_")
            else:
                console.print("metrics: " + taken.format(METRICS_PORT))
            if bank_metrics_port is not None:
                console.print(f"bank metrics: curl -s 127.0.0.1:{bank_metrics_port}/metrics")
            else:
                console.print("bank metrics: " + taken.format(BANK_METRICS_PORT))
            if web_port is not None:
                console.print(f"web page: http://127.0.0.1:{web_port}/   (and the Connect API, for curl)")
            else:
                console.print("web page and Connect API: " + taken.format(WEB_PORT))
            console.print(f"try: {_grpcurl()} -plaintext {target} list    (Ctrl-C stops everything)")
            exit_code = serve_until_stopped(stack)
        else:
            try:
                asyncio.run(
                    while_all_run(
                        stack, run_lookup(target, args.data_dir / "union" / "sms-outbox.jsonl", args.person)
                    )
                )
            except CardLookupError as error:
                console.print(f"[red]demo failed:[/] {error}")
                exit_code = 1
            else:
                exit_code = 0
    console.print("servers stopped.")
    return exit_code


def _grpcurl() -> str:
    """How to call grpcurl from here: on the PATH, or the one `make serve` installs into .venv/bin."""
    if shutil.which("grpcurl"):
        return "grpcurl"
    installed = Path(sys.executable).parent / "grpcurl"
    with contextlib.suppress(ValueError):
        return str(installed.relative_to(Path.cwd()))
    return str(installed)


if __name__ == "__main__":
    raise SystemExit(main())
