"""The keyring: key ids, rotation on disk, and what was signed and sealed before keys had ids."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from server.union.keyring import KEY_FILE, MASTER_KEY_ENV, InvalidToken, Keys, UnreadableSealedValue

MASTER = bytes(range(32))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _derive(purpose: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.encode()).derive(MASTER)


def test_what_was_signed_and_sealed_before_key_ids_still_opens() -> None:
    """A union upgraded mid-lookup: values written in the id-less format are the first key's."""
    nonce = bytes(12)
    plain = json.dumps({"name": "张三", "id": "x"}, ensure_ascii=False).encode()
    legacy_sealed = _b64(nonce + AESGCM(_derive("identity-sealing v1")).encrypt(nonce, plain, b"lookup:l1"))
    body = _b64(json.dumps({"k": "audit"}).encode())
    legacy_token = (
        f"v1.{body}.{_b64(hmac.new(_derive('page-token v1'), body.encode(), hashlib.sha256).digest())}"
    )

    rotated = Keys([MASTER, bytes(range(1, 33))])
    assert rotated.unseal(legacy_sealed, context="lookup:l1") == {"name": "张三", "id": "x"}
    assert rotated.verify(Keys.page, legacy_token) == {"k": "audit"}
    with pytest.raises(InvalidToken):
        rotated.verify(Keys.session, legacy_token)  # another purpose's key
    # The person hash is the one the union always had: every stored hash stays valid.
    expected = hmac.new(_derive("person-hash v1"), b"id:x", hashlib.sha256).hexdigest()
    assert rotated.person_hash("x") == expected


def test_values_carry_the_id_of_the_key_that_made_them() -> None:
    old = Keys([MASTER])
    rotated = Keys([MASTER, bytes(range(1, 33))])
    assert rotated.current.id != old.current.id
    assert Keys([MASTER]).current.id == old.current.id  # the id derives from the key itself
    sealed = old.seal({"mobile": "13800000000"}, context="contact:l1")
    token = old.sign(Keys.session, {"sub": "p"})
    assert sealed.startswith(f"{old.current.id}.")
    assert Keys.token_key_id(token) == old.current.id
    assert rotated.unseal(sealed, context="contact:l1") == {"mobile": "13800000000"}
    assert rotated.verify(Keys.session, token) == {"sub": "p"}
    new_token = rotated.sign(Keys.session, {"sub": "p"})
    assert Keys.token_key_id(new_token) == rotated.current.id
    # A union that never had the newer key refuses what it made.
    with pytest.raises(InvalidToken):
        old.verify(Keys.session, new_token)
    with pytest.raises(UnreadableSealedValue):
        old.unseal(rotated.seal({"a": "b"}, context="c"), context="c")


@pytest.mark.parametrize(
    "sealed",
    ["", ".", "abc", "deadbeef.", "!!!!", "é", "a.b.c", "x" * 5000, _b64(bytes(11)), _b64(bytes(40))],
)
def test_every_unreadable_sealed_value_raises_one_exception(sealed: str) -> None:
    keys = Keys([MASTER])
    with pytest.raises(UnreadableSealedValue):
        keys.unseal(sealed, context="session:t")
    with pytest.raises(UnreadableSealedValue):
        keys.unseal(f"{keys.current.id}.{sealed}", context="session:t")


@pytest.mark.parametrize(
    "token", ["", "v1", "v1..", "v2-..", "v2-x.e30.AAAA", "v2.e30.AAAA", "é.é.é", "v1.é.é", "a.b.c.d"]
)
def test_every_bad_token_raises_invalid_token(token: str) -> None:
    with pytest.raises(InvalidToken):
        Keys([MASTER]).verify(Keys.session, token)


def test_rotation_on_disk_keeps_the_older_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MASTER_KEY_ENV, raising=False)
    first = Keys.load(tmp_path)
    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Keys.load(tmp_path).current.id == first.current.id
    rotated = Keys.rotate(tmp_path)
    assert [key.id for key in rotated.versions] == [first.current.id, rotated.current.id]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Keys.load(tmp_path)
    assert [key.id for key in loaded.versions] == [key.id for key in rotated.versions]
    assert loaded.person == first.person
    assert not list(tmp_path.glob("*.new"))


def test_keys_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    older, newer = "11" * 32, "22" * 32
    monkeypatch.setenv(MASTER_KEY_ENV, f"{older},{newer}")
    keys = Keys.load(tmp_path)
    assert [key.id for key in keys.versions] == [
        Keys([bytes.fromhex(older)]).current.id,
        Keys([bytes.fromhex(newer)]).current.id,
    ]
    assert not (tmp_path / KEY_FILE).exists()
    with pytest.raises(RuntimeError, match=MASTER_KEY_ENV):
        Keys.rotate(tmp_path)  # the environment is the operator's to change
    monkeypatch.setenv(MASTER_KEY_ENV, "nothex")
    with pytest.raises(RuntimeError, match=MASTER_KEY_ENV):
        Keys.load(tmp_path)
    monkeypatch.setenv(MASTER_KEY_ENV, "11" * 16)
    with pytest.raises(ValueError, match="32 bytes"):
        Keys.load(tmp_path)
    assert os.environ[MASTER_KEY_ENV] == "11" * 16
