"""Pluggable SMS sending. Development and tests use a sink file that people and tests can read.

The one-time code goes only to the SMS channel: never into an RPC answer or a log line.
"""

from __future__ import annotations

import json
import re
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol


class SmsSender(Protocol):
    def send(self, mobile_number: str, text: str) -> None: ...


class FileSmsSink:
    """Appends one JSON line per message to a file: {"time", "to", "text"} (the demo's "phone")."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def send(self, mobile_number: str, text: str) -> None:
        line = json.dumps(
            {"time": datetime.now(UTC).isoformat(), "to": mobile_number, "text": text}, ensure_ascii=False
        )
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def read_last_message(path: Path, mobile_number: str) -> str | None:
    """The newest message sent to `mobile_number` in a sink file (used by the demo and tests)."""
    if not path.exists():
        return None
    last = None
    # Another process may be appending right now, and a reader can see the first part of its line
    # (an append that crosses a page boundary becomes visible page by page): only lines that end
    # with their newline are complete.
    *complete, _being_written = path.read_bytes().split(b"\n")
    for line in complete:
        entry = json.loads(line.decode("utf-8"))
        if entry["to"] == mobile_number:
            last = entry["text"]
    return last


def read_one_time_code(path: Path, mobile_number: str) -> str | None:
    """The 6-digit code in the newest message to `mobile_number` (development outbox only)."""
    match = re.search(r"(?<!\d)\d{6}(?!\d)", read_last_message(path, mobile_number) or "")
    return match.group(0) if match else None
