"""Keys and the three things done with them: hashing people, sealing PII, signing tokens.

All keys derive (HKDF-SHA256) from one master secret that comes from the
environment (`CARDLOOKUP_MASTER_KEY`, 64 hex characters) or, for local
development only, from a file the server creates in its data directory with
mode 0600. Nothing secret is ever in the repository.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASTER_KEY_ENV = "CARDLOOKUP_MASTER_KEY"


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class InvalidToken(Exception):
    """A token that is malformed, forged, tampered with, or expired."""


@dataclass(frozen=True)
class Keys:
    person: bytes
    sealing: bytes
    session: bytes
    page: bytes

    @classmethod
    def from_master(cls, master: bytes) -> Keys:
        def derive(purpose: str) -> bytes:
            return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.encode()).derive(master)

        return cls(
            person=derive("person-hash v1"),
            sealing=derive("identity-sealing v1"),
            session=derive("session-token v1"),
            page=derive("page-token v1"),
        )

    @classmethod
    def load(cls, data_dir: Path | None) -> Keys:
        """From the environment, else a per-installation file in the data directory."""
        from_env = os.environ.get(MASTER_KEY_ENV)
        if from_env:
            return cls.from_master(bytes.fromhex(from_env))
        if data_dir is None:
            raise RuntimeError(f"set {MASTER_KEY_ENV} or give a data directory")
        path = data_dir / "union-master.key"
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
        return cls.from_master(bytes.fromhex(path.read_text().strip()))

    # -- people -------------------------------------------------------------

    def person_hash(self, resident_id_number: str) -> str:
        """Stable pseudonymous key of a person: the union never stores the ID number itself."""
        return hmac.new(self.person, b"id:" + resident_id_number.encode(), hashlib.sha256).hexdigest()

    def attribute_hash(self, kind: str, value: str) -> str:
        return hmac.new(self.person, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()

    # -- sealed PII ---------------------------------------------------------

    def seal(self, payload: dict[str, str], context: str) -> str:
        """AES-GCM encrypt `payload`, bound to `context` (a row id) so it cannot be moved."""
        nonce = secrets.token_bytes(12)
        plain = json.dumps(payload, ensure_ascii=False).encode()
        return _b64e(nonce + AESGCM(self.sealing).encrypt(nonce, plain, context.encode()))

    def unseal(self, sealed: str, context: str) -> dict[str, str]:
        raw = _b64d(sealed)
        plain = AESGCM(self.sealing).decrypt(raw[:12], raw[12:], context.encode())
        value: dict[str, str] = json.loads(plain)
        return value

    # -- signed tokens ------------------------------------------------------

    def sign(self, key: bytes, claims: dict[str, Any]) -> str:
        body = _b64e(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        signature = _b64e(hmac.new(key, body.encode(), hashlib.sha256).digest())
        return f"v1.{body}.{signature}"

    def verify(self, key: bytes, token: str) -> dict[str, Any]:
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != "v1":
            raise InvalidToken("malformed token")
        expected = _b64e(hmac.new(key, parts[1].encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(expected, parts[2]):
            raise InvalidToken("bad signature")
        try:
            claims = json.loads(_b64d(parts[1]))
        except (ValueError, UnicodeDecodeError) as error:
            raise InvalidToken("malformed token") from error
        if not isinstance(claims, dict):
            raise InvalidToken("malformed token")
        return claims
