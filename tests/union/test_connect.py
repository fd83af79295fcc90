"""cardlookup.v1 over Connect and gRPC-Web on the union's HTTP port: the gRPC behaviour, another transport.

The same session check, validation and error mapping as gRPC (codes and google.rpc details),
WatchLookup as an HTTP/1.1 server stream, the README's curl flow run as written, and the HTTP
port's own rules: the security headers, and no API for a foreign browser origin. Every call on it
is counted, timed and logged as the same gRPC call would be (the trace is in tests/test_tracing.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from cardlookup.v1 import card_action_service_connect as action_connect
from cardlookup.v1 import card_action_service_pb2 as action_pb
from cardlookup.v1 import card_lookup_service_connect as lookup_connect
from cardlookup.v1 import card_lookup_service_pb2 as lookup_pb
from cardlookup.v1 import identity_service_connect as identity_connect
from cardlookup.v1 import identity_service_pb2 as identity_pb
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from google.rpc import error_details_pb2
from prometheus_client import generate_latest

from clients.client import TERMS_VERSION
from server.bank.bank_server import RunningBank
from server.bank.faults import FaultSettings
from server.population.generator import Person, cards_of
from server.union.sms import read_one_time_code
from server.union.union_server import UnionServer
from tests.conftest import LI, SEED, ZHANG, UnionFactory

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MASKED = re.compile(r"^\d{4}( \*{1,4})+ \d{4}$")
# A card-number-shaped run standing alone (as test_privacy.py's DIGIT_RUN): ids are a letter and 24
# hex digits, and about one in a few hundred holds 16 decimal digits in a row.
PAN = re.compile(r"(?<![0-9A-Za-z])\d{16,19}(?![0-9A-Za-z])")
IDENTITY = "cardlookup.v1.IdentityService"
LOOKUPS = "cardlookup.v1.CardLookupService"
WIRE_NAMES = {ProtocolType.CONNECT: "connect", ProtocolType.GRPC_WEB: "grpc-web"}


@pytest.fixture
async def http_union(make_union: UnionFactory, tmp_path: Path) -> UnionServer:
    web_root = tmp_path / "web"
    web_root.mkdir()
    (web_root / "index.html").write_text("<!doctype html><title>一键查卡</title>\n", encoding="utf-8")
    return await make_union(http_listen="127.0.0.1:0", web_root=web_root)


def _base(union: UnionServer) -> str:
    assert union.http_address is not None
    return f"http://{union.http_address}"


async def _session(union: UnionServer, person: Person, protocol: ProtocolType) -> str:
    async with identity_connect.IdentityServiceClient(_base(union), protocol=protocol) as identity:
        started = await identity.start_verification(
            identity_pb.StartVerificationRequest(
                name=person.name,
                resident_id_number=person.resident_id_number,
                mobile_number=person.mobile_number,
            )
        )
        code = read_one_time_code(union.config.sms_sink_path, person.mobile_number)
        assert code is not None
        done = await identity.complete_verification(
            identity_pb.CompleteVerificationRequest(verification_id=started.verification_id, code=code)
        )
    return done.session_token


@pytest.mark.parametrize("protocol", [ProtocolType.CONNECT, ProtocolType.GRPC_WEB])
async def test_lookup_watch_report_and_actions_over_http(
    http_union: UnionServer, protocol: ProtocolType
) -> None:
    token = await _session(http_union, ZHANG, protocol)
    auth = {"authorization": f"Bearer {token}"}
    async with lookup_connect.CardLookupServiceClient(_base(http_union), protocol=protocol) as lookups:
        created = await lookups.create_lookup(
            lookup_pb.CreateLookupRequest(request_id=uuid.uuid4().hex, consent_terms_version=TERMS_VERSION),
            headers=auth,
        )
        events = [
            event
            async for event in lookups.watch_lookup(
                lookup_pb.WatchLookupRequest(name=created.lookup.name), headers=auth
            )
        ]
        assert events[-1].report_ready
        assert [p.outcome for p in events[-1].lookup.bank_progress] == [lookup_pb.BANK_OUTCOME_ANSWERED] * 16
        report = (
            await lookups.get_report(lookup_pb.GetReportRequest(name=events[-1].lookup.report), headers=auth)
        ).report
    assert (report.total_card_count, report.total_debit_card_count, report.total_credit_card_count) == (
        5,
        3,
        2,
    )
    assert all(MASKED.match(card.masked_number) for card in report.cards)
    card = report.cards[0]
    async with action_connect.CardActionServiceClient(_base(http_union), protocol=protocol) as actions:
        flag = await actions.flag_card_not_mine(
            action_pb.FlagCardNotMineRequest(request_id="flag-1", report=report.name, card_ref=card.card_ref),
            headers=auth,
        )
        assert flag.flag.case_number
        audit = await actions.list_my_audit_events(action_pb.ListMyAuditEventsRequest(), headers=auth)
        assert audit.events


async def test_errors_carry_the_grpc_codes_and_details(http_union: UnionServer) -> None:
    async with lookup_connect.CardLookupServiceClient(_base(http_union)) as lookups:
        with pytest.raises(ConnectError) as missing:
            await lookups.list_reports(lookup_pb.ListReportsRequest())
        assert missing.value.code == Code.UNAUTHENTICATED
        info = error_details_pb2.ErrorInfo()
        assert missing.value.details[0].Unpack(info)
        assert info.reason == "MISSING_CREDENTIAL"

        token = await _session(http_union, LI, ProtocolType.CONNECT)
        with pytest.raises(ConnectError) as invalid:
            await lookups.create_lookup(
                lookup_pb.CreateLookupRequest(request_id="not valid!"),
                headers={"authorization": f"Bearer {token}"},
            )
    assert invalid.value.code == Code.INVALID_ARGUMENT
    bad_request = error_details_pb2.BadRequest()
    assert invalid.value.details[0].Unpack(bad_request)
    assert [v.field for v in bad_request.field_violations] == ["request_id"]
    assert "not valid!" not in invalid.value.message


async def test_admission_control_counts_connect_calls_too(make_union: UnionFactory) -> None:
    union = await make_union(http_listen="127.0.0.1:0", web_root=None, max_concurrent_calls=0)
    async with identity_connect.IdentityServiceClient(_base(union)) as identity:
        with pytest.raises(ConnectError) as busy:
            await identity.start_verification(identity_pb.StartVerificationRequest())
    assert busy.value.code == Code.RESOURCE_EXHAUSTED
    retry = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(retry) for detail in busy.value.details)
    assert retry.retry_delay.seconds >= 1


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (a loopback test server)
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


async def test_unparseable_json_is_invalid_argument_without_echo(http_union: UnionServer) -> None:
    url = f"{_base(http_union)}/cardlookup.v1.IdentityService/StartVerification"
    secret = "310104198503129915"
    status, _, body = await asyncio.to_thread(
        _post,
        url,
        f'{{"residentIdNumber": {secret}, "nosuchField": 1}}'.encode(),
        {"content-type": "application/json"},
    )
    answer = json.loads(body)
    assert (status, answer["code"]) == (400, "invalid_argument")
    assert secret not in body.decode()
    assert answer["details"][0]["type"] == "google.rpc.BadRequest"


async def test_security_headers_and_foreign_origins(http_union: UnionServer) -> None:
    base = _base(http_union)
    page = await asyncio.to_thread(urllib.request.urlopen, f"{base}/", timeout=10)
    with page:
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "一键查卡" in page.read().decode()

    url = f"{base}/cardlookup.v1.IdentityService/StartVerification"
    headers = {"content-type": "application/json"}
    own_status, own_headers, _ = await asyncio.to_thread(
        _post, url, b"{}", {**headers, "origin": base.replace("127.0.0.1", "localhost")}
    )
    assert own_status == 400  # reached the service: the empty request is invalid
    foreign_status, foreign_headers, _ = await asyncio.to_thread(
        _post, url, b"{}", {**headers, "origin": "https://evil.example"}
    )
    assert foreign_status == 403
    assert "access-control-allow-origin" not in {k.lower() for k in foreign_headers}
    preflight = urllib.request.Request(url, method="OPTIONS", headers={"origin": "https://evil.example"})  # noqa: S310
    with pytest.raises(urllib.error.HTTPError) as refused:
        await asyncio.to_thread(urllib.request.urlopen, preflight, timeout=10)
    refused.value.close()
    assert refused.value.code == 403
    own = base.replace("127.0.0.1", "localhost")
    allowed = urllib.request.Request(url, method="OPTIONS", headers={"origin": own})  # noqa: S310
    answer = await asyncio.to_thread(urllib.request.urlopen, allowed, timeout=10)
    with answer:
        assert answer.status == 204
        assert answer.headers["access-control-allow-origin"] == own
        assert "authorization" in answer.headers["access-control-allow-headers"]
    assert {k.lower(): v for k, v in own_headers.items()}.get("access-control-allow-origin") == base.replace(
        "127.0.0.1", "localhost"
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_an_origin_the_operator_adds_does_not_shut_out_the_page_itself(
    make_union: UnionFactory, tmp_path: Path
) -> None:
    web_root = tmp_path / "web"
    web_root.mkdir()
    (web_root / "index.html").write_text("<!doctype html><title>一键查卡</title>\n", encoding="utf-8")
    union = await make_union(
        http_listen="127.0.0.1:0", web_root=web_root, http_allowed_origins=("https://app.example",)
    )
    base = _base(union)
    url = f"{base}/cardlookup.v1.IdentityService/StartVerification"
    for origin in (base, "https://app.example"):
        status, _, _ = await asyncio.to_thread(
            _post, url, b"{}", {"content-type": "application/json", "origin": origin}
        )
        assert status == 400, origin  # reached the service: the empty request is invalid
    status, _, _ = await asyncio.to_thread(
        _post, url, b"{}", {"content-type": "application/json", "origin": "https://evil.example"}
    )
    assert status == 403


async def test_curl_flow_as_documented(http_union: UnionServer, tmp_path: Path) -> None:
    script = _curl_block(README.read_text(encoding="utf-8"))
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        script,
        cwd=tmp_path,
        env={
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "UNION": _base(http_union),
            "OUTBOX": str(http_union.config.sms_sink_path),
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, stderr.decode()
    # GetReport's answer, then DeleteReport's (an empty message).
    answers = _json_values(stdout.decode())
    assert len(answers) == 2
    report: dict[str, Any] = answers[0]["report"]
    assert answers[1] == {}
    assert len(report["bankSummaries"]) == 16
    assert '"bankName": "中国农业银行"' in stdout.decode()  # readable, not \\u escapes
    assert len(report["cards"]) == 4  # 李娜: BOC, ABC, PSBC debit and a CMB credit card
    assert all(MASKED.match(card["maskedNumber"]) for card in report["cards"])
    assert LI.resident_id_number not in stdout.decode()
    assert not PAN.search(stdout.decode())
    async with lookup_connect.CardLookupServiceClient(_base(http_union)) as lookups:
        token = await _session(http_union, LI, ProtocolType.CONNECT)
        with pytest.raises(ConnectError) as gone:
            await lookups.get_report(
                lookup_pb.GetReportRequest(name=report["name"]), headers={"authorization": f"Bearer {token}"}
            )
    assert gone.value.code == Code.NOT_FOUND


def _json_values(text: str) -> list[Any]:
    decoder = json.JSONDecoder()
    values, position = [], 0
    while position < len(text.rstrip()):
        value, end = decoder.raw_decode(text, position)
        values.append(value)
        position = end
        while position < len(text) and text[position].isspace():
            position += 1
    return values


def _curl_block(markdown: str) -> str:
    section = markdown.split("### With curl", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the curl flow's sh block is missing from the README"
    return match.group(1)


def _rpc_count(union: UnionServer, service: str, method: str, code: str) -> float:
    """Calls in the union's own Prometheus registry, by the labels a gRPC call gets."""
    labels = {"server": "union", "grpc_service": service, "grpc_method": method, "grpc_code": code}
    return union.metrics.registry.get_sample_value("cardlookup_rpc_duration_seconds_count", labels) or 0.0


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    return [
        (getattr(r, "method", ""), getattr(r, "code", ""), getattr(r, "protocol", ""))
        for r in caplog.records
        if r.name == "cardlookup.access"
    ]


async def _until_logged(caplog: pytest.LogCaptureFixture, line: tuple[str, str, str]) -> None:
    """A call is recorded once its answer is on the wire; the client may read it a moment before."""
    for _ in range(500):
        if line in _access_lines(caplog):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no access line {line}: {_access_lines(caplog)}")


def _persons_details(person: Person) -> list[str]:
    return [person.resident_id_number, person.name, person.mobile_number] + [
        card.number for card in cards_of(SEED, person)
    ]


@pytest.mark.parametrize("protocol", [ProtocolType.CONNECT, ProtocolType.GRPC_WEB])
async def test_every_http_call_is_counted_and_logged_as_the_same_grpc_call(
    http_union: UnionServer, protocol: ProtocolType, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cardlookup.access")
    wire = WIRE_NAMES[protocol]
    token = await _session(http_union, ZHANG, protocol)
    auth = {"authorization": f"Bearer {token}"}
    async with lookup_connect.CardLookupServiceClient(_base(http_union), protocol=protocol) as lookups:
        created = await lookups.create_lookup(
            lookup_pb.CreateLookupRequest(request_id=uuid.uuid4().hex, consent_terms_version=TERMS_VERSION),
            headers=auth,
        )
        with pytest.raises(ConnectError) as invalid:
            await lookups.create_lookup(lookup_pb.CreateLookupRequest(request_id="not valid!"), headers=auth)
        assert invalid.value.code == Code.INVALID_ARGUMENT
        with pytest.raises(ConnectError) as anonymous:
            await lookups.list_reports(lookup_pb.ListReportsRequest())
        assert anonymous.value.code == Code.UNAUTHENTICATED
        events = [
            event
            async for event in lookups.watch_lookup(
                lookup_pb.WatchLookupRequest(name=created.lookup.name), headers=auth
            )
        ]
        assert events[-1].report_ready
    await _until_logged(caplog, (f"/{LOOKUPS}/WatchLookup", "OK", wire))

    assert _rpc_count(http_union, IDENTITY, "StartVerification", "OK") == 1
    assert _rpc_count(http_union, IDENTITY, "CompleteVerification", "OK") == 1
    assert _rpc_count(http_union, LOOKUPS, "CreateLookup", "OK") == 1
    assert _rpc_count(http_union, LOOKUPS, "CreateLookup", "INVALID_ARGUMENT") == 1
    assert _rpc_count(http_union, LOOKUPS, "ListReports", "UNAUTHENTICATED") == 1
    assert _rpc_count(http_union, LOOKUPS, "WatchLookup", "OK") == 1
    assert sorted(_access_lines(caplog)) == sorted(
        [
            (f"/{IDENTITY}/StartVerification", "OK", wire),
            (f"/{IDENTITY}/CompleteVerification", "OK", wire),
            (f"/{LOOKUPS}/CreateLookup", "OK", wire),
            (f"/{LOOKUPS}/CreateLookup", "INVALID_ARGUMENT", wire),
            (f"/{LOOKUPS}/ListReports", "UNAUTHENTICATED", wire),
            (f"/{LOOKUPS}/WatchLookup", "OK", wire),
        ]
    )
    for record in (r for r in caplog.records if r.name == "cardlookup.access"):
        assert record.levelno == logging.INFO
        fields = vars(record)
        assert fields["server"] == "union"
        assert fields["duration_ms"] >= 0
        assert str(fields["peer"]).startswith("ipv4:127.0.0.1:")
    exposed = caplog.text + " ".join(str(vars(r)) for r in caplog.records)
    exposed += generate_latest(http_union.metrics.registry).decode()
    assert "not valid!" not in exposed
    assert not [value for value in _persons_details(ZHANG) if value in exposed]


async def test_calls_refused_before_any_handler_are_counted_and_an_unknown_path_is_not_repeated(
    http_union: UnionServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cardlookup.access")
    secret = ZHANG.resident_id_number
    status, _, _ = await asyncio.to_thread(
        _post,
        f"{_base(http_union)}/{IDENTITY}/StartVerification",
        f'{{"residentIdNumber": {secret}}}'.encode(),
        {"content-type": "application/json"},
    )
    assert status == 400
    status, _, _ = await asyncio.to_thread(
        _post, f"{_base(http_union)}/{LOOKUPS}/{secret}", b"{}", {"content-type": "application/json"}
    )
    assert status == 404
    await _until_logged(caplog, ("unregistered", "UNIMPLEMENTED", "connect"))
    assert sorted(_access_lines(caplog)) == [
        (f"/{IDENTITY}/StartVerification", "INVALID_ARGUMENT", "connect"),
        ("unregistered", "UNIMPLEMENTED", "connect"),
    ]
    assert _rpc_count(http_union, IDENTITY, "StartVerification", "INVALID_ARGUMENT") == 1
    assert _rpc_count(http_union, "unregistered", "unregistered", "UNIMPLEMENTED") == 1
    exposed = caplog.text + " ".join(str(vars(r)) for r in caplog.records)
    exposed += generate_latest(http_union.metrics.registry).decode()
    assert secret not in exposed


@pytest.mark.parametrize("protocol", [ProtocolType.CONNECT, ProtocolType.GRPC_WEB])
async def test_a_watch_the_client_leaves_mid_stream_is_cancelled(
    make_union: UnionFactory,
    banks: dict[str, RunningBank],
    protocol: ProtocolType,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="cardlookup.access")
    # One slow bank keeps the lookup going after the watcher has left; its answer is the next event.
    banks["ICBC"].servicer.faults = FaultSettings(latency_ms=2000)
    union = await make_union(http_listen="127.0.0.1:0", web_root=None)
    token = await _session(union, ZHANG, protocol)
    auth = {"authorization": f"Bearer {token}"}
    async with lookup_connect.CardLookupServiceClient(_base(union), protocol=protocol) as lookups:
        created = await lookups.create_lookup(
            lookup_pb.CreateLookupRequest(request_id=uuid.uuid4().hex, consent_terms_version=TERMS_VERSION),
            headers=auth,
        )
        stream = lookups.watch_lookup(lookup_pb.WatchLookupRequest(name=created.lookup.name), headers=auth)
        first = await anext(aiter(stream))
        assert not first.report_ready
        await stream.aclose()  # type: ignore[attr-defined]
    await _until_logged(caplog, (f"/{LOOKUPS}/WatchLookup", "CANCELLED", WIRE_NAMES[protocol]))
    assert _rpc_count(union, LOOKUPS, "WatchLookup", "CANCELLED") == 1
    assert _rpc_count(union, LOOKUPS, "WatchLookup", "OK") == 0
