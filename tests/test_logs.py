"""The log formatter's safety net: digit runs that could be card or ID numbers never reach output."""

from __future__ import annotations

import io
import json
import logging

from server.common.logs import configure_logging, redact


def test_redact_masks_card_and_id_shapes() -> None:
    assert redact("pan 6222021234567890123 id 31010419850312991X ok") == "pan [REDACTED] id [REDACTED] ok"
    assert redact("latency 1234 ms, lookup l12ab") == "latency 1234 ms, lookup l12ab"


def test_json_lines_are_redacted() -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream)
    try:
        logging.getLogger("server.test").info(
            "card %s", "6222021234567890123", extra={"id": "310104198503129915"}
        )
    finally:
        logging.getLogger().handlers.clear()
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "card [REDACTED]"
    assert entry["id"] == "[REDACTED]"
