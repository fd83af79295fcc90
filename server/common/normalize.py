"""What a person types for verification, normalised in one place, and the checks it must pass.

The union (IdentityService.start_verification) and the CLI (before sending) both use these pure
functions, so what one accepts the other accepts, and a refusal reads the same on both.

Normalisation, applied to every field before any check:
- Unicode NFKC, so full-width digits and letters (０-９, ｘ, ＋, －) become their ASCII forms;
- surrounding whitespace is removed.

Then, per field:
- name: nothing more (inner spaces are kept; they may be part of the registered name);
- resident ID number: a lowercase `x` check character becomes `X`;
- mobile number: spaces and dashes anywhere are removed, then a leading `+86` or `0086`
  (the mainland country code) is dropped.

Each `*_problem` function takes the normalised value and returns None, or the first check it
failed in words safe to show anyone: never the value itself.
- name: not empty; at most 64 characters; no control characters.
- resident ID number (GB 11643): 18 characters; the first 17 digits and the last a digit or X;
  a real birth date in characters 7-14; the check character matches the first 17 digits.
- mobile number: 11 digits; starts with 1 and a second digit from 3 to 9.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import date

from server.common.checks import resident_id_check_char

MAX_NAME_CHARS = 64
# Hyphen-minus (what NFKC makes of a full-width one) and the Unicode hyphens and dashes.
_MOBILE_SEPARATORS = re.compile(r"[\s\-\u2010-\u2015]+")
_COUNTRY_CODES = ("+86", "0086")
_DIGITS = re.compile(r"[0-9]+")
_MOBILE = re.compile(r"1[3-9][0-9]{9}")


def _nfkc(value: str) -> str:
    return unicodedata.normalize("NFKC", value).strip()


def name(value: str) -> str:
    return _nfkc(value)


def resident_id(value: str) -> str:
    normalised = _nfkc(value)
    if normalised.endswith("x"):
        normalised = normalised[:-1] + "X"
    return normalised


def mobile_number(value: str) -> str:
    normalised = _MOBILE_SEPARATORS.sub("", _nfkc(value))
    for prefix in _COUNTRY_CODES:
        if normalised.startswith(prefix):
            return normalised[len(prefix) :]
    return normalised


def name_problem(normalised: str) -> str | None:
    if not normalised:
        return "must not be empty"
    if len(normalised) > MAX_NAME_CHARS:
        return f"at most {MAX_NAME_CHARS} characters"
    if any(not ch.isprintable() for ch in normalised):
        return "must not contain control characters"
    return None


def resident_id_problem(normalised: str) -> str | None:
    if len(normalised) != 18:
        return "must be 18 characters"
    if not _DIGITS.fullmatch(normalised[:17]) or not (
        _DIGITS.fullmatch(normalised[17]) or normalised[17] == "X"
    ):
        return "must be 17 digits and a last character that is a digit or X"
    try:
        date(int(normalised[6:10]), int(normalised[10:12]), int(normalised[12:14]))
    except ValueError:
        return "characters 7-14 must be a real birth date (YYYYMMDD)"
    if resident_id_check_char(normalised[:17]) != normalised[17]:
        return "the check character (the last one) does not match the first 17 digits"
    return None


def mobile_number_problem(normalised: str) -> str | None:
    if not _DIGITS.fullmatch(normalised) or len(normalised) != 11:
        return "must be 11 digits (spaces, dashes and a +86 or 0086 prefix are allowed)"
    if not _MOBILE.fullmatch(normalised):
        return "must be a mainland mobile number: 1, then a digit from 3 to 9"
    return None


@dataclass(frozen=True)
class Identity:
    """The three verification inputs, normalised, and what (if anything) is wrong with them."""

    name: str
    resident_id_number: str
    mobile_number: str
    # (proto field name, the check it failed), in field order.
    problems: tuple[tuple[str, str], ...]


def identity(name_text: str, resident_id_text: str, mobile_text: str) -> Identity:
    """Normalise and check all three fields at once, so one refusal lists every problem."""
    normalised = Identity(name(name_text), resident_id(resident_id_text), mobile_number(mobile_text), ())
    checks = (
        ("name", name_problem(normalised.name)),
        ("resident_id_number", resident_id_problem(normalised.resident_id_number)),
        ("mobile_number", mobile_number_problem(normalised.mobile_number)),
    )
    return Identity(
        normalised.name,
        normalised.resident_id_number,
        normalised.mobile_number,
        tuple((field, problem) for field, problem in checks if problem is not None),
    )
