"""The union's keyring: keys with ids, and the things done with them — hashing people, sealing PII,
signing tokens, hashing admin credentials.

A key is a 32-byte master secret; each purpose derives its own subkey from it (HKDF-SHA256), and
its id is derived from it too, so the same secret has the same id wherever it is loaded. The
keyring holds every key in the order they were made: the newest is current and signs and seals
everything new; the older ones still open what they signed and sealed, so rotating a key leaves
every live session, page token and sealed lookup valid until it expires. Tokens and sealed values
carry the id of their key.

The keys come from the environment (`CARDLOOKUP_MASTER_KEY`: 64 hex characters per key, oldest
first, comma-separated) or, else, from a file in the data directory (`union-master.key`, mode
0600, one key per line, oldest first), which `cardlookup-union rotate-key` extends. Nothing secret
is ever in the repository.

The first key is also the person-hash key: a person's keyed hash must stay the same for as long as
anything about them is kept (lookups, reports, the audit trail), so it does not rotate with the
others.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASTER_KEY_ENV = "CARDLOOKUP_MASTER_KEY"
KEY_FILE = "union-master.key"
# Tokens before key ids: "v1.<claims>.<signature>", signed with the first key.
LEGACY_SIGNED_FORMAT = "v1"
SIGNED_FORMAT = "v2"


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _derive(master: bytes, purpose: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.encode()).derive(master)


class InvalidToken(Exception):
    """A token that is malformed, forged, tampered with, signed with an unknown key, or expired."""


class UnreadableSealedValue(Exception):
    """A sealed value that is malformed, tampered with, bound to another context, or sealed under
    a key this union does not hold."""


@dataclass(frozen=True)
class Key:
    """One version of the keys: every subkey derives from one master secret."""

    id: str
    sealing: bytes
    session: bytes
    page: bytes
    admin: bytes

    @classmethod
    def from_master(cls, master: bytes) -> Key:
        if len(master) != 32:
            raise ValueError("a master key is 32 bytes (64 hex characters)")
        return cls(
            id=hmac.new(master, b"key-id", hashlib.sha256).hexdigest()[:8],
            sealing=_derive(master, "identity-sealing v1"),
            session=_derive(master, "session-token v1"),
            page=_derive(master, "page-token v1"),
            admin=_derive(master, "admin-credential v1"),
        )

    def signing(self, purpose: str) -> bytes:
        if purpose == Keys.session:
            return self.session
        if purpose == Keys.page:
            return self.page
        raise ValueError(f"no signing key for {purpose!r}")


def _parse_masters(text: str, source: str) -> list[bytes]:
    masters = []
    for part in text.replace(",", "\n").split():
        try:
            masters.append(bytes.fromhex(part))
        except ValueError as error:
            raise RuntimeError(f"{source}: a key is not hex") from error
    if not masters:
        raise RuntimeError(f"{source}: no key")
    return masters


class Keys:
    """The keyring. `session` and `page` name the signing purposes for `sign` and `verify`."""

    session = "session"
    page = "page"

    def __init__(self, masters: Sequence[bytes]) -> None:
        if not masters:
            raise ValueError("a keyring needs at least one key")
        self.versions = [Key.from_master(master) for master in masters]
        self._by_id = {key.id: key for key in self.versions}
        self.current = self.versions[-1]
        self._first = self.versions[0]
        self.person = _derive(masters[0], "person-hash v1")

    @classmethod
    def from_master(cls, master: bytes) -> Keys:
        return cls([master])

    @classmethod
    def load(cls, data_dir: Path | None) -> Keys:
        """From the environment, else a per-installation file in the data directory."""
        from_env = os.environ.get(MASTER_KEY_ENV)
        if from_env:
            return cls(_parse_masters(from_env, MASTER_KEY_ENV))
        if data_dir is None:
            raise RuntimeError(f"set {MASTER_KEY_ENV} or give a data directory")
        path = data_dir / KEY_FILE
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another process made it first; read theirs
            else:
                with os.fdopen(fd, "w") as handle:
                    handle.write(secrets.token_hex(32) + "\n")
        return cls(_parse_masters(path.read_text(), str(path)))

    @classmethod
    def rotate(cls, data_dir: Path) -> Keys:
        """Add a new key to the data directory's key file and make it current; the older keys
        stay, so what they signed and sealed stays valid until it expires. Servers read the file
        when they start."""
        if os.environ.get(MASTER_KEY_ENV):
            raise RuntimeError(f"the keys come from {MASTER_KEY_ENV}: append the new key there")
        path = data_dir / KEY_FILE
        existing = path.read_text() if path.exists() else ""
        masters = _parse_masters(existing, str(path)) if existing.strip() else []
        masters.append(secrets.token_bytes(32))
        data_dir.mkdir(parents=True, exist_ok=True)
        staged = path.with_suffix(".new")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("".join(master.hex() + "\n" for master in masters))
        os.replace(staged, path)
        return cls(masters)

    def key(self, key_id: str) -> Key | None:
        return self._by_id.get(key_id)

    # -- people -------------------------------------------------------------

    def person_hash(self, resident_id_number: str) -> str:
        """Stable pseudonymous key of a person: the union never stores the ID number itself."""
        return hmac.new(self.person, b"id:" + resident_id_number.encode(), hashlib.sha256).hexdigest()

    def attribute_hash(self, kind: str, value: str) -> str:
        return hmac.new(self.person, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()

    # -- admin credentials --------------------------------------------------

    def credential_hash(self, token: str, key: Key | None = None) -> tuple[str, str]:
        """(key id, keyed hash) of an admin token under `key` (default: the current key)."""
        key = key or self.current
        return key.id, hmac.new(key.admin, b"admin:" + token.encode(), hashlib.sha256).hexdigest()

    def credential_hashes(self, token: str) -> dict[str, str]:
        """The token's hash under every key, to find a credential hashed under any of them."""
        return dict(self.credential_hash(token, key) for key in self.versions)

    # -- sealed PII ---------------------------------------------------------

    def seal(self, payload: dict[str, str], context: str) -> str:
        """AES-GCM encrypt `payload` under the current key, bound to `context` (a row id) so it
        cannot be moved: "<key id>.<nonce + ciphertext>"."""
        nonce = secrets.token_bytes(12)
        plain = json.dumps(payload, ensure_ascii=False).encode()
        sealed = _b64e(nonce + AESGCM(self.current.sealing).encrypt(nonce, plain, context.encode()))
        return f"{self.current.id}.{sealed}"

    def unseal(self, sealed: str, context: str) -> dict[str, str]:
        """The payload, or UnreadableSealedValue; values sealed before key ids used the first key."""
        key_id, dot, body = sealed.rpartition(".")
        key = self.key(key_id) if dot else self._first
        if key is None:
            raise UnreadableSealedValue("sealed under a key this union does not hold")
        try:
            raw = _b64d(body)
            plain = AESGCM(key.sealing).decrypt(raw[:12], raw[12:], context.encode())
            value = json.loads(plain)
        except (binascii.Error, ValueError, InvalidTag) as error:
            raise UnreadableSealedValue("malformed or tampered with") from error
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise UnreadableSealedValue("not a sealed record")
        return value

    # -- signed tokens ------------------------------------------------------

    def sign(self, purpose: str, claims: dict[str, Any]) -> str:
        """ "v2-<key id>.<claims>.<signature>", signed with the current key's subkey for `purpose`."""
        key = self.current
        body = _b64e(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        signature = _b64e(hmac.new(key.signing(purpose), body.encode(), hashlib.sha256).digest())
        return f"{SIGNED_FORMAT}-{key.id}.{body}.{signature}"

    def verify(self, purpose: str, token: str) -> dict[str, Any]:
        parts = token.split(".")
        if len(parts) != 3:
            raise InvalidToken("malformed token")
        version, _, key_id = parts[0].partition("-")
        if parts[0] == LEGACY_SIGNED_FORMAT:
            key: Key | None = self._first
        elif version == SIGNED_FORMAT:
            key = self.key(key_id)
        else:
            raise InvalidToken("malformed token")
        if key is None:
            raise InvalidToken("signed with a key this union does not hold")
        expected = _b64e(hmac.new(key.signing(purpose), parts[1].encode(), hashlib.sha256).digest())
        # As bytes: compare_digest refuses str with non-ASCII characters (TypeError).
        if not hmac.compare_digest(expected.encode(), parts[2].encode()):
            raise InvalidToken("bad signature")
        try:
            claims = json.loads(_b64d(parts[1]))
        except (binascii.Error, ValueError, UnicodeDecodeError) as error:
            raise InvalidToken("malformed token") from error
        if not isinstance(claims, dict):
            raise InvalidToken("malformed token")
        return claims

    @staticmethod
    def token_key_id(token: str) -> str:
        """The id of the key a token says it was signed with ("" for a token without one)."""
        version, _, key_id = token.split(".", 1)[0].partition("-")
        return key_id if version == SIGNED_FORMAT else ""
