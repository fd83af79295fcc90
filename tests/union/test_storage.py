"""The Alembic migrations build exactly the schema the models describe, on each backend."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from server.union.storage.models import Base
from server.union.storage.store import open_store


async def test_migrations_match_models(database_url: str) -> None:
    store = open_store(database_url)
    try:
        store.migrate()
        store.migrate()  # idempotent
        with store.engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert differences == []
        assert await store.ping()
    finally:
        await store.close()


def test_unknown_backend_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="unsupported database backend"):
        open_store("mysql://somewhere/db")
