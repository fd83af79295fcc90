"""Real-name verification and session credentials.

The registry is checked through keyed hashes; the name and ID number the
person typed are sealed (AES-GCM) into the pending verification and, once the
one-time code is right, into the session credential itself. So between
verification and lookup the union's database holds nothing readable, and the
ID number reaches a lookup row only as ciphertext that is erased when the
lookup is final.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from server.common import errors, normalize
from server.common.checks import resident_id_region
from server.union.clock import Clock
from server.union.domain import model, validation
from server.union.domain.audit import AuditTrail, Outcome
from server.union.domain.ports import IdentityServiceStore, SessionRegistry
from server.union.domain.quotas import take_quota
from server.union.keyring import InvalidToken, Keys, UnreadableSealedValue
from server.union.sms import SmsSender


@dataclass(frozen=True)
class IdentityPolicy:
    code_ttl: timedelta = timedelta(minutes=5)
    max_code_attempts: int = 5
    # One-time codes sent to one phone in a sliding window.
    max_starts_per_window: int = 5
    # StartVerification answers "does not match" this often per identity in the window; after
    # that, mismatches get an answer that looks like a match (see IdentityService._start).
    max_mismatches_per_window: int = 5
    start_window: timedelta = timedelta(hours=1)
    session_ttl: timedelta = timedelta(minutes=30)


@dataclass(frozen=True)
class StartedVerification:
    verification_id: str
    masked_mobile_number: str
    code_expire_time: datetime


@dataclass(frozen=True)
class Session:
    token: str
    expire_time: datetime
    region_code: str


@dataclass(frozen=True)
class Caller:
    """Who is calling, from a verified session credential."""

    person_hash: str
    region_code: str
    token_id: str
    sealed_identity: str

    def identity(self, keys: Keys) -> tuple[str, str]:
        """(name, resident ID number), unsealed only when a lookup needs them."""
        opened = self._open(keys)
        return opened["name"], opened["id"]

    def contact(self, keys: Keys) -> tuple[str, str, str | None]:
        """(name, resident ID number, mobile number), in one unsealing; the mobile number is where
        the report-ready SMS goes (sessions from before it was sealed have none)."""
        opened = self._open(keys)
        return opened["name"], opened["id"], opened.get("mobile")

    def _open(self, keys: Keys) -> dict[str, str]:
        """The sealed identity; a signed session whose identity cannot be opened (sealed under a key
        this union no longer holds, or not by this union at all) is no credential."""
        try:
            opened = keys.unseal(self.sealed_identity, context=f"session:{self.token_id}")
        except UnreadableSealedValue as error:
            raise errors.Unauthenticated("invalid session credential", reason="INVALID_CREDENTIAL") from error
        if "name" not in opened or "id" not in opened:
            raise errors.Unauthenticated("invalid session credential", reason="INVALID_CREDENTIAL")
        return opened


def mask_mobile(mobile: str) -> str:
    return mobile[:3] + "****" + mobile[-4:]


class IdentityService:
    def __init__(
        self,
        store: IdentityServiceStore,
        keys: Keys,
        sms: SmsSender,
        clock: Clock,
        policy: IdentityPolicy,
        audit: AuditTrail,
        sessions: SessionRegistry,
    ) -> None:
        self._audit = audit
        self._sessions = sessions
        self._store = store
        self._keys = keys
        self._sms = sms
        self._clock = clock
        self.policy = policy

    def _code_hash(self, verification_id: str, code: str) -> str:
        return self._keys.attribute_hash("otp", f"{verification_id}:{code}")

    async def start_verification(
        self, name: str, resident_id_number: str, mobile_number: str
    ) -> StartedVerification:
        # Normalised once here (server.common.normalize): everything below sees the canonical form.
        typed = normalize.identity(name, resident_id_number, mobile_number)
        validation.require([errors.FieldViolation(field, problem) for field, problem in typed.problems])
        name, resident_id_number, mobile_number = typed.name, typed.resident_id_number, typed.mobile_number
        person_hash = self._keys.person_hash(resident_id_number)
        async with self._audit.action(person_hash, "verification.start") as audited:
            return await self._start(person_hash, name, resident_id_number, mobile_number, audited)

    async def _start(
        self, person_hash: str, name: str, resident_id_number: str, mobile_number: str, audited: Outcome
    ) -> StartedVerification:
        """Lock the verification, never the person: what a stranger who knows only someone's ID
        number can do must not stop that person from verifying. So the limits are keyed apart:
        codes sent are limited per receiving phone (only the real triple sends one), and answers
        to triples that do not match are limited per identity; past that limit a mismatch is
        answered like a match, with a verification that can never complete (no SMS; a code nobody
        was sent, and nothing sealed about anyone), which refuses wrong codes exactly as a real one
        does, so the limit cannot be probed through CompleteVerification either."""
        now = self._clock.now()
        policy = self.policy
        identity = await self._store.find_identity(person_hash)
        mobile_hash = self._keys.attribute_hash("mobile", mobile_number)
        if (
            identity is None
            or not hmac.compare_digest(identity.name_hash, self._keys.attribute_hash("name", name))
            or not hmac.compare_digest(identity.mobile_hash, mobile_hash)
        ):
            if await self._take_quota("mismatch", person_hash, policy.max_mismatches_per_window) is None:
                raise errors.FailedPrecondition(
                    "the name, ID number and mobile number do not match a registered identity",
                    reason="IDENTITY_MISMATCH",
                )
            # The caller cannot tell this answer from a real start; the trail, which only the person
            # and operators read, says what it was.
            audited.value = "refused:IDENTITY_MISMATCH_LIMIT"
            decoy_id = "v" + secrets.token_hex(16)
            never_sent = f"{secrets.randbelow(1_000_000):06d}"
            await self._store.add_verification(
                model.NewVerification(
                    id=decoy_id,
                    person_hash=person_hash,
                    region_code=identity.region_code if identity else resident_id_region(resident_id_number),
                    sealed_identity=self._keys.seal({}, context=f"verification:{decoy_id}"),
                    code_hash=self._code_hash(decoy_id, never_sent),
                    create_time=now,
                    expire_time=now + policy.code_ttl,
                )
            )
            return StartedVerification(decoy_id, mask_mobile(mobile_number), now + policy.code_ttl)

        region = await self._store.get_region(identity.region_code)
        if region is None or not region.open:
            # Before any SMS: a code for a lookup that cannot run would only be noise.
            raise errors.FailedPrecondition(
                "the service is not open in your region yet",
                reason="REGION_NOT_OPEN",
                metadata={"region_code": identity.region_code},
            )
        retry_after = await self._take_quota("sms", mobile_hash, policy.max_starts_per_window)
        if retry_after is not None:
            raise errors.ResourceExhausted(
                "too many codes sent to this mobile number; try again later",
                reason="VERIFICATION_RATE_LIMITED",
                retry_after=retry_after,
            )

        verification_id = "v" + secrets.token_hex(16)
        code = f"{secrets.randbelow(1_000_000):06d}"
        expire = now + policy.code_ttl
        await self._store.add_verification(
            model.NewVerification(
                id=verification_id,
                person_hash=person_hash,
                region_code=identity.region_code,
                sealed_identity=self._keys.seal(
                    {"name": name, "id": resident_id_number, "mobile": mobile_number},
                    context=f"verification:{verification_id}",
                ),
                code_hash=self._code_hash(verification_id, code),
                create_time=now,
                expire_time=expire,
            )
        )
        minutes = int(policy.code_ttl.total_seconds() // 60)
        self._sms.send(mobile_number, f"【一键查卡】验证码 {code}，{minutes}分钟内有效。请勿告诉他人。")
        return StartedVerification(verification_id, mask_mobile(mobile_number), expire)

    async def _take_quota(self, kind: str, subject: str, limit: int) -> timedelta | None:
        return await take_quota(
            self._store, self._keys, kind, subject, limit, self.policy.start_window, self._clock.now()
        )

    async def complete_verification(self, verification_id: str, code: str) -> Session:
        violations = []
        if not verification_id.startswith("v") or not validation.RESOURCE_ID.fullmatch(verification_id):
            violations.append(errors.FieldViolation("verification_id", "not a verification id"))
        if not validation.CODE.fullmatch(code):
            violations.append(errors.FieldViolation("code", "must be 6 digits"))
        validation.require(violations)

        row = await self._store.get_verification(verification_id)
        async with self._audit.action(row.person_hash if row else "unknown", "verification.complete"):
            return await self._complete(row, verification_id, code)

    async def _complete(self, row: model.Verification | None, verification_id: str, code: str) -> Session:
        now = self._clock.now()
        if row is None or row.completed or row.expire_time <= now:
            raise errors.NotFound("no such verification, or it expired or was already used")
        if row.failed_attempts >= self.policy.max_code_attempts or row.sealed_identity is None:
            raise _locked()
        if not hmac.compare_digest(row.code_hash, self._code_hash(verification_id, code)):
            left = await self._store.fail_verification_attempt(verification_id, self.policy.max_code_attempts)
            if left == 0:
                raise _locked()
            raise errors.Unauthenticated(
                "wrong code", reason="WRONG_CODE", metadata={"attempts_left": str(left)}
            )
        sealed = await self._store.complete_verification(verification_id, now)
        if sealed is None:
            raise errors.NotFound("no such verification, or it expired or was already used")
        try:
            pii = self._keys.unseal(sealed, context=f"verification:{verification_id}")
        except UnreadableSealedValue as error:
            # Sealed under a key this union no longer holds: as good as expired (the row is used now).
            raise errors.NotFound("no such verification, or it expired or was already used") from error
        if not pii:
            # A decoy's code was never sent: guessed all the same, it still verifies nobody.
            raise errors.NotFound("no such verification, or it expired or was already used")
        token_id = secrets.token_hex(12)
        expire = now + self.policy.session_ttl
        # The new session replaces the person's older one: one live session per person.
        await self._sessions.start_session(row.person_hash, token_id, expire)
        token = self._keys.sign(
            self._keys.session,
            {
                "sub": row.person_hash,
                "rgn": row.region_code,
                "jti": token_id,
                "exp": int(expire.timestamp()),
                "pii": self._keys.seal(pii, context=f"session:{token_id}"),
            },
        )
        return Session(token, expire, row.region_code)

    async def authenticate(self, authorization: str | None) -> Caller:
        """Caller from `authorization: Bearer <token>` metadata, or UNAUTHENTICATED: the token must
        be signed by this union, unexpired, and still the person's live session."""
        if not authorization or not authorization.startswith("Bearer "):
            raise errors.Unauthenticated("missing bearer session credential", reason="MISSING_CREDENTIAL")
        try:
            claims = self._keys.verify(self._keys.session, authorization[len("Bearer ") :].strip())
            expire = int(claims["exp"])
            caller = Caller(str(claims["sub"]), str(claims["rgn"]), str(claims["jti"]), str(claims["pii"]))
        except (InvalidToken, KeyError, TypeError, ValueError, OverflowError) as error:
            raise errors.Unauthenticated("invalid session credential", reason="INVALID_CREDENTIAL") from error
        if expire <= self._clock.now().timestamp():
            raise errors.Unauthenticated("session credential expired", reason="EXPIRED_CREDENTIAL")
        if await self._sessions.live_session(caller.person_hash) != caller.token_id:
            raise errors.Unauthenticated(
                "session credential was revoked (signed out, or replaced by a newer verification)",
                reason="SESSION_REVOKED",
            )
        return caller

    async def sign_out(self, authorization: str | None) -> None:
        """Revoke the session the call carries."""
        caller = await self.authenticate(authorization)
        async with self._audit.action(caller.person_hash, "session.sign_out"):
            if not await self._sessions.end_session(caller.person_hash, caller.token_id):
                # Replaced or signed out between the check and now.
                raise errors.Unauthenticated("session credential was revoked", reason="SESSION_REVOKED")

    async def purge_expired_sessions(self, now: datetime) -> int:
        """Retention: a session's revocation record goes once the session would have expired."""
        return await self._sessions.purge_expired_sessions(now)


def _locked() -> errors.ResourceExhausted:
    # The verification is locked, not the person: a new one may start at once (StartVerification
    # has limits of its own), so there is no RetryInfo: retrying this call can never succeed.
    return errors.ResourceExhausted(
        "too many wrong codes; this verification is locked, start a new one", reason="VERIFICATION_LOCKED"
    )
