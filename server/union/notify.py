"""Telling a person their report is ready, as the original app does by SMS. No card data, ever."""

from __future__ import annotations

from typing import Protocol

from server.union.sms import SmsSender


def report_ready_text(retention_days: int) -> str:
    """The message follows the configured retention, so it never promises what the union won't keep."""
    return f"【一键查卡】您的查卡报告已生成，请在{retention_days}个自然日内登录查看，逾期自动删除。"


class Notifier(Protocol):
    def report_ready(self, mobile_number: str) -> None: ...


class SmsNotifier:
    """Development and production alike go through an SmsSender (the development one is a file)."""

    def __init__(self, sms: SmsSender, retention_days: int) -> None:
        self._sms = sms
        self._text = report_ready_text(retention_days)

    def report_ready(self, mobile_number: str) -> None:
        self._sms.send(mobile_number, self._text)
