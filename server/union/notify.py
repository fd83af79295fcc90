"""Telling a person their report is ready, as the original app does by SMS. No card data, ever."""

from __future__ import annotations

from typing import Protocol

from server.union.sms import SmsSender

REPORT_READY_TEXT = "【一键查卡】您的查卡报告已生成，请在7个自然日内登录查看，逾期自动删除。"


class Notifier(Protocol):
    def report_ready(self, mobile_number: str) -> None: ...


class SmsNotifier:
    """Development and production alike go through an SmsSender (the development one is a file)."""

    def __init__(self, sms: SmsSender) -> None:
        self._sms = sms

    def report_ready(self, mobile_number: str) -> None:
        self._sms.send(mobile_number, REPORT_READY_TEXT)
