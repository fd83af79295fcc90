"""Who uses a data directory: advisory locks the kernel drops when the holder ends, however it ends.

A server serving from a directory holds a shared lock on `<dir>/.serving` (replicas may share it); a
command that deletes the directory's contents (the demo's fresh start, `make reset`) takes it
exclusively first, so it can never delete a running server's keys, admin token or database.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

SERVING_FILE = ".serving"


class DirectoryServing(Exception):
    """A server is serving from the directory."""


@contextlib.contextmanager
def serving_from(data_dir: Path) -> Iterator[None]:
    """Mark `data_dir` as served from by this process for as long as the block runs."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / SERVING_FILE).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryServing(f"{data_dir} is being reset; start again once that is done") from None
        yield


@contextlib.contextmanager
def nobody_serving_from(data_dir: Path) -> Iterator[None]:
    """Hold `data_dir` against servers while the block runs (e.g. deletes what is in it);
    DirectoryServing if a server serves from it now."""
    if not data_dir.is_dir():
        yield
        return
    with (data_dir / SERVING_FILE).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryServing(
                f"a union is serving from {data_dir} (cardlookup-union serve); stop it first"
            ) from None
        yield
