"""The page's index.html as the union serves it: the configured policy numbers the page states.

The page (clients/web) says how long a report is kept and how long a bank that answered is not asked
again; both are configuration, so the union writes them into index.html as <meta> tags (no inline
script: the Content-Security-Policy stays strict). tests/clients/test_web.py shows them in a browser.
"""

from __future__ import annotations

import asyncio
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest

from server.union.domain.retention import RetentionPolicy
from tests.conftest import UnionFactory

INDEX = """<!doctype html>
<html lang="zh-CN">
  <head>
    <title>一键查卡</title>
  </head>
  <body></body>
</html>
"""


def _fetch(url: str, method: str) -> tuple[dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)  # noqa: S310 (the test's own loopback union)
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
        return {k.lower(): v for k, v in answer.headers.items()}, answer.read()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_index_states_the_configured_retention_and_cooldown(
    make_union: UnionFactory, tmp_path: Path
) -> None:
    web_root = tmp_path / "web"
    web_root.mkdir()
    (web_root / "index.html").write_text(INDEX, encoding="utf-8")
    union = await make_union(
        http_listen="127.0.0.1:0",
        web_root=web_root,
        retention=RetentionPolicy(report_days=3),
        lookups={"requery_cooldown": timedelta(hours=36)},
    )
    base = f"http://{union.http_address}"

    headers, body = await asyncio.to_thread(_fetch, f"{base}/", "GET")
    page = body.decode()
    assert '<meta name="cardlookup-report-days" content="3" />' in page
    assert '<meta name="cardlookup-requery-cooldown-hours" content="36" />' in page
    assert page.index("cardlookup-report-days") < page.index("</head>")
    assert int(headers["content-length"]) == len(body)
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "<script>" not in page

    head_headers, head_body = await asyncio.to_thread(_fetch, f"{base}/index.html", "HEAD")
    assert head_body == b""
    assert int(head_headers["content-length"]) == len(body)
