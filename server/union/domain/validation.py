"""Request validation shared by the union's domain services (one place for each rule)."""

from __future__ import annotations

import re

from server.common import errors
from server.common.checks import is_valid_resident_id

# Always used with fullmatch: "$" alone would accept a trailing newline, and "\d" any Unicode digit.
REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RESOURCE_ID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
MOBILE = re.compile(r"^1[3-9][0-9]{9}$")
CODE = re.compile(r"^[0-9]{6}$")
MAX_NAME_CHARS = 64


def name_problem(name: str) -> str | None:
    if not name.strip():
        return "must not be empty"
    if len(name) > MAX_NAME_CHARS:
        return f"at most {MAX_NAME_CHARS} characters"
    if any(not ch.isprintable() for ch in name):
        return "must not contain control characters"
    return None


def resident_id_problem(value: str) -> str | None:
    if not is_valid_resident_id(value):
        return "must be an 18-character resident ID number with a valid birth date and check digit"
    return None


def require(violations: list[errors.FieldViolation]) -> None:
    """Raise INVALID_ARGUMENT listing every violation, if there is any."""
    if violations:
        raise errors.InvalidArgument(violations)


def parse_resource_name(name: str, collection: str, field: str = "name") -> str:
    """'lookups/abc' -> 'abc', or INVALID_ARGUMENT."""
    prefix = f"{collection}/"
    if not name.startswith(prefix) or not RESOURCE_ID.fullmatch(name[len(prefix) :]):
        raise errors.InvalidArgument([errors.FieldViolation(field, f"must look like {collection}/{{id}}")])
    return name[len(prefix) :]
