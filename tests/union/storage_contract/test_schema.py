"""The Alembic migrations build exactly the schema the models describe, on each backend."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from server.union.storage.database import alembic_config, open_store
from server.union.storage.models import Base


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


async def test_queries_by_person_use_the_unique_index_on_person_and_request(database_url: str) -> None:
    """Migration 0003 dropped the single-column person_hash indexes of `lookups` and
    `card_closures`: the unique (person_hash, request_id) index serves a person's queries."""
    store = open_store(database_url)
    queries = {
        "lookups": "SELECT id FROM lookups WHERE person_hash = :person",
        "card_closures": "SELECT id FROM card_closures WHERE person_hash = :person"
        " ORDER BY create_time DESC, id DESC LIMIT 10",
    }
    try:
        store.migrate()
        with store.engine.begin() as connection:
            for table, query in queries.items():
                if store.runner.is_sqlite:
                    plan = " ".join(
                        row.detail
                        for row in connection.execute(text(f"EXPLAIN QUERY PLAN {query}"), {"person": "p"})
                    )
                    assert f"SEARCH {table} USING INDEX" in plan, plan
                    assert "(person_hash=?)" in plan, plan
                else:
                    # On empty tables PostgreSQL would rightly scan; ask whether an index can serve.
                    connection.execute(text("SET LOCAL enable_seqscan = off"))
                    plan = " ".join(
                        row[0] for row in connection.execute(text(f"EXPLAIN {query}"), {"person": "p"})
                    )
                    assert f"uq_{table}_person_hash_request_id" in plan, plan
    finally:
        await store.close()


async def test_migrations_go_down_and_up_again(database_url: str) -> None:
    store = open_store(database_url)

    def indexes(table: str) -> set[str]:
        return {str(index["name"]) for index in inspect(store.engine).get_indexes(table)}

    def downgrade(revision: str) -> None:
        with store.engine.begin() as connection:
            config = alembic_config(store.url)
            config.attributes["connection"] = connection
            command.downgrade(config, revision)

    try:
        store.migrate()
        assert {"sessions", "admin_credentials"} <= set(inspect(store.engine).get_table_names())
        downgrade("0004")
        assert not {"sessions", "admin_credentials"} & set(inspect(store.engine).get_table_names())
        assert "quota_slots" in inspect(store.engine).get_table_names()
        downgrade("0003")
        assert "quota_slots" not in inspect(store.engine).get_table_names()
        store.migrate()
        assert "ix_sessions_expire_time" in indexes("sessions")
        assert "ix_quota_slots_time" in indexes("quota_slots")
        assert "ix_lookups_person_hash" not in indexes("lookups")
        downgrade("0002")
        assert "ix_lookups_person_hash" in indexes("lookups")
        assert "ix_card_closures_person_hash" in indexes("card_closures")
        store.migrate()
        assert "ix_lookups_person_hash" not in indexes("lookups")
        assert "ix_card_closures_person_hash" not in indexes("card_closures")
        downgrade("base")
        assert set(inspect(store.engine).get_table_names()) <= {"alembic_version"}
        store.migrate()
        with store.engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    finally:
        await store.close()


def test_unknown_backend_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="unsupported database backend"):
        open_store("mysql://somewhere/db")
