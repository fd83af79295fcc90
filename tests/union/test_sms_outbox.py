"""The development SMS outbox is read while union processes append to it."""

from __future__ import annotations

from pathlib import Path

from server.union.notify import report_ready_text
from server.union.sms import FileSmsSink, read_last_message, read_one_time_code


def test_a_line_still_being_written_is_not_read(tmp_path: Path) -> None:
    outbox = tmp_path / "sms-outbox.jsonl"
    sink = FileSmsSink(outbox)
    sink.send("13800000000", "您的验证码 123456")
    sink.send("13900000000", "您的验证码 654321")
    # What a reader can see while another process's append crosses a page boundary: half a line,
    # cut inside a multi-byte character.
    partial = '{"time": "2026-11-27T09:01:15+00:00", "to": "13800000000", "text": "您的验证码 99'
    with outbox.open("ab") as handle:
        handle.write(partial.encode()[:-4])
    assert read_one_time_code(outbox, "13800000000") == "123456"
    assert read_one_time_code(outbox, "13900000000") == "654321"
    assert read_last_message(outbox, "13700000000") is None


def test_the_code_is_found_past_a_notice_sent_after_it(tmp_path: Path) -> None:
    """A report-ready notice can reach the same phone right after the code (a union sending what it
    owed before a restart): the code is still the newest one, though not the newest message."""
    outbox = tmp_path / "sms-outbox.jsonl"
    sink = FileSmsSink(outbox)
    sink.send("13800000000", "【一键查卡】验证码 111111，5分钟内有效。")
    sink.send("13800000000", "【一键查卡】验证码 222222，5分钟内有效。")
    sink.send("13800000000", report_ready_text(7))
    assert read_last_message(outbox, "13800000000") == report_ready_text(7)
    assert read_one_time_code(outbox, "13800000000") == "222222"
    assert read_one_time_code(outbox, "13900000000") is None
