"""The checked-in generated code is exactly what the protos produce (regenerate with `make protos`)."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _files(directory: Path) -> set[str]:
    return {
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_is_in_sync(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_protos.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    checked_in = ROOT / "gen" / "python"
    assert _files(out) == _files(checked_in), "generated files differ: run `make protos` and commit"
    stale = [
        name for name in sorted(_files(out)) if not filecmp.cmp(out / name, checked_in / name, shallow=False)
    ]
    assert stale == [], f"stale generated code: {stale}; run `make protos` and commit"


def test_contract_packages_are_versioned() -> None:
    from bankquery.v1 import bank_query_service_pb2
    from cardlookup.v1 import card_lookup_service_pb2

    assert card_lookup_service_pb2.DESCRIPTOR.package == "cardlookup.v1"
    assert bank_query_service_pb2.DESCRIPTOR.package == "bankquery.v1"
    # A full card number cannot even be expressed on the bank contract.
    fields = {f.name for f in bank_query_service_pb2.CardRecord.DESCRIPTOR.fields}
    assert fields == {
        "bank_code",
        "card_ref",
        "card_type",
        "first_four",
        "last_four",
        "number_length",
        "status",
        "open_time",
    }
