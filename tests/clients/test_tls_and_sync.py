"""Clients against a union that serves TLS, and the synchronous convenience."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from clients.client import TERMS_VERSION
from clients.sync import lookup_report
from server.common.dev_ca import create_dev_pki, union_server_tls
from server.union.sms import read_one_time_code
from tests.clients.test_cli import cli
from tests.conftest import ZHANG, UnionFactory


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_tls_union_with_the_cli_and_the_sync_client(make_union: UnionFactory, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    await asyncio.to_thread(create_dev_pki, pki)
    union = await make_union(tls=union_server_tls(pki))
    outbox = union.config.sms_sink_path

    # The synchronous convenience runs its own event loop: give it a thread, so this loop keeps serving.
    report = await asyncio.to_thread(
        lookup_report,
        union.address,
        ZHANG.name,
        ZHANG.resident_id_number,
        ZHANG.mobile_number,
        lambda masked: read_one_time_code(outbox, ZHANG.mobile_number) or "",
        root_certificates=(pki / "ca.crt").read_bytes(),
        consent_terms_version=TERMS_VERSION,
    )
    assert report.total_card_count == 5

    session = tmp_path / "session.json"
    verify = [
        "verify",
        "--name",
        ZHANG.name,
        "--id",
        ZHANG.resident_id_number,
        "--mobile",
        ZHANG.mobile_number,
        "--sms-outbox",
        str(outbox),
        "--target",
        union.address,
    ]
    code, _, err = await cli(*verify, "--ca", str(pki / "ca.crt"), env_session=session)
    assert code == 0, err
    code, out, err = await cli(
        "reports", "--target", union.address, "--ca", str(pki / "ca.crt"), "--json", env_session=session
    )
    assert code == 0, err
    assert [r["name"] for r in json.loads(out)["reports"]] == [report.name]

    # Plaintext against a TLS server: one clear line and the "unavailable" exit code.
    code, _, err = await cli("reports", "--target", union.address, env_session=session)
    assert code == 7
    assert err.splitlines() == [
        f"error: cannot reach the union at {union.address}: the connection was closed at once"
        " (does the union want --tls and --ca?) (UNAVAILABLE)"
    ]

    # TLS with the system's roots, which did not sign the development CA: the handshake is named.
    code, _, err = await cli("reports", "--target", union.address, "--tls", env_session=session)
    assert code == 7
    assert err.splitlines() == [
        f"error: cannot reach the union at {union.address}: the TLS handshake failed (check --tls and --ca)"
        " (UNAVAILABLE)"
    ]
