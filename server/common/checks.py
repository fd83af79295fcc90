"""Check digits of the identifiers this project handles.

- Card numbers: the Luhn algorithm (ISO/IEC 7812-1).
- Resident ID numbers: GB 11643-1999, an ISO 7064 MOD 11-2 check character.
"""

from __future__ import annotations

import re
from datetime import date

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK_CHARS = "10X98765432"
_ID_PATTERN = re.compile(r"[0-9]{17}[0-9X]")


def luhn_check_digit(partial: str) -> str:
    """The digit that makes `partial` + digit Luhn-valid."""
    total = 0
    # Walk from the right; the check digit will sit to the right, so the
    # rightmost digit of `partial` is doubled.
    for index, char in enumerate(reversed(partial)):
        digit = int(char)
        if index % 2 == 0:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return str((10 - total % 10) % 10)


def is_luhn_valid(number: str) -> bool:
    return (
        len(number) >= 2
        and number.isascii()
        and number.isdigit()
        and luhn_check_digit(number[:-1]) == number[-1]
    )


def resident_id_check_char(first17: str) -> str:
    """GB 11643 check character for the first 17 digits."""
    total = sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS, strict=True))
    return _ID_CHECK_CHARS[total % 11]


def is_valid_resident_id(value: str) -> bool:
    """Shape, birth date and check character of an 18-character resident ID number."""
    if not _ID_PATTERN.fullmatch(value):
        return False
    try:
        date(int(value[6:10]), int(value[10:12]), int(value[12:14]))
    except ValueError:
        return False
    return resident_id_check_char(value[:17]) == value[17]


def resident_id_region(value: str) -> str:
    """Province-level region code (GB/T 2260) of a resident ID: first two digits + '0000'."""
    return value[:2] + "0000"
