"""Request validation shared by the union's domain services (one place for each rule; what a person
types to verify is normalised and checked in server.common.normalize)."""

from __future__ import annotations

import hashlib
import re
from typing import Protocol

from server.common import errors

# Always used with fullmatch: "$" alone would accept a trailing newline, and "\d" any Unicode digit.
REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RESOURCE_ID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
CODE = re.compile(r"^[0-9]{6}$")


def require(violations: list[errors.FieldViolation]) -> None:
    """Raise INVALID_ARGUMENT listing every violation, if there is any."""
    if violations:
        raise errors.InvalidArgument(violations)


def resource_id(name: str, collection: str, field: str, violations: list[errors.FieldViolation]) -> str:
    """parse_resource_name that adds its violation to `violations` (so one answer names every bad
    field) and returns "" for a bad name."""
    try:
        return parse_resource_name(name, collection, field)
    except errors.InvalidArgument as error:
        violations.extend(error.violations)
        return ""


def parse_resource_name(name: str, collection: str, field: str = "name") -> str:
    """'lookups/abc' -> 'abc', or INVALID_ARGUMENT."""
    prefix = f"{collection}/"
    if not name.startswith(prefix) or not RESOURCE_ID.fullmatch(name[len(prefix) :]):
        raise errors.InvalidArgument([errors.FieldViolation(field, f"must look like {collection}/{{id}}")])
    return name[len(prefix) :]


class KeyedHash(Protocol):
    def attribute_hash(self, kind: str, value: str) -> str: ...


def request_key(keys: KeyedHash, person_hash: str, request_id: str) -> str:
    """What the union keeps of a (validated) request_id: a keyed hash, never the text, which may be
    anything a client chose to type (a card or ID number fits the pattern)."""
    return keys.attribute_hash("request", f"{person_hash}:{request_id}")


def fingerprint(kind: str, *parts: str) -> str:
    """A digest of what a request asks, stored with its request_id so that reusing the request_id
    for a different request is refused (AIP-155). The parts are validated identifiers."""
    return hashlib.sha256("\x1f".join((kind, *parts)).encode()).hexdigest()


def request_id_reused() -> errors.InvalidArgument:
    return errors.InvalidArgument(
        [errors.FieldViolation("request_id", "already used for a different request; use a new request_id")]
    )
