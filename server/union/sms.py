"""Pluggable SMS sending. Development and tests use a sink file that people and tests can read.

The one-time code goes only to the SMS channel: never into an RPC answer or a log line.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

# A one-time code in a message: six digits standing alone.
ONE_TIME_CODE = re.compile(r"(?<!\d)\d{6}(?!\d)")


class SmsSender(Protocol):
    def send(self, mobile_number: str, text: str) -> None: ...


class FileSmsSink:
    """Appends one JSON line per message to a file: {"time", "to", "text"} (the demo's "phone")."""

    def __init__(self, path: Path, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.path = path
        self._now = now  # the union's clock, so messages and their purge share one time line
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def send(self, mobile_number: str, text: str) -> None:
        line = json.dumps(
            {"time": self._now().isoformat(), "to": mobile_number, "text": text}, ensure_ascii=False
        )
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def purge(self, before: datetime) -> int:
        """Drop the messages sent before `before` (one-time codes must not linger); returns how many."""
        with self._lock:
            if not self.path.exists():
                return 0
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [
                line
                for line in lines
                if line.endswith("\n") and datetime.fromisoformat(json.loads(line)["time"]) >= before
            ]
            if len(kept) == len(lines):
                return 0
            replacement = self.path.with_name(self.path.name + ".purging")
            replacement.write_text("".join(kept), encoding="utf-8")
            os.replace(replacement, self.path)
            return len(lines) - len(kept)


def _messages_to(path: Path, mobile_number: str) -> list[str]:
    """The texts sent to `mobile_number` in a sink file, oldest first."""
    if not path.exists():
        return []
    # Another process may be appending right now, and a reader can see the first part of its line
    # (an append that crosses a page boundary becomes visible page by page): only lines that end
    # with their newline are complete.
    *complete, _being_written = path.read_bytes().split(b"\n")
    entries = (json.loads(line.decode("utf-8")) for line in complete)
    return [entry["text"] for entry in entries if entry["to"] == mobile_number]


def read_last_message(path: Path, mobile_number: str) -> str | None:
    """The newest message sent to `mobile_number` in a sink file (used by the demo and tests)."""
    messages = _messages_to(path, mobile_number)
    return messages[-1] if messages else None


def read_one_time_code(path: Path, mobile_number: str) -> str | None:
    """The 6-digit code in the newest message to `mobile_number` that carries one (development
    outbox only). Not simply the newest message: a report-ready notice, which carries no code, may
    be sent to the same phone at any moment, e.g. by a union catching up after a restart."""
    for text in reversed(_messages_to(path, mobile_number)):
        if match := ONE_TIME_CODE.search(text):
            return match.group(0)
    return None
