"""Structured (JSON-lines) logging with PII redaction as the last step before output.

Code should never log PII in the first place; the redacting formatter is the
safety net: any run of 13-19 digits (a card number) and any 17 digits + check
character (a resident ID number) in a message or field becomes "[REDACTED]".
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

PII_PATTERN = re.compile(r"(?<!\d)(?:\d{17}[\dXx]|\d{13,19})(?!\d)")
_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def redact(text: str) -> str:
    return PII_PATTERN.sub("[REDACTED]", text)


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What a log line says: the message and the structured `extra` fields, before redaction."""
    entry: dict[str, Any] = {
        "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
        "level": record.levelname.lower(),
        "logger": record.name,
        "message": record.getMessage(),
    }
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_"):
            entry[key] = value
    return entry


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = record_fields(record)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, ensure_ascii=False, default=str))


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
