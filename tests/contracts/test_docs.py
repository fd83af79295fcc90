"""The README and docs/ stay true to the repository: links, paths, make targets and RPC names.

A clone has nothing but the repository, so every link must land on a file in it, and nothing may link
outside it. Paths, `make` targets and gRPC methods the pages name must exist, so a rename that forgets
the documentation fails here instead of misleading a reader.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pool

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
EXTERNAL = re.compile(r"\b[a-z][a-z0-9+.-]*://", re.IGNORECASE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
MAKE_TARGET = re.compile(r"(?<![\w-])make ([a-z][a-z0-9-]*)")
MAKEFILE_TARGET = re.compile(r"^([a-z][a-z0-9-]*):", re.MULTILINE)
RPC = re.compile(r"\b((?:cardlookup|bankquery)\.v1\.[A-Z]\w*|grpc\.health\.v1\.Health)/([A-Z]\w*)")
# Repository paths as the pages write them; what runs and installs write (bench/results, node_modules)
# and patterns are not files of the repository.
REPO_PATH = re.compile(r"(?<![\w./-])((?:server|clients|tests|protos|scripts|gen|docs|bench)/[\w./-]*)")
# Database URLs are configuration, not links.
# Database URLs, and the servers a reader starts on their own machine (loopback only).
ALLOWED_SCHEMES = (
    "sqlite://",
    "postgresql+psycopg://",
    "http://127.0.0.1",
    "http://localhost",
)


def _code(text: str) -> str:
    """The fenced blocks and inline code spans of a page: where commands and paths are written."""
    return "\n".join([*FENCE.findall(text), *INLINE_CODE.findall(FENCE.sub("", text))])


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_the_readme_and_the_docs_exist() -> None:
    names = {_page_id(page) for page in PAGES}
    assert {
        "README.md",
        "docs/design.md",
        "docs/architecture.md",
        "docs/performance.md",
        "docs/operations.md",
        "docs/testing.md",
        "docs/privacy-and-security.md",
    } <= names


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_links_stay_inside_the_repository(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(text):
        path = target.split("#", 1)[0]
        resolved = (page.parent / path).resolve()
        if EXTERNAL.match(target) or target.startswith("/") or not resolved.is_relative_to(ROOT):
            broken.append(f"{target}: points outside the repository")
        elif path and not resolved.exists():
            broken.append(f"{target}: no such file")
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_no_address_outside_the_repository(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    addresses = [
        text[match.start() : match.start() + 40]
        for match in EXTERNAL.finditer(text)
        if not text.startswith(ALLOWED_SCHEMES, match.start())
    ]
    assert addresses == []


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_make_targets_exist(page: Path) -> None:
    targets = set(MAKEFILE_TARGET.findall((ROOT / "Makefile").read_text(encoding="utf-8")))
    named = set(MAKE_TARGET.findall(_code(page.read_text(encoding="utf-8"))))
    assert named - targets == set()


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_repository_paths_exist(page: Path) -> None:
    missing = []
    for path in set(REPO_PATH.findall(_code(page.read_text(encoding="utf-8")))):
        path = path.rstrip(".")
        if path.startswith("bench/results") or "node_modules" in path or any(mark in path for mark in "*<{"):
            continue
        if not (ROOT / path).exists():
            missing.append(path)
    assert sorted(missing) == []


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_named_rpcs_exist(page: Path) -> None:
    # Importing the generated modules registers their services in the default pool.
    from bankquery.v1 import bank_query_service_pb2  # noqa: F401
    from cardlookup.v1 import (  # noqa: F401
        admin_service_pb2,
        card_action_service_pb2,
        card_lookup_service_pb2,
        identity_service_pb2,
    )
    from grpc_health.v1 import health_pb2  # noqa: F401

    pool = descriptor_pool.Default()
    unknown = []
    for service, method in set(RPC.findall(page.read_text(encoding="utf-8"))):
        try:
            pool.FindServiceByName(service).methods_by_name[method]
        except KeyError:
            unknown.append(f"{service}/{method}")
    assert unknown == []
