"""Hypothesis strategies for arbitrary and near-valid requests to every RPC of the union and the banks."""

from __future__ import annotations

import string
from datetime import date

from hypothesis import strategies as st

from server.common.checks import resident_id_check_char
from server.population.catalogue import BANKS, REGIONS

BANK_CODES = [bank.code for bank in BANKS]
REGION_CODES = [region.code for region in REGIONS]
_FULLWIDTH = str.maketrans("0123456789", "０１２３４５６７８９")
_ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")

# Characters that tend to break validators, loggers, SQL and terminals.
NASTY = [
    "",
    " ",
    "\x00",
    "\n",
    "\r\n",
    "\t",
    "\u202e",  # right-to-left override
    "\u200b",  # zero-width space
    "\ufeff",  # byte-order mark
    "\u2028",  # line separator
    "😀",
    "👨‍👩‍👧‍👦",
    "e\u0301",  # combining accent
    "'; DROP TABLE reports; --",
    "%s%n%x",
    "../../etc/passwd",
    "${jndi:ldap://x}",
    "{{7*7}}",
    "null",
    "\\",
    '"',
]

any_text = st.text(max_size=80)
long_text = st.text(min_size=60, max_size=400)
ascii_token_chars = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


def mutated(base: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Near-valid: a valid-looking value, changed a little."""

    @st.composite
    def build(draw: st.DrawFn) -> str:
        value = draw(base)
        how = draw(
            st.sampled_from(
                [
                    "same",
                    "newline",
                    "space",
                    "fullwidth",
                    "arabic",
                    "delete",
                    "insert",
                    "truncate",
                    "extend",
                    "nasty",
                    "upper",
                    "lower",
                    "double",
                    "long",
                ]
            )
        )
        if how == "same" or not value:
            return value + (draw(st.sampled_from(NASTY)) if how == "nasty" else "")
        if how == "newline":
            return value + "\n"
        if how == "space":
            return draw(st.sampled_from([" " + value, value + " ", f" {value} "]))
        if how == "fullwidth":
            return value.translate(_FULLWIDTH)
        if how == "arabic":
            return value.translate(_ARABIC_INDIC)
        index = draw(st.integers(0, len(value) - 1))
        if how == "delete":
            return value[:index] + value[index + 1 :]
        if how == "insert":
            # Any character a string field can carry: a lone surrogate cannot be encoded at all.
            return value[:index] + draw(st.characters(codec="utf-8")) + value[index:]
        if how == "truncate":
            return value[:index]
        if how == "extend":
            return value + draw(st.text(min_size=1, max_size=3))
        if how == "nasty":
            return value[:index] + draw(st.sampled_from(NASTY)) + value[index:]
        if how == "upper":
            return value.upper()
        if how == "lower":
            return value.lower()
        if how == "double":
            return value + value
        return value * draw(st.integers(5, 40))

    return build()


def fuzzed(*valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A field value: valid, near-valid, nasty, or arbitrary text."""
    base = st.one_of(*valid)
    return st.one_of(base, mutated(base), st.sampled_from(NASTY), any_text, long_text)


# -- identifiers ------------------------------------------------------------------


@st.composite
def resident_ids(draw: st.DrawFn, valid_date: bool = True) -> str:
    """18-character GB 11643 numbers with a correct check character (real-looking, maybe unregistered)."""
    area = draw(st.sampled_from(["310104", "530102", "440104", "110105", "330106", "500101", "650102"]))
    if valid_date:
        birth = draw(st.dates(date(1920, 1, 1), date(2010, 12, 31))).strftime("%Y%m%d")
    else:
        birth = draw(st.sampled_from(["19991301", "20000230", "19850000", "00000101", "99991231"]))
    first17 = area + birth + f"{draw(st.integers(0, 999)):03d}"
    return first17 + resident_id_check_char(first17)


@st.composite
def wrong_check_ids(draw: st.DrawFn) -> str:
    good = draw(resident_ids())
    wrong = draw(st.sampled_from([c for c in "0123456789Xx" if c != good[-1]]))
    return good[:-1] + wrong


mobiles = st.from_regex(r"1[3-9][0-9]{9}", fullmatch=True)
otp_codes = st.from_regex(r"[0-9]{6}", fullmatch=True)
request_ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
resource_ids = st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True)
hex_ids = st.from_regex(r"[0-9a-f]{24,32}", fullmatch=True)
chinese_names = st.text(
    alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FA5), min_size=1, max_size=4
)
names = fuzzed(chinese_names, st.sampled_from(["张伟", "李娜", "王芳", "陈静", "A" * 64, "A" * 65]))
id_numbers = fuzzed(
    resident_ids(),
    resident_ids(valid_date=False),
    wrong_check_ids(),
    st.sampled_from(["310104198503129915", "530102199007219922", "440104197811059941"]),
)
mobile_numbers = fuzzed(mobiles, st.sampled_from(["13917285036", "15887123490", "12345678901"]))
bank_codes = fuzzed(st.sampled_from(BANK_CODES), st.from_regex(r"[A-Z]{2,16}", fullmatch=True))
region_codes = fuzzed(st.sampled_from(REGION_CODES), st.from_regex(r"[0-9]{6}", fullmatch=True))
addresses = fuzzed(
    st.from_regex(r"127\.0\.0\.1:[0-9]{1,5}", fullmatch=True),
    st.sampled_from(["localhost:1", "[::1]:50061", "bank.example:443", "127.0.0.1:0", "a:99999"]),
)
page_sizes = st.one_of(
    st.sampled_from([0, 1, 2, 10, 99, 100, 101, -1, 2**31 - 1, -(2**31)]),
    st.integers(-(2**31), 2**31 - 1),
)
int_page_tokens = st.one_of(
    st.integers(-5, 200).map(str),
    st.sampled_from(["", "0", "-0", "+1", " 3 ", "1_0", "١", "0x10", "1e3", "9" * 5000, "NaN"]),
)
forged_tokens = st.one_of(
    st.builds(
        lambda body, sig: f"v1.{body}.{sig}",
        st.text(alphabet=string.ascii_letters + string.digits + "-_", max_size=120),
        st.text(alphabet=string.ascii_letters + string.digits + "-_", max_size=60),
    ),
    st.sampled_from(["v1..", "v1.e30.AAAA", "v2.a.b", "v1.a.b.c", ".", "v1"]),
    st.text(ascii_token_chars, max_size=200),
)
page_tokens = fuzzed(int_page_tokens, forged_tokens)
# Mostly valid page sizes (0 means the default) so that list calls get past validation often enough.
list_page_sizes = st.one_of(st.integers(0, 120), st.integers(0, 3), page_sizes)


def real_page_tokens(real: list[str]) -> st.SearchStrategy[str]:
    """Empty (the first page), a real token (maybe of another list or caller), or a forged one."""
    base = st.sampled_from(real)
    return st.one_of(st.just(""), st.just(""), base, base, fuzzed(base, int_page_tokens, forged_tokens))


def resource_names(collections: list[str], real: list[str]) -> st.SearchStrategy[str]:
    """'lookups/…'/'reports/…' names: real ones, random well-formed ones, and broken ones."""
    well_formed = st.builds(lambda c, i: f"{c}/{i}", st.sampled_from(collections), resource_ids)
    broken = st.sampled_from(
        [
            "lookups/",
            "reports/",
            "lookups/../x",
            "reports/../lookups/x",
            "lookups//x",
            "lookups/x/y",
            "/lookups/x",
            "lookups/%2e%2e",
            "LOOKUPS/x",
            "lookups",
            "reports/" + "r" * 41,
            "lookups/*",
        ]
    )
    base = st.one_of(st.sampled_from(real), well_formed) if real else well_formed
    return st.one_of(base, mutated(base), broken, st.sampled_from(NASTY), any_text)


# -- card actions and the audit trail --------------------------------------------------------

# Built from bytes rather than st.from_regex: the fuzz draws tens of thousands of them.
union_card_refs = st.binary(min_size=12, max_size=12).map(lambda b: "c" + b.hex())  # a report's card_ref
bank_card_refs = st.binary(min_size=12, max_size=12).map(lambda b: "cr_" + b.hex())  # CardRecord.card_ref
actor_hashes = st.binary(min_size=32, max_size=32).map(bytes.hex)


def card_refs(real: list[str], forged: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A card_ref: a real one (maybe of someone else's report), a forged well-formed one, or a broken one."""
    base = st.one_of(st.sampled_from(real), forged) if real else forged
    return st.one_of(base, base, mutated(base), st.sampled_from(NASTY), any_text, st.just("c" * 129))


def actor_filters(real: list[str]) -> st.SearchStrategy[str]:
    """ListAuditEvents.actor: empty, a real actor hash, "admin", a random hash, or a near-miss."""
    base = st.one_of(st.sampled_from([*real, "admin"]), actor_hashes)
    near = st.one_of(
        mutated(base),
        base.map(lambda h: h[:-1]),
        base.map(lambda h: h + "0"),
        base.map(str.upper),
        base.map(lambda h: h[:32]),
        st.sampled_from(["*", "%", "ADMIN", "admin\n", "admin ", "0" * 64 + "\n", "g" * 64]),
    )
    return st.one_of(st.just(""), st.just(""), base, base, near, st.sampled_from(NASTY), any_text)


# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
TIMESTAMP_MIN_SECONDS = -62_135_596_800
TIMESTAMP_MAX_SECONDS = 253_402_300_799
_RECENT = 1_700_000_000  # 2023-11; the fuzz run's events are "now" (2025 or later)
timestamp_seconds = st.one_of(
    st.sampled_from(
        [TIMESTAMP_MIN_SECONDS, TIMESTAMP_MAX_SECONDS, 0, -1, 1, 2**31 - 1, 2**31, -(2**31), 4_102_444_800]
    ),
    st.integers(TIMESTAMP_MIN_SECONDS, TIMESTAMP_MAX_SECONDS),
    st.integers(_RECENT, _RECENT + 10 * 365 * 86_400),  # around now
)
timestamp_nanos = st.one_of(
    st.sampled_from([0, 1, 999, 1_000, 999_999, 1_000_000, 999_999_999]), st.integers(0, 999_999_999)
)
# Valid Timestamps with extreme values (seconds, nanos); None for "unset".
timestamps: st.SearchStrategy[tuple[int, int] | None] = st.one_of(
    st.none(), st.tuples(timestamp_seconds, timestamp_nanos)
)
