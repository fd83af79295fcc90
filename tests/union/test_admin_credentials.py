"""Named admin credentials with roles, audited admin changes, and AIP-134 update masks.
Issue 18, items 8d and 9."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import grpc
import pytest
from cardlookup.v1 import admin_service_pb2 as admin_pb
from cardlookup.v1 import card_action_service_pb2 as action_pb
from google.protobuf import field_mask_pb2
from sqlalchemy import text
from typer.testing import CliRunner

from clients.cli import app as cli_app
from clients.client import CardLookupClient, CardLookupError
from server.union.__main__ import app as union_app
from server.union.domain.ports import AdminRole
from server.union.union_server import UnionServer

BOOTSTRAP_TOKEN = "test-admin-token"  # tests/conftest.py's admin_token


def _mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def _refusal(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except CardLookupError as error:
        return error.code, error.reason
    return grpc.StatusCode.OK, ""


async def _audit(union: UnionServer, actor: str) -> list[action_pb.AuditEvent]:
    async with CardLookupClient(union.address, admin_token=BOOTSTRAP_TOKEN) as client:
        response = await client.admin("ListAuditEvents", admin_pb.ListAuditEventsRequest(actor=actor))
        return list(response.events)


async def test_a_viewer_reads_and_an_operator_changes(union: UnionServer) -> None:
    viewer, viewer_token = await union.admin.create_credential("vera", AdminRole.VIEWER)
    operator, operator_token = await union.admin.create_credential("otto", AdminRole.OPERATOR)
    async with CardLookupClient(union.address, admin_token=viewer_token) as client:
        assert len(await client.list_banks()) == 16
        assert len(await client.list_regions()) > 0
        await client.admin("GetServiceStats", admin_pb.GetServiceStatsRequest())
        await client.admin("ListAuditEvents", admin_pb.ListAuditEventsRequest())
        with pytest.raises(CardLookupError) as denied:
            await client.update_bank("CMB", enabled=False)
        assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert denied.value.reason == "ADMIN_ROLE_REQUIRED"
        assert await _refusal(client.update_region("440000", True)) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "ADMIN_ROLE_REQUIRED",
        )
        assert next(b for b in await client.list_banks() if b.code == "CMB").enabled
    async with CardLookupClient(union.address, admin_token=operator_token) as client:
        assert not (await client.update_bank("CMB", enabled=False)).enabled
        assert (await client.update_region("440000", True)).open

    # Each change, and each refused one, is in the audit trail under the credential's id.
    viewed = await _audit(union, f"admin:{viewer.id}")
    assert [(e.action, e.outcome, e.resource) for e in reversed(viewed)] == [
        ("admin.audit.read", "ok", ""),  # reading the trail is itself audited
        ("admin.bank.update", "refused:ADMIN_ROLE_REQUIRED", ""),
        ("admin.region.update", "refused:ADMIN_ROLE_REQUIRED", ""),
    ]
    operated = await _audit(union, f"admin:{operator.id}")
    assert [(e.action, e.outcome, e.resource) for e in reversed(operated)] == [
        ("admin.bank.update", "ok", "banks/CMB"),
        ("admin.region.update", "ok", "regions/440000"),
    ]
    created = await _audit(union, "admin:console")
    assert {(e.action, e.resource) for e in created} >= {
        ("admin.credential.create", f"adminCredentials/{viewer.id}"),
        ("admin.credential.create", f"adminCredentials/{operator.id}"),
    }


async def test_the_configured_admin_token_is_the_bootstrap_operator(union: UnionServer) -> None:
    credentials = await union.admin.list_credentials()
    assert [(c.name, c.role) for c in credentials] == [("bootstrap", AdminRole.OPERATOR)]
    bootstrap = credentials[0]
    async with CardLookupClient(union.address, admin_token=BOOTSTRAP_TOKEN) as client:
        await client.update_bank("ICBC", enabled=True)
        for wrong in ("wrong", BOOTSTRAP_TOKEN + "x", "x" * 1000, "Bearer"):
            client.admin_token = wrong
            assert await _refusal(client.list_banks()) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "ADMIN_CREDENTIAL_REQUIRED",
            )
    events = await _audit(union, f"admin:{bootstrap.id}")
    assert [(e.action, e.resource) for e in events] == [("admin.bank.update", "banks/ICBC")]


async def test_credentials_are_stored_as_keyed_hashes_only(union: UnionServer) -> None:
    _, token = await union.admin.create_credential("alice", AdminRole.OPERATOR)
    with union.store.engine.connect() as connection:
        rows = [tuple(row) for row in connection.execute(text("SELECT * FROM admin_credentials"))]
        audit = [tuple(row) for row in connection.execute(text("SELECT * FROM audit_events"))]
    assert len(rows) == 2
    for value in (str(v) for row in rows + audit for v in row):
        assert token not in value
        assert BOOTSTRAP_TOKEN not in value
        assert token[4:] not in value
    # The name is the operator's label, never an actor in the audit trail.
    assert all("alice" not in str(v) for row in audit for v in row)
    if union.store.runner.is_sqlite:
        database = Path(union.store.engine.url.database or "")
        raw = b"".join(path.read_bytes() for path in database.parent.glob(database.name + "*"))
        assert token.encode() not in raw
        assert BOOTSTRAP_TOKEN.encode() not in raw


async def test_a_revoked_credential_no_longer_works(union: UnionServer) -> None:
    _, token = await union.admin.create_credential("bob", AdminRole.VIEWER)
    async with CardLookupClient(union.address, admin_token=token) as client:
        assert len(await client.list_banks()) == 16
        revoked = await union.admin.revoke_credential("bob")
        assert await _refusal(client.list_banks()) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "ADMIN_CREDENTIAL_REQUIRED",
        )
    assert [(e.action, e.resource) for e in (await _audit(union, "admin:console"))[:1]] == [
        ("admin.credential.revoke", f"adminCredentials/{revoked.id}")
    ]


async def test_credential_names_are_checked(union: UnionServer) -> None:
    from server.common import errors

    await union.admin.create_credential("carol", AdminRole.VIEWER)
    with pytest.raises(errors.FailedPrecondition):
        await union.admin.create_credential("carol", AdminRole.OPERATOR)
    for bad in ("bootstrap", "", "Carol", "a" * 33, "110101199003077777"):
        with pytest.raises(errors.InvalidArgument) as refused:
            await union.admin.create_credential(bad, AdminRole.VIEWER)
        assert [v.field for v in refused.value.violations] == ["name"]
        assert "110101199003077777" not in refused.value.message
    with pytest.raises(errors.NotFound):
        await union.admin.revoke_credential("nobody")


async def test_the_union_cli_creates_a_credential_and_prints_its_token_once(
    union: UnionServer, database_url: str, tmp_path: Path
) -> None:
    arguments = ["--data-dir", str(tmp_path / "union"), "--database-url", database_url]
    created = await asyncio.to_thread(
        CliRunner().invoke,
        union_app,
        ["admin-credential", "create", "--name", "alice", "--role", "viewer", *arguments],
    )
    assert created.exit_code == 0, created.output
    token = created.output.strip().splitlines()[-1]
    assert token.startswith("cla_")
    async with CardLookupClient(union.address, admin_token=token) as client:
        assert len(await client.list_banks()) == 16
        assert await _refusal(client.update_bank("CMB", enabled=False)) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "ADMIN_ROLE_REQUIRED",
        )
    listed = await asyncio.to_thread(CliRunner().invoke, union_app, ["admin-credential", "list", *arguments])
    assert listed.exit_code == 0, listed.output
    assert re.search(r"c[0-9a-f]{16}\s+viewer\s+alice", listed.output)
    assert token not in listed.output
    again = await asyncio.to_thread(
        CliRunner().invoke,
        union_app,
        ["admin-credential", "create", "--name", "alice", "--role", "operator", *arguments],
    )
    assert again.exit_code == 1
    revoked = await asyncio.to_thread(
        CliRunner().invoke, union_app, ["admin-credential", "revoke", "--name", "alice", *arguments]
    )
    assert revoked.exit_code == 0, revoked.output
    async with CardLookupClient(union.address, admin_token=token) as client:
        assert await _refusal(client.list_banks()) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "ADMIN_CREDENTIAL_REQUIRED",
        )


async def test_audit_actor_filter_takes_admin_credentials(union: UnionServer) -> None:
    credential, _ = await union.admin.create_credential("dave", AdminRole.OPERATOR)
    async with CardLookupClient(union.address, admin_token=BOOTSTRAP_TOKEN) as client:
        for actor in (f"admin:{credential.id}", "admin:console", "admin", "0" * 64):
            await client.admin("ListAuditEvents", admin_pb.ListAuditEventsRequest(actor=actor))
        for bad in ("admin:", "admin:dave", "admin:c123", f"admin:{credential.id}x", "ADMIN", "root"):
            with pytest.raises(CardLookupError) as refused:
                await client.admin("ListAuditEvents", admin_pb.ListAuditEventsRequest(actor=bad))
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert [field for field, _ in refused.value.field_violations] == ["actor"]


async def test_the_cli_audit_filter_takes_an_admin_actor(union: UnionServer) -> None:
    credential, token = await union.admin.create_credential("erin", AdminRole.OPERATOR)
    async with CardLookupClient(union.address, admin_token=token) as client:
        await client.update_region("440000", True)
    actor = f"admin:{credential.id}"
    result = await asyncio.to_thread(
        CliRunner().invoke,
        cli_app,
        ["admin", "audit", "--actor", actor, "--target", union.address, "--admin-token", token, "--json"],
    )
    assert result.exit_code == 0, result.output
    events = json.loads(result.output)["events"]
    assert [(e["actor"], e["action"], e["resource"]) for e in events] == [
        (actor, "admin.region.update", "regions/440000")
    ]


# -- update masks (AIP-134) ----------------------------------------------------------------------


async def _bank(client: CardLookupClient, code: str) -> admin_pb.Bank:
    return next(bank for bank in await client.list_banks() if bank.code == code)


async def test_update_bank_changes_only_the_masked_fields(union: UnionServer) -> None:
    async with CardLookupClient(union.address, admin_token=BOOTSTRAP_TOKEN) as client:
        before = await _bank(client, "CMB")
        assert before.enabled

        # The reported defect: an address alone must not disable the bank, with a mask or without.
        moved = await client.admin(
            "UpdateBank",
            admin_pb.UpdateBankRequest(code="CMB", address="127.0.0.1:1", update_mask=_mask("address")),
        )
        assert (moved.bank.address, moved.bank.enabled) == ("127.0.0.1:1", True)
        moved = await client.admin(
            "UpdateBank", admin_pb.UpdateBankRequest(code="CMB", address="127.0.0.1:2")
        )
        assert (moved.bank.address, moved.bank.enabled) == ("127.0.0.1:2", True)

        # enabled alone keeps the address; a masked field is set even to its default value.
        disabled = await client.admin(
            "UpdateBank", admin_pb.UpdateBankRequest(code="CMB", enabled=False, update_mask=_mask("enabled"))
        )
        assert (disabled.bank.address, disabled.bank.enabled) == ("127.0.0.1:2", False)
        # A field outside the mask is ignored even when the request carries it.
        enabled = await client.admin(
            "UpdateBank",
            admin_pb.UpdateBankRequest(
                code="CMB", enabled=True, address="127.0.0.1:3", update_mask=_mask("enabled")
            ),
        )
        assert (enabled.bank.address, enabled.bank.enabled) == ("127.0.0.1:2", True)
        # Without a mask, false is no value: nothing changes.
        kept = await client.admin("UpdateBank", admin_pb.UpdateBankRequest(code="CMB", enabled=False))
        assert (kept.bank.address, kept.bank.enabled) == ("127.0.0.1:2", True)
        # "*" is every field.
        replaced = await client.admin(
            "UpdateBank",
            admin_pb.UpdateBankRequest(
                code="CMB", enabled=True, address=before.address, update_mask=_mask("*")
            ),
        )
        assert (replaced.bank.address, replaced.bank.enabled) == (before.address, True)
        assert await _bank(client, "CMB") == replaced.bank


async def test_unknown_update_mask_paths_are_refused(union: UnionServer) -> None:
    async with CardLookupClient(union.address, admin_token=BOOTSTRAP_TOKEN) as client:
        requests = [
            ("UpdateBank", admin_pb.UpdateBankRequest(code="CMB", update_mask=_mask("name"))),
            (
                "UpdateBank",
                admin_pb.UpdateBankRequest(code="CMB", update_mask=_mask("enabled", "6222020200112233")),
            ),
            ("UpdateBank", admin_pb.UpdateBankRequest(code="CMB", update_mask=_mask("*", "enabled"))),
            ("UpdateBank", admin_pb.UpdateBankRequest(code="CMB", update_mask=_mask("bank.enabled"))),
            (
                "UpdateRegion",
                admin_pb.UpdateRegionRequest(code="440000", open=True, update_mask=_mask("name")),
            ),
        ]
        for method, request in requests:
            with pytest.raises(CardLookupError) as refused:
                await client.admin(method, request)
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert [field for field, _ in refused.value.field_violations] == ["update_mask"]
            assert "6222020200112233" not in str(refused.value)
        assert (await _bank(client, "CMB")).enabled
        # An address named by the mask must be one.
        with pytest.raises(CardLookupError) as empty:
            await client.admin(
                "UpdateBank", admin_pb.UpdateBankRequest(code="CMB", update_mask=_mask("address"))
            )
        assert [field for field, _ in empty.value.field_violations] == ["address"]


async def test_update_region_changes_only_the_masked_fields(union: UnionServer) -> None:
    async with CardLookupClient(union.address, admin_token=BOOTSTRAP_TOKEN) as client:
        opened = await client.admin("UpdateRegion", admin_pb.UpdateRegionRequest(code="440000", open=True))
        assert opened.region.open
        # Without a mask, false is no value: the region stays open.
        kept = await client.admin("UpdateRegion", admin_pb.UpdateRegionRequest(code="440000", open=False))
        assert kept.region.open
        assert kept.region.open_time == opened.region.open_time
        closed = await client.admin(
            "UpdateRegion", admin_pb.UpdateRegionRequest(code="440000", open=False, update_mask=_mask("open"))
        )
        assert not closed.region.open
        assert await _refusal(client.update_region("999999", True)) == (grpc.StatusCode.NOT_FOUND, "")
        assert await _refusal(
            client.admin(
                "UpdateRegion", admin_pb.UpdateRegionRequest(code="999999", update_mask=_mask("open"))
            )
        ) == (grpc.StatusCode.NOT_FOUND, "")


async def test_the_cli_sends_update_masks(union: UnionServer) -> None:
    base = ["--target", union.address, "--admin-token", BOOTSTRAP_TOKEN]

    async def cli(*arguments: str) -> str:
        result = await asyncio.to_thread(CliRunner().invoke, cli_app, ["admin", *arguments, *base])
        assert result.exit_code == 0, result.output
        return result.output

    async with CardLookupClient(union.address, admin_token=BOOTSTRAP_TOKEN) as client:
        address = (await _bank(client, "CMB")).address
        assert "CMB: enabled at 127.0.0.1:9" in await cli("set-bank", "CMB", "--address", "127.0.0.1:9")
        assert "CMB: disabled at 127.0.0.1:9" in await cli("set-bank", "CMB", "--disable")
        assert f"CMB: enabled at {address}" in await cli("set-bank", "CMB", "--enable", "--address", address)
        assert "closed" in await cli("set-region", "310000", "--close")
        assert not next(r for r in await client.list_regions() if r.code == "310000").open
        assert "open" in await cli("set-region", "310000", "--open")
    nothing = await asyncio.to_thread(CliRunner().invoke, cli_app, ["admin", "set-bank", "CMB", *base])
    assert nothing.exit_code == 2
