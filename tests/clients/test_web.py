"""The person's web page in a real browser: Debian's chromium, headless, driven by Playwright.

One walk through the whole page against a real union (Connect on its HTTP port) and real banks:
verify (a wrong code first, then the one from the development SMS outbox), watch the banks
answer (one is down and ends up marked), read the report, close a card, flag another, read
"my activity" in both languages, delete the report. Along the way nothing in the DOM, in any
network answer or in web storage may hold a full card or resident ID number, and the page
must run under the union's Content-Security-Policy without a violation.

Screenshots go to the test's tmp dir, and also to $CARDLOOKUP_SCREENSHOT_DIR when set
(`CARDLOOKUP_SCREENSHOT_DIR=docs` refreshes docs/web-report.png).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, Response, async_playwright, expect

from server.bank.bank_server import RunningBank
from server.bank.faults import FaultSettings
from server.population.generator import DEMO_PEOPLE
from server.union.api.web import DEFAULT_WEB_ROOT
from server.union.sms import read_one_time_code
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

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make chromium)"),
]


def _no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a full card or ID number in {where}"


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

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = await browser.new_context(
            viewport={"width": 390, "height": 844}, locale="zh-CN", timezone_id="Asia/Shanghai"
        )
        page = await context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        page.on("response", lambda response: bodies.append(asyncio.ensure_future(body_of(response))))
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on(
            "console",
            lambda message: problems.append(f"console: {message.text}") if message.type == "error" else None,
        )

        # Real-name verification, in Chinese first.
        await page.goto(f"{base}/")
        await expect(page.get_by_role("heading", name="实名验证")).to_be_visible()
        await page.fill("#name", PERSON.person.name)
        await page.fill("#resident-id", PERSON.person.resident_id_number)
        await page.fill("#mobile", PERSON.person.mobile_number)
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
        await dom_clean(page, "asked again")

        # My activity, then the same page in English.
        await page.get_by_test_id("nav-activity").click()
        activity = page.get_by_test_id("activity")
        for action in ("lookup.create", "lookup.consent", "report.read", "card.close", "card.flag"):
            await expect(activity.locator(f'li[data-action="{action}"]').first).to_be_visible()
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
        await context.close()
        await browser.close()

    answers = await asyncio.gather(*bodies)
    assert any("/cardlookup.v1.CardLookupService/WatchLookup" in url for url, _ in answers)
    for url, body in answers:
        _no_secret(body, url)
    # The browser logs the one refused call it was meant to make (the wrong code: 401); nothing else.
    assert [p for p in problems if "status of 401" not in p] == [], problems
    assert len([p for p in problems if "status of 401" in p]) == 1
