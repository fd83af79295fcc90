"""Verification input is normalised in one place (server.common.normalize): the forms people type
are accepted over gRPC, and a refusal names the check that failed, never the value."""

from __future__ import annotations

import grpc
import pytest

from clients.client import CardLookupClient, CardLookupError
from server.common import normalize
from server.population.catalogue import PILOT_REGIONS
from server.population.generator import Person, people
from server.union.sms import read_one_time_code
from server.union.union_server import UnionServer
from tests.conftest import SEED, SIZE, ZHANG

FULL_WIDTH = str.maketrans("0123456789Xx+-", "０１２３４５６７８９Ｘｘ＋－")


def test_names_lose_surrounding_whitespace_and_take_nfkc_form() -> None:
    assert normalize.name("\u3000 张伟\t\n") == "张伟"
    assert normalize.name("Ｌｉ Ｎａ") == "Li Na"  # full-width letters; the inner space is kept
    assert normalize.name_problem(normalize.name("   ")) == "must not be empty"
    assert normalize.name_problem("张\x00伟") == "must not contain control characters"
    assert normalize.name_problem("张" * 65) == "at most 64 characters"


def test_resident_ids_take_a_lowercase_x_and_full_width_digits() -> None:
    assert normalize.resident_id(" 11010519491231002x ") == "11010519491231002X"
    assert normalize.resident_id(ZHANG.resident_id_number.translate(FULL_WIDTH)) == ZHANG.resident_id_number
    assert normalize.resident_id("１１０１０５１９４９１２３１００２ｘ") == "11010519491231002X"
    assert normalize.resident_id_problem("11010519491231002X") is None


@pytest.mark.parametrize(
    ("typed", "check"),
    [
        ("31010419850312991", "must be 18 characters"),
        ("3101041985031299X5", "must be 17 digits and a last character that is a digit or X"),
        ("310104198502302995", "characters 7-14 must be a real birth date (YYYYMMDD)"),
        ("310104198503129914", "the check character (the last one) does not match the first 17 digits"),
    ],
)
def test_resident_id_refusals_name_the_check(typed: str, check: str) -> None:
    assert normalize.resident_id_problem(normalize.resident_id(typed)) == check


@pytest.mark.parametrize(
    "typed",
    [
        "13917285036",
        "+86 139 1728 5036",
        "0086-139-1728-5036",
        "＋８６ １３９－１７２８－５０３６",
        " 139 1728 5036\n",
    ],
)
def test_mobile_numbers_lose_spaces_dashes_and_the_country_code(typed: str) -> None:
    assert normalize.mobile_number(typed) == "13917285036"
    assert normalize.mobile_number_problem(normalize.mobile_number(typed)) is None


def test_mobile_refusals_name_the_check() -> None:
    eleven = "must be 11 digits (spaces, dashes and a +86 or 0086 prefix are allowed)"
    assert normalize.mobile_number_problem(normalize.mobile_number("1391728503")) == eleven
    assert normalize.mobile_number_problem(normalize.mobile_number("139.1728.5036")) == eleven
    assert normalize.mobile_number_problem(normalize.mobile_number("+1 139 1728 5036")) == eleven
    assert (
        normalize.mobile_number_problem("12917285036")
        == "must be a mainland mobile number: 1, then a digit from 3 to 9"
    )


def test_identity_lists_every_problem_in_field_order() -> None:
    checked = normalize.identity(" ", "31010419850312991", "139")
    assert [field for field, _ in checked.problems] == ["name", "resident_id_number", "mobile_number"]
    assert normalize.identity(f" {ZHANG.name} ", ZHANG.resident_id_number, ZHANG.mobile_number).problems == ()


def _person_with_x_check_character() -> Person:
    open_regions = {region.code for region in PILOT_REGIONS}
    return next(
        person
        for person in people(SEED, SIZE)
        if person.resident_id_number.endswith("X") and person.region_code in open_regions
    )


async def _verify(union: UnionServer, name: str, resident_id: str, mobile: str, registered: str) -> None:
    async with CardLookupClient(union.address) as client:
        started = await client.start_verification(name, resident_id, mobile)
        code = read_one_time_code(union.config.sms_sink_path, registered)
        assert code is not None  # the code went to the registered number, normalised
        session = await client.complete_verification(started.verification_id, code)
        assert session.session_token


async def test_union_accepts_the_forms_people_type(union: UnionServer) -> None:
    await _verify(
        union,
        f"\u3000{ZHANG.name} ",
        ZHANG.resident_id_number.translate(FULL_WIDTH),
        "+86 " + ZHANG.mobile_number[:3] + "-" + ZHANG.mobile_number[3:7] + "-" + ZHANG.mobile_number[7:],
        ZHANG.mobile_number,
    )
    person = _person_with_x_check_character()
    await _verify(
        union,
        person.name,
        person.resident_id_number.lower(),
        "0086" + person.mobile_number.translate(FULL_WIDTH),
        person.mobile_number,
    )


async def test_union_refusals_name_the_check_and_never_the_value(union: UnionServer) -> None:
    wrong_check = ZHANG.resident_id_number[:17] + str((int(ZHANG.resident_id_number[17]) + 1) % 10)
    async with CardLookupClient(union.address) as client:
        with pytest.raises(CardLookupError) as refused:
            await client.start_verification(ZHANG.name, wrong_check, "+1 139 1728 5036")
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.field_violations == [
        ("resident_id_number", "the check character (the last one) does not match the first 17 digits"),
        ("mobile_number", "must be 11 digits (spaces, dashes and a +86 or 0086 prefix are allowed)"),
    ]
    assert wrong_check not in refused.value.message
    assert "1728" not in refused.value.message
