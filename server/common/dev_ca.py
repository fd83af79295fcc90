"""A development PKI for mutual TLS between the union and the banks (never for production).

`create_dev_pki(directory)` writes, with EC P-256 keys:

- `ca.crt` / `ca.key`: a self-signed development CA (about ten years);
- `union-client.crt` / `.key`: the union's client certificate (CN "union",
  DNS SAN `union.cardlookup.test`, EKU clientAuth);
- `union-server.crt` / `.key`: the union's own server certificate (DNS SANs
  `localhost`, `union.cardlookup.test`, IP SAN 127.0.0.1) for TLS clients;
- `<code>.crt` / `<code>.key` (lower-case bank code) for every bank: CN = the
  bank code, DNS SAN = `bank_tls_name(code)` (the name the union checks), EKU
  serverAuth and clientAuth.

Leaves live about a year. Keys are written with mode 0600 and are generated on
the machine that needs them (under the git-ignored data/ directory), never
committed. Existing files are kept unless `overwrite=True`; a new CA always
re-issues every leaf, so the set stays consistent.

    python -m server.common.dev_ca data/pki [--overwrite]
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.common.grpc_runtime import ClientTls, TlsFiles
from server.common.shapes import BANK_CODE, DNS_NAME, bank_tls_name
from server.population.catalogue import BANKS

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=365)
CLOCK_SKEW = dt.timedelta(minutes=5)

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
UNION_CLIENT = "union-client"
UNION_SERVER = "union-server"
UNION_DNS_NAME = "union.cardlookup.test"
ORGANIZATION = "cardlookup development"


@dataclass(frozen=True)
class _LeafSpec:
    stem: str
    common_name: str
    names: tuple[x509.GeneralName, ...]
    usages: tuple[x509.ObjectIdentifier, ...]


def _bank_leaf(code: str, tls_name: str | None = None) -> _LeafSpec:
    """A bank's certificate: CN the bank code, the DNS name the union checks for it."""
    return _LeafSpec(
        code.lower(),
        code,
        (x509.DNSName(tls_name or bank_tls_name(code)),),
        (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
    )


def _leaf_specs() -> list[_LeafSpec]:
    specs = [
        _LeafSpec(
            UNION_CLIENT,
            "union",
            (x509.DNSName(UNION_DNS_NAME),),
            (ExtendedKeyUsageOID.CLIENT_AUTH,),
        ),
        _LeafSpec(
            UNION_SERVER,
            "union",
            (
                x509.DNSName("localhost"),
                x509.DNSName(UNION_DNS_NAME),
                x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
            ),
            (ExtendedKeyUsageOID.SERVER_AUTH,),
        ),
    ]
    specs += [_bank_leaf(bank.code) for bank in BANKS]
    return specs


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (temp file + rename), the file created with `mode` from the start."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _make_ca(now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = _name("cardlookup development CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(
    spec: _LeafSpec, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(spec.common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + LEAF_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(spec.usages)), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(spec.names)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not (cert_path.exists() and key_path.exists()):
        return None
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key")
    return cert, key


def create_dev_pki(directory: Path, overwrite: bool = False) -> None:
    """Create (or complete) the development PKI in `directory`; existing files are kept unless `overwrite`."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    loaded = None if overwrite else _load_ca(directory)
    reissue = overwrite
    if loaded is None:
        loaded = _make_ca(now)
        _write(directory / CA_KEY, _key_pem(loaded[1]), 0o600)
        _write(directory / CA_CERT, _cert_pem(loaded[0]), 0o644)
        reissue = True  # leaves signed by an older CA would no longer verify
    ca_cert, ca_key = loaded
    for spec in _leaf_specs():
        cert_path, key_path = directory / f"{spec.stem}.crt", directory / f"{spec.stem}.key"
        if not reissue and cert_path.exists() and key_path.exists():
            continue
        cert, key = _make_leaf(spec, ca_cert, ca_key, now)
        _write(key_path, _key_pem(key), 0o600)
        _write(cert_path, _cert_pem(cert), 0o644)


def issue_bank_certificate(directory: Path, code: str, tls_name: str | None = None) -> Path:
    """Issue one more bank's certificate and key (`<code>.crt`/`.key`) from the PKI's existing CA:
    a bank that joins later gets its identity without a new CA (which would cut off every other
    bank). Returns the certificate's path; FileNotFoundError if the directory has no CA yet."""
    if not BANK_CODE.fullmatch(code):
        raise ValueError("a bank code is 2-16 capital letters")
    if tls_name is not None and not DNS_NAME.fullmatch(tls_name):
        raise ValueError("a TLS name is a lower-case DNS name, e.g. bosc.bank.cardlookup.test")
    loaded = _load_ca(directory)
    if loaded is None:
        raise FileNotFoundError(str(directory / CA_CERT))
    spec = _bank_leaf(code, tls_name)
    cert, key = _make_leaf(spec, loaded[0], loaded[1], dt.datetime.now(dt.UTC))
    _write(directory / f"{spec.stem}.key", _key_pem(key), 0o600)
    _write(directory / f"{spec.stem}.crt", _cert_pem(cert), 0o644)
    return directory / f"{spec.stem}.crt"


def bank_tls_files(directory: Path, code: str) -> TlsFiles:
    """A bank's server credentials from `directory`, requiring client certificates from the CA (mTLS)."""
    stem = code.lower()
    return TlsFiles(
        cert_chain=(directory / f"{stem}.crt").read_bytes(),
        private_key=(directory / f"{stem}.key").read_bytes(),
        client_ca=(directory / CA_CERT).read_bytes(),
    )


def union_client_tls(directory: Path) -> ClientTls:
    """The union's client credentials towards the banks, trusting only the development CA."""
    return ClientTls(
        root_ca=(directory / CA_CERT).read_bytes(),
        cert_chain=(directory / f"{UNION_CLIENT}.crt").read_bytes(),
        private_key=(directory / f"{UNION_CLIENT}.key").read_bytes(),
    )


def union_server_tls(directory: Path, require_client_cert: bool = False) -> TlsFiles:
    """The union's own server credentials (for clients connecting to the union over TLS)."""
    return TlsFiles(
        cert_chain=(directory / f"{UNION_SERVER}.crt").read_bytes(),
        private_key=(directory / f"{UNION_SERVER}.key").read_bytes(),
        client_ca=(directory / CA_CERT).read_bytes() if require_client_cert else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Create a development PKI for union↔bank mutual TLS.")
    parser.add_argument("directory", type=Path, help="where to write the certificates and keys")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files (new CA)")
    parser.add_argument(
        "--bank",
        metavar="CODE",
        help="only issue this bank's certificate from the existing CA (a bank that joins later)",
    )
    parser.add_argument(
        "--tls-name", help="with --bank: the DNS name to certify (default: <code>.bank.cardlookup.test)"
    )
    args = parser.parse_args(argv)
    if args.bank is not None:
        try:
            path = issue_bank_certificate(args.directory, args.bank, args.tls_name)
        except FileNotFoundError:
            parser.error(f"no development CA in {args.directory}: create the PKI first")
        except ValueError as error:
            parser.error(str(error))
        print(f"{path} issued for {args.bank}")
        return 0
    create_dev_pki(args.directory, overwrite=args.overwrite)
    print(f"development PKI in {args.directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
