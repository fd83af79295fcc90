"""Synchronous conveniences over the async client, for scripts and notebooks.

The whole person's flow in one call — verify, look up, wait for the report —
is the natural synchronous unit; everything finer-grained stays async in
`clients.client`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import grpc
from cardlookup.v1 import card_lookup_service_pb2 as lookup_pb

from clients.client import CardLookupClient, CardLookupError


def lookup_report(
    target: str,
    name: str,
    resident_id_number: str,
    mobile_number: str,
    read_code: Callable[[str], str],
    *,
    consent_terms_version: str,
    bank_codes: list[str] | None = None,
    root_certificates: bytes | None = None,
    timeout: float = 600.0,
) -> lookup_pb.Report:
    """Verify (asking `read_code(masked_mobile)` for the SMS code), run one lookup, return its report.

    `consent_terms_version`: the version of the union's terms the person accepted (required: the
    caller shows the terms, `clients.client.TERMS_VERSION`, and passes what was agreed to).

    Raises CardLookupError with the server's explanation (field violations, retry-after)."""

    async def flow() -> lookup_pb.Report:
        async with CardLookupClient(target, root_certificates=root_certificates) as client:
            started = await client.start_verification(name, resident_id_number, mobile_number)
            code = await asyncio.to_thread(read_code, started.masked_mobile_number)
            await client.complete_verification(started.verification_id, code)
            lookup = await client.create_lookup(
                bank_codes, request_id=uuid.uuid4().hex, consent_terms_version=consent_terms_version
            )
            async for event in client.watch_lookup(lookup.name, stream_timeout=timeout):
                if event.report_ready:
                    return await client.get_report(event.lookup.report)
        raise CardLookupError(grpc.StatusCode.UNAVAILABLE, "the watch ended before the report was ready")

    return asyncio.run(flow())
