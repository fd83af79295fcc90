"""The shapes of the names the union, the banks and the development CA share.

One definition each, used by the admin API, the configuration files and the command lines, so that
what one of them accepts the others accept too (a bank added by CreateBank can be configured, issued
a certificate and started under the same code, address and TLS name).
"""

from __future__ import annotations

import ipaddress
import re

# A bank's code: 2-16 capital letters (ICBC, CMB, BOSC). Which codes exist is the catalogue's.
BANK_CODE = re.compile(r"^[A-Z]{2,16}$")
# A bank's Chinese name (CJK, parentheses, a middle dot), its English name, its 3-digit CNAPS code.
BANK_NAME = re.compile(r"^[\u3400-\u9fff（）()·A-Za-z0-9]{2,32}$")
BANK_ENGLISH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 .,&'()-]{1,127}$")
INTERBANK_CODE = re.compile(r"^[0-9]{3}$")
# The name a bank's TLS certificate carries: a lower-case DNS name with at least one dot.
DNS_NAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+$"
)
_HOST = re.compile(r"^[A-Za-z0-9.\-]{1,253}$")


def bank_tls_name(bank_code: str) -> str:
    """The name a bank's certificate carries unless its catalogue entry names another."""
    return f"{bank_code.lower()}.bank.cardlookup.test"


def is_bank_address(value: str) -> bool:
    """host:port of a bank's server: a host name or IPv4 address, or an IPv6 address in brackets
    ([::1]:50061), and a port from 1 to 65535."""
    host, separator, port = value.rpartition(":")
    if not (separator and port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536):
        return False
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    return bool(_HOST.fullmatch(host))
