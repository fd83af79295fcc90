"""Keyset pagination with signed page tokens (AIP-158), one implementation for every list.

A token names the last item of the previous page (its time and id), is signed
with the page key, and is bound to the list it came from and to whoever asked:
a token from another list, another person, or no server at all is
INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

from server.common import errors
from server.union.keyring import InvalidToken, Keys

T = TypeVar("T")


class Pager:
    def __init__(self, keys: Keys, kind: str, default_size: int, max_size: int) -> None:
        self._keys = keys
        self._kind = kind
        self.default_size = default_size
        self.max_size = max_size

    def size(self, page_size: int) -> int:
        if page_size < 0:
            raise errors.InvalidArgument([errors.FieldViolation("page_size", "must not be negative")])
        return min(page_size or self.default_size, self.max_size)

    def after(self, scope: str, page_token: str) -> tuple[datetime, str] | None:
        """The (time, id) the page starts after; None for the first page."""
        if not page_token:
            return None
        bad = errors.InvalidArgument(
            [errors.FieldViolation("page_token", "not a page token from this server")]
        )
        try:
            claims = self._keys.verify(self._keys.page, page_token)
            if claims["k"] != self._kind or claims["s"] != scope[:16]:
                raise bad
            return datetime.fromisoformat(str(claims["t"])), str(claims["i"])
        except (InvalidToken, KeyError, TypeError, ValueError) as error:
            raise bad from error

    def page(
        self, items: Sequence[T], size: int, scope: str, position: Callable[[T], tuple[datetime, object]]
    ) -> tuple[list[T], str]:
        """Cut a fetch of size + 1 items to one page and the token for the next (empty at the end)."""
        if len(items) <= size:
            return list(items), ""
        page = list(items[:size])
        time, last_id = position(page[-1])
        token = self._keys.sign(
            self._keys.page, {"k": self._kind, "s": scope[:16], "t": time.isoformat(), "i": str(last_id)}
        )
        return page, token
