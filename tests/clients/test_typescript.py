"""The TypeScript client (clients/typescript): its generated stubs match protos/, and it runs a real lookup.

Needs clients/typescript/node_modules (`make test` installs it with `npm ci`); skipped without it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from server.union.union_server import UnionServer
from tests.conftest import ZHANG

ROOT = Path(__file__).resolve().parents[2]
TS_DIR = ROOT / "clients" / "typescript"
NODE_MODULES = TS_DIR / "node_modules"
TSX = NODE_MODULES / ".bin" / "tsx"
RUN_TIMEOUT = 60.0  # seconds; a normal run takes about 2

pytestmark = [
    pytest.mark.skipif(
        not NODE_MODULES.is_dir(),
        reason="clients/typescript/node_modules is missing (`make test` runs npm ci there)",
    ),
    pytest.mark.skipif(shutil.which("node") is None, reason="node is not on PATH"),
]


async def run(*args: str) -> tuple[int, str, str]:
    """Run a command in clients/typescript without blocking the event loop the union serves on."""
    process = await asyncio.create_subprocess_exec(
        *args,
        cwd=TS_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")},
    )
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0, stdout.decode(), stderr.decode()


async def test_generated_code_matches_protos() -> None:
    code, out, err = await run("sh", "scripts/check-generated.sh")
    assert code == 0, f"TypeScript stubs are stale (npm run generate in clients/typescript):\n{out}\n{err}"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_typescript_lookup_report(union: UnionServer) -> None:
    code, out, err = await run(
        str(TSX),
        "src/lookup.ts",
        "--target",
        union.address,
        "--name",
        ZHANG.name,
        "--id",
        ZHANG.resident_id_number,
        "--mobile",
        ZHANG.mobile_number,
        "--sms-outbox",
        str(union.config.sms_sink_path),
        "--agree-terms",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)  # proto3 JSON from protobuf-es toJson: lowerCamelCase field names
    assert report["name"].startswith("reports/")
    assert report["totalCardCount"] == 5
    assert len(report["cards"]) == 5
    for card in report["cards"]:
        assert "****" in card["maskedNumber"]
    assert {card["cardType"] for card in report["cards"]} == {"CARD_TYPE_DEBIT", "CARD_TYPE_CREDIT"}
    assert "report ready" in err  # progress went to stderr, one line per event
    assert "ICBC" in err


async def test_typescript_error_is_one_line(tmp_path: Path) -> None:
    """Nothing listening: a one-line UNAVAILABLE error and a non-zero exit code."""
    code, out, err = await run(
        str(TSX),
        "src/lookup.ts",
        "--target",
        "127.0.0.1:1",
        "--name",
        ZHANG.name,
        "--id",
        ZHANG.resident_id_number,
        "--mobile",
        ZHANG.mobile_number,
        "--sms-outbox",
        str(tmp_path / "outbox.jsonl"),
    )
    assert code == 7, err
    assert out == ""
    assert err.startswith("error: UNAVAILABLE")
    assert len(err.strip().splitlines()) == 1
