"""The person's web page in a real browser: Debian's chromium, headless, driven by Playwright.

One walk through the whole page against a real union (Connect on its HTTP port) and real banks:
verify (the mobile number typed as people write it, a wrong code first, then the one from the
development SMS outbox), watch the banks answer (one is down and ends up marked), read the report
(when each bank can be asked again), close a card, flag another, ask the bank that did not answer
again (the new report names the banks it skipped and why), read "my activity" in both languages,
delete the report, sign out (the session the page held is revoked, not just forgotten). Along the
way nothing in the DOM, in any network answer or in web storage may hold a full card or resident ID
number, and the page must run under the union's Content-Security-Policy without a violation.
A second, shorter walk checks that the page states the union's configured retention and re-query
cooldown, not numbers of its own.

Screenshots go to the test's tmp dir, and also to $CARDLOOKUP_SCREENSHOT_DIR when set
(`CARDLOOKUP_SCREENSHOT_DIR=docs` refreshes docs/web-report.png).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from playwright.async_api import Page, Request, Response, async_playwright, expect

from server.bank.bank_server import RunningBank
from server.bank.faults import FaultSettings
from server.population.generator import DEMO_PEOPLE
from server.union.api.web import DEFAULT_WEB_ROOT
from server.union.domain.retention import RetentionPolicy
from server.union.sms import read_one_time_code
from server.union.union_server import UnionServer
from tests.conftest import UnionFactory

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PERSON = DEMO_PEOPLE[0]  # 张伟, Shanghai: ICBC 1+1, CMB 2 debit, CCB 1 credit
SECRETS = [PERSON.person.resident_id_number, *(card.number for card in PERSON.cards)]
MASKED = re.compile(r"^\d{4}( \*{1,4})+ \d{4}$")
DOWN_BANK = "PAB"  # holds no card of 张伟's; down for the whole lookup, so reported as not answering
TIMEOUT_MS = 30_000
SHANGHAI = ZoneInfo("Asia/Shanghai")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make chromium)"),
]


def _no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a full card or ID number in {where}"


def _formatted_mobile(mobile: str) -> str:
    """A mobile number as people write it: "+86 139-1728-5036"; the union normalises it."""
    return f"+86 {mobile[:3]}-{mobile[3:7]}-{mobile[7:]}"


def _answer_of(request: urllib.request.Request) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON answer of a Connect call. It takes a built Request (whose repr
    shows no header), so a failure's traceback never shows the session token it carries."""
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 (the test's own union)
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as refused:
        with refused:
            return refused.code, json.loads(refused.read() or b"{}")


def _iso_after(iso: str, delta: timedelta) -> str:
    """`iso` + `delta` as the page writes an instant (JavaScript's toISOString: UTC, milliseconds)."""
    later = datetime.fromisoformat(iso) + delta
    return later.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _date_zh(iso: str) -> str:
    """How the zh-CN page writes the date of an instant (Asia/Shanghai): 2026年12月12日."""
    day = datetime.fromisoformat(iso).astimezone(SHANGHAI)
    return f"{day.year}年{day.month}月{day.day}日"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_whole_lookup_in_a_browser(
    make_union: UnionFactory, banks: dict[str, RunningBank], tmp_path: Path
) -> None:
    assert (DEFAULT_WEB_ROOT / "index.html").is_file(), "the page is not built: run `make web`"
    banks[DOWN_BANK].servicer.faults = FaultSettings(outage=True)
    deadline = timedelta(seconds=8)  # the down bank is marked as not answering then
    union = await make_union(http_listen="127.0.0.1:0", orchestration={"lookup_deadline": deadline})
    base = f"http://{union.http_address}"
    shots = [tmp_path / "shots"]
    if wanted := os.environ.get("CARDLOOKUP_SCREENSHOT_DIR"):
        shots.append(Path(wanted))
    bodies: list[asyncio.Task[Any]] = []
    problems: list[str] = []

    async def screenshot(page: Page, name: str) -> None:
        first = shots[0] / f"{name}.png"
        first.parent.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(first), full_page=True)
        for directory in shots[1:]:
            directory.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(first, directory / f"{name}.png")

    async def dom_clean(page: Page, where: str) -> None:
        _no_secret(await page.content(), f"the DOM ({where})")
        values = await page.evaluate("() => [...document.querySelectorAll('input')].map((i) => i.value)")
        _no_secret(" ".join(values), f"an input ({where})")

    async def body_of(response: Response) -> tuple[str, str]:
        try:
            return response.url, (await response.body()).decode("utf-8", "replace")
        except Exception:  # a navigation replaced the page before the body was read
            return response.url, ""

    async def credential_of(request: Request) -> str | None:
        try:
            return await request.header_value("authorization")
        except Exception:  # the page went away before the headers were read
            return None

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = await browser.new_context(
            viewport={"width": 390, "height": 844}, locale="zh-CN", timezone_id="Asia/Shanghai"
        )
        page = await context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        page.on("response", lambda response: bodies.append(asyncio.ensure_future(body_of(response))))
        # The session token the page sends, to try it once the person signed out (never printed).
        credentials: list[asyncio.Task[str | None]] = []
        page.on("request", lambda request: credentials.append(asyncio.ensure_future(credential_of(request))))
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on(
            "console",
            lambda message: problems.append(f"console: {message.text}") if message.type == "error" else None,
        )

        # Real-name verification, in Chinese first.
        await page.goto(f"{base}/")
        await expect(page.get_by_role("heading", name="实名验证")).to_be_visible()
        await page.fill("#name", PERSON.person.name)
        # As people write them: the ID pasted with a space before it, the mobile with +86 and dashes.
        await page.fill("#resident-id", f" {PERSON.person.resident_id_number}")
        await page.fill("#mobile", _formatted_mobile(PERSON.person.mobile_number))
        await page.get_by_test_id("send-code").click()
        await expect(page.get_by_test_id("code-sent")).to_contain_text("139****5036")
        code = read_one_time_code(union.config.sms_sink_path, PERSON.person.mobile_number)
        assert code is not None
        wrong = f"{(int(code) + 1) % 1_000_000:06d}"
        await page.fill("#code", wrong)
        await page.get_by_test_id("verify").click()
        await expect(page.get_by_role("alert")).to_contain_text("还可尝试 4 次")
        await page.fill("#code", code)
        await page.get_by_test_id("verify").click()

        # The lookup: 16 rows; every bank but the one that is down answers while it is still pending.
        await dom_clean(page, "verified")
        # No lookup before the person accepts the terms; then the page sends the version accepted.
        await page.get_by_test_id("start-lookup").click()
        await expect(page.get_by_role("alert")).to_have_text("请先阅读并同意服务条款。")
        await page.get_by_test_id("agree-terms").check()
        await page.get_by_test_id("start-lookup").click()
        await expect(page.locator("tr[data-bank]")).to_have_count(16)
        await expect(page.get_by_test_id("answered")).to_have_text("15 / 16 家银行已答复")
        down = page.locator(f'tr[data-bank="{DOWN_BANK}"]')
        await expect(down).to_have_attribute("data-outcome", "pending")
        await expect(page.locator('tr[data-bank="ICBC"]')).to_have_attribute("data-outcome", "answered")
        await expect(page.get_by_test_id("elapsed")).to_contain_text("已用时")
        await screenshot(page, "web-progress")

        # The report, once the deadline marks the silent bank.
        await expect(page.get_by_test_id("report")).to_be_visible()
        assert await page.get_by_test_id("total").text_content() == "5"
        assert await page.get_by_test_id("total-debit").text_content() == "3"
        assert await page.get_by_test_id("total-credit").text_content() == "2"
        await expect(page.get_by_test_id("expiry")).to_contain_text("本报告将于")
        await expect(page.locator(f'tr[data-bank="{DOWN_BANK}"]')).to_contain_text("未能答复")
        await expect(page.locator('tr[data-bank="ICBC"]')).to_contain_text("1")
        # When each bank can be asked again: the one that did not answer now, the others after the cooldown.
        cooldown = union.config.lookups.requery_cooldown
        await expect(page.locator(f'tr[data-bank="{DOWN_BANK}"] [data-testid="next-query"]')).to_have_text(
            "现在即可重新查询"
        )
        generated = await page.get_by_test_id("generated").get_attribute("data-time")
        assert generated is not None
        icbc_next = page.locator('tr[data-bank="ICBC"] [data-testid="next-query"]')
        assert await icbc_next.get_attribute("data-time") == _iso_after(generated, cooldown)
        await expect(icbc_next).to_contain_text(f"{_date_zh(_iso_after(generated, cooldown))}")
        await expect(icbc_next).to_contain_text("起可再次查询")
        numbers = await page.get_by_test_id("masked-number").all_text_contents()
        assert len(numbers) == 5
        assert all(MASKED.match(number) for number in numbers), numbers
        await dom_clean(page, "report")
        await screenshot(page, "web-report")

        # From a card: ask for closure and show the bank's answer; flag another as not mine.
        cards = page.get_by_test_id("card")
        await cards.nth(0).get_by_test_id("close-card").click()
        closure = cards.nth(0).get_by_test_id("closure-answer")
        await expect(closure).to_have_attribute(
            "data-state", re.compile(r"^(CLOSED|SCHEDULED|BRANCH_VISIT_REQUIRED|REJECTED)$")
        )
        await expect(closure).not_to_be_empty()
        await expect(cards.nth(0).get_by_test_id("close-card")).to_be_hidden()
        await cards.nth(1).get_by_test_id("flag-card").click()
        await expect(cards.nth(1).get_by_test_id("case-number")).to_contain_text("案件编号")
        await dom_clean(page, "card actions")
        await screenshot(page, "web-card-actions")

        # The bank that did not answer is back: asked again at once from the report, once the person
        # has accepted the terms for this lookup too; the new report holds only that bank.
        banks[DOWN_BANK].servicer.faults = FaultSettings()
        again = page.get_by_test_id("ask-again-panel")
        await expect(again).to_contain_text("平安银行 未能答复")
        await page.get_by_test_id("ask-again").click()
        await expect(again.get_by_role("alert")).to_have_text("请先阅读并同意服务条款。")
        await page.get_by_test_id("agree-terms-again").check()
        await page.get_by_test_id("ask-again").click()
        await expect(page.get_by_test_id("total")).to_have_text("0")  # the new report: PAB holds none
        await expect(page.get_by_text("其余 1 家银行未查到卡片。")).to_be_visible()
        await expect(page.get_by_test_id("ask-again-panel")).to_be_hidden()
        # "0 cards" is not the whole story: the 15 banks this lookup skipped are named, with why,
        # and the bank it asked (it answered now) can be asked again once the cooldown is over.
        await expect(page.get_by_test_id("unasked-note")).to_contain_text("另有 15 家银行本次未查询")
        unasked = page.get_by_test_id("unasked-banks")
        await expect(unasked.locator("[data-bank]")).to_have_count(15)
        await expect(unasked.locator(f'[data-bank="{DOWN_BANK}"]')).to_have_count(0)
        not_chosen = unasked.locator('[data-reason="NOT_CHOSEN"]')
        await expect(not_chosen).to_contain_text("本次未选择")
        await expect(not_chosen).to_contain_text("中国工商银行")
        await expect(not_chosen).to_contain_text("招商银行")
        again_next = page.get_by_test_id("next-query")
        await expect(again_next).to_have_count(1)
        await expect(again_next).to_have_attribute("data-banks", DOWN_BANK)
        generated = await page.get_by_test_id("generated").get_attribute("data-time")
        assert generated is not None
        assert await again_next.get_attribute("data-time") == _iso_after(generated, cooldown)
        await expect(again_next).to_contain_text(_date_zh(_iso_after(generated, cooldown)))
        await screenshot(page, "web-asked-again")
        await page.click("#lang")
        await expect(page.get_by_test_id("unasked-note")).to_contain_text("15 other banks were not asked")
        await expect(not_chosen).to_contain_text("not chosen for this lookup")
        await expect(not_chosen).to_contain_text("(ICBC)")
        await expect(again_next).to_contain_text("can be asked again from")
        await screenshot(page, "web-asked-again-en")
        await page.click("#lang")
        await expect(again_next).to_contain_text("起可再次查询")
        await dom_clean(page, "asked again")

        # My activity, then the same page in English.
        await page.get_by_test_id("nav-activity").click()
        activity = page.get_by_test_id("activity")
        for action in ("lookup.create", "lookup.consent", "report.read", "card.close", "card.flag"):
            await expect(activity.locator(f'li[data-action="{action}"]').first).to_be_visible()
        # Every event is named in words, none by its action code (lookup.watch, report.list, ...).
        for item in await activity.locator("li[data-action]").all():
            action = await item.get_attribute("data-action")
            assert action is not None
            assert action not in await item.locator("strong").inner_text()
        await page.click("#lang")
        await expect(page.get_by_role("heading", name="My activity")).to_be_visible()
        await expect(activity.locator('li[data-action="card.flag"]').first).to_contain_text(
            "card flagged as not mine"
        )
        await screenshot(page, "web-activity")
        await page.click("#lang")

        # Delete the first report from the list of reports (newest first: it is the second).
        await page.get_by_test_id("nav-lookup").click()
        await expect(page.get_by_role("button", name="查看")).to_have_count(2)
        await page.get_by_role("button", name="查看").nth(1).click()
        await page.get_by_test_id("delete-report").click()
        await page.get_by_test_id("confirm-delete").click()
        await expect(page.get_by_text("报告已删除。")).to_be_visible()

        # Privacy: the DOM, web storage and every answer the page received.
        await dom_clean(page, "deleted")
        _no_secret(await page.evaluate("() => document.body.innerText"), "the page text")
        stored = await page.evaluate("() => [localStorage.length, sessionStorage.length, document.cookie]")
        assert stored == [0, 0, ""]

        # Signing out asks the union to revoke the session, then forgets it.
        async with page.expect_response(lambda r: r.url.endswith(".IdentityService/SignOut")) as signed_out:
            await page.get_by_test_id("nav-signout").click()
        assert (await signed_out.value).status == 200
        await expect(page.get_by_role("heading", name="实名验证")).to_be_visible()
        await expect(page.get_by_test_id("nav-signout")).to_have_count(0)
        stored = await page.evaluate("() => [localStorage.length, sessionStorage.length, document.cookie]")
        assert stored == [0, 0, ""]
        await context.close()
        await browser.close()

    # The token the page used is refused now, as revoked (not merely expired or unknown).
    sent = {value for value in await asyncio.gather(*credentials) if value is not None}
    sessions = len(sent)
    assert sessions == 1  # one verification, one session
    request = urllib.request.Request(  # noqa: S310 (the test's own union)
        f"{base}/cardlookup.v1.CardLookupService/ListReports",
        data=b"{}",
        headers={"content-type": "application/json", "authorization": sent.pop()},
        method="POST",
    )
    status, answer = await asyncio.to_thread(_answer_of, request)
    reasons = [detail.get("debug", {}).get("reason") for detail in answer.get("details", [])]
    assert (status, answer.get("code"), reasons) == (401, "unauthenticated", ["SESSION_REVOKED"])

    answers = await asyncio.gather(*bodies)
    assert any("/cardlookup.v1.CardLookupService/WatchLookup" in url for url, _ in answers)
    for url, body in answers:
        _no_secret(body, url)
    # The browser logs the one refused call it was meant to make (the wrong code: 401); nothing else.
    assert [p for p in problems if "status of 401" not in p] == [], problems
    assert len([p for p in problems if "status of 401" in p]) == 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_page_states_the_configured_retention_and_cooldown(make_union: UnionFactory) -> None:
    """A union that keeps reports 3 days and does not re-ask a bank for 36 hours says so, in both
    languages: the page has no number of its own (the union writes them into index.html)."""
    assert (DEFAULT_WEB_ROOT / "index.html").is_file(), "the page is not built: run `make web`"
    union = await make_union(
        http_listen="127.0.0.1:0",
        retention=RetentionPolicy(report_days=3),
        lookups={"requery_cooldown": timedelta(hours=36)},
    )
    problems: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = await browser.new_context(
            viewport={"width": 390, "height": 844}, locale="zh-CN", timezone_id="Asia/Shanghai"
        )
        page = await context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on(
            "console",
            lambda message: problems.append(f"console: {message.text}") if message.type == "error" else None,
        )
        await _verify(page, union)

        terms = page.locator("label.terms")
        intro = page.get_by_test_id("lookup-intro")
        await expect(terms).to_contain_text("报告只保留卡号前 4 位和后 4 位，3 天后自动删除")
        await expect(intro).to_contain_text("已答复的银行 36 小时内不会再次查询")
        await page.click("#lang")
        await expect(terms).to_contain_text("is deleted after 3 days")
        await expect(intro).to_contain_text("A bank that answered is not asked again for 36 hours")
        for text in (await terms.text_content() or "", await intro.text_content() or ""):
            assert "7" not in text, text
        await context.close()
        await browser.close()
    assert problems == []


async def _verify(page: Page, union: UnionServer) -> None:
    """Real-name verification in the page, with the code from the development SMS outbox."""
    await page.goto(f"http://{union.http_address}/")
    await page.fill("#name", PERSON.person.name)
    await page.fill("#resident-id", PERSON.person.resident_id_number)
    await page.fill("#mobile", PERSON.person.mobile_number)
    await page.get_by_test_id("send-code").click()
    await expect(page.get_by_test_id("code-sent")).to_be_visible()
    code = read_one_time_code(union.config.sms_sink_path, PERSON.person.mobile_number)
    assert code is not None
    await page.fill("#code", code)
    await page.get_by_test_id("verify").click()
    await expect(page.get_by_test_id("start-lookup")).to_be_visible()
